"""Greedy decoding of an ONNX graph with a KV cache, on ONNX Runtime: the ONNX twin of `GreedyLoop`.

The same interface (`prefill`, `step`, `sync`, `generate`, `device`) so `measure_generation` times an ONNX
variant exactly like a torch one. The graph is the one export.onnx writes with `with_cache` (interface in
studio/evaluation/onnx_cache.py): prefill feeds the prompts with a zero-length past, each step feeds one
token per sequence with the previous step's `present.*` outputs as the next `past_key_values.*` inputs and
the attention mask grown by one. The state's `cache` is the list of present arrays, so the KV-cache bytes
are what ONNX Runtime really returned.

Arrays go through numpy (no IOBinding): on the CPU provider the copies are the cache's own bytes once per
step, small next to a layer's weights, and the same for every variant measured this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import BadInput
from studio.evaluation.onnx_cache import NO_CACHE_HOW, PAST_PREFIX, PRESENT_PREFIX, empty_past

if TYPE_CHECKING:
    import torch


class OnnxGreedyLoop:
    """Greedy decoding of one cache graph on ONNX Runtime: `prefill` then `step`, one token at a time."""

    def __init__(self, path: Path, *, threads: int | None = None, device: str | None = "cpu") -> None:
        import torch

        from studio.evaluation.runners import open_session, past_inputs

        self.path = Path(path)
        self.session = open_session(self.path, threads, device)
        names = [i.name for i in self.session.get_inputs()]
        self.past = past_inputs(self.session)
        if not self.past or "input_ids" not in names:
            raise BadInput(f"this graph has no past key/values inputs: {NO_CACHE_HOW}", path=self.path)
        self.past_names = [name for name, _, _ in self.past]
        outputs = [o.name for o in self.session.get_outputs()]
        self.present_names = [PRESENT_PREFIX + n.removeprefix(PAST_PREFIX) for n in self.past_names]
        missing = [n for n in self.present_names if n not in outputs]
        if missing:
            raise BadInput(
                f"the graph takes past key/values but has no '{missing[0]}' output", path=self.path
            )
        self.logits = outputs[0]
        self.takes_mask = "attention_mask" in names
        self.device = torch.device("cpu")  # what the loop hands back lives in host memory

    def _run(self, ids: Any, past: dict[str, Any], length: int) -> tuple[torch.Tensor, list[Any]]:
        import numpy as np
        import torch

        feeds = {"input_ids": ids, **past}
        if self.takes_mask:
            feeds["attention_mask"] = np.ones((len(ids), length), dtype=np.int64)
        logits, *presents = self.session.run([self.logits, *self.present_names], feeds)
        return torch.from_numpy(np.asarray(logits[:, -1], dtype=np.float32)).argmax(-1), presents

    def prefill(self, prompts: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The first new token of each prompt, and the state (the cache arrays, the context length)."""
        ids = prompts.cpu().numpy().astype("int64")
        length = ids.shape[1]
        token, cache = self._run(ids, empty_past(self.past, len(ids)), length)
        return token, {"cache": cache, "length": length}

    def step(self, token: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Feed one token per sequence; the next greedy token (the state's cache grows by one position)."""
        state["length"] += 1
        past = dict(zip(self.past_names, state["cache"], strict=True))
        ids = token[:, None].cpu().numpy().astype("int64")
        token, state["cache"] = self._run(ids, past, state["length"])
        return token

    def sync(self) -> None:
        """session.run returns when its outputs are in host memory: nothing to wait for."""

    def generate(self, prompts: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Greedy new tokens [batch, new_tokens]; the returned state's cache covers prompt + new tokens."""
        from studio.evaluation.generation import greedy_run

        return greedy_run(self, prompts, new_tokens)


def array_bytes(arrays: list[Any]) -> int:
    return sum(int(a.nbytes) for a in arrays)
