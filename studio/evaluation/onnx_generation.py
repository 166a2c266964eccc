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
from studio.evaluation.onnx_cache import (
    NO_CACHE_HOW,
    PAST_PREFIX,
    PRESENT_PREFIX,
    empty_past,
    seq2seq_layout,
    seq2seq_problem,
)

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


class OnnxSeq2SeqLoop:
    """Greedy decoding of an encoder-decoder model exported with its caches (export.onnx `with_cache` on a
    seq2seq model): `prefill` runs model.onnx once (encoder, decoder start token, both caches), `step` runs
    the decoder graph beside it for one position, with the self-attention cache it returned last and the
    cross-attention cache from the prefill. The state's `cache` is the arrays held between steps (self and
    cross-attention, every layer), so the KV-cache bytes are what ONNX Runtime really returned."""

    def __init__(self, path: Path, *, threads: int | None = None, device: str | None = "cpu") -> None:
        import json

        import torch

        from studio.checkpoints.onnx_graph import read_metadata
        from studio.evaluation.runners import open_session

        self.path = Path(path)
        metadata = read_metadata(self.path)
        problem = seq2seq_problem(self.path, metadata)
        layout = seq2seq_layout(metadata)
        if problem is not None or layout is None:
            raise BadInput(problem or NO_CACHE_HOW, path=self.path)
        decoder = self.path.parent / layout.decoder
        self.layout = layout
        self.prefill_session = open_session(self.path, threads, device, metadata)
        self.decoder_session = open_session(decoder, threads, device, metadata)
        config = json.loads(metadata.get("studio.config") or "{}")
        start = config.get("decoder_start_token_id")
        self.start_token = int(start if start is not None else config.get("pad_token_id") or 0)
        self.device = torch.device("cpu")  # what the loop hands back lives in host memory

    def start(self, ids: Any, mask: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Encode the sources (`mask`: their padding, None: none) and decode the start token: its logits
        [batch, vocab] and the state (both caches, the encoder mask)."""
        import numpy as np
        import torch

        source = np.asarray(ids.cpu().numpy() if hasattr(ids, "cpu") else ids, dtype=np.int64)
        encoder_mask = (
            np.ones_like(source) if mask is None else np.asarray(mask.cpu().numpy(), dtype=np.int64)
        )
        start = np.full((len(source), 1), self.start_token, dtype=np.int64)
        feeds = {"input_ids": source, "attention_mask": encoder_mask, "decoder_input_ids": start}
        logits, *cache = self.prefill_session.run(["logits", *self.layout.prefill_outputs], feeds)
        state = {"cache": cache, "encoder_mask": encoder_mask, "length": 1}
        return torch.from_numpy(np.asarray(logits[:, -1], dtype=np.float32)), state

    def advance(self, token: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Feed one token per sequence: the next position's logits [batch, vocab]; the state's
        self-attention cache grows by one position."""
        import numpy as np
        import torch

        feeds = {
            "decoder_input_ids": token[:, None].cpu().numpy().astype("int64"),
            "encoder_attention_mask": state["encoder_mask"],
            **dict(zip(self.layout.decoder_inputs, state["cache"], strict=True)),
        }
        logits, *own = self.decoder_session.run(["logits", *self.layout.decoder_outputs], feeds)
        for i in range(self.layout.layers):  # self key and value of each layer; cross-attention stays
            state["cache"][4 * i], state["cache"][4 * i + 1] = own[2 * i], own[2 * i + 1]
        state["length"] += 1
        return torch.from_numpy(np.asarray(logits[:, -1], dtype=np.float32))

    def prefill(self, prompts: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The first new token of each source, and the state decoding goes on from."""
        logits, state = self.start(prompts)
        return logits.argmax(-1), state

    def step(self, token: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Feed one token per sequence; the next greedy token."""
        return self.advance(token, state).argmax(-1)

    def sync(self) -> None:
        """session.run returns when its outputs are in host memory: nothing to wait for."""

    def generate(self, prompts: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Greedy new tokens [batch, new_tokens]; the returned state's self-attention cache covers the
        start token and every new token (the last is fed too, as `greedy_run` does)."""
        from studio.evaluation.generation import greedy_run

        return greedy_run(self, prompts, new_tokens)
