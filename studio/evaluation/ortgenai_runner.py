"""onnxruntime-genai: its builder makes a causal LM's graph, its Generator decodes it.

Two uses. The studio's own: export.onnx_genai runs the builder, and a graph after runtime.onnxruntime_genai
(its metadata, RUNTIME_KEY) is decoded by the Generator instead of the studio's Python loop: the C++ loop
keeps one key/value buffer for the whole run and has no per-token Python cost. And the peer's:

The LLM bench compares the studio's variants with what a person gets from onnxruntime-genai out of the
box: `python -m onnxruntime_genai.models.builder -i <hf folder> -o <out> -p int4 -e cpu` (run as a
subprocess, so a builder crash or its memory stays out of the bench), then greedy decoding with
`onnxruntime_genai.Model` / `Generator`. Time is taken here around the generator's calls, the same way the
studio's loops are timed, rather than read from the library:

- prefill (TTFT): `append_tokens(prompts)` runs the prompt through the model, and the first
  `generate_next_token()` picks the first token from the logits it left (no model run);
- every later `generate_next_token()` is one decode step (the previous token through the model, then the
  greedy pick).

Threads are set as a `Config.overlay`, so the folder's genai_config.json is never rewritten.
`OrtGenaiLoop` has the studio loops' interface (`prefill`, `step`, `sync`, `generate`, `device`), so the
bench times all of them with one function.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BUILDER = "onnxruntime_genai.models.builder"


class BuilderFailed(Exception):
    """The builder refused or crashed on a model; the message says why (the end of its output)."""


def build_model(hf_folder: Path, out: Path, *, precision: str = "int4", timeout_s: float = 1800.0) -> Path:
    """Run onnxruntime-genai's builder on a Hugging Face folder (offline: it reads only that folder) and
    return the folder it wrote (model.onnx, its data, genai_config.json, the tokenizer files)."""
    out = Path(out)
    cache = out.parent / f"{out.name}-builder-cache"
    command = [
        sys.executable,
        "-m",
        BUILDER,
        "-i",
        str(hf_folder),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        raise BuilderFailed(f"the onnxruntime-genai builder ran past {timeout_s:.0f} s") from exc
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        lines = [ln for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
        tail = lines[-1] if lines else "no output"
        raise BuilderFailed(f"the onnxruntime-genai builder failed (exit {done.returncode}): {tail[:300]}")
    return out


# Session config entries the Generator runs with, as every ONNX Runtime session the studio times does
# (studio/evaluation/runners.py): no idle spinning, whose busy-waiting after a run steals the cores from the
# variant timed next in an interleaved round (seen: torch FP32's prefill right after this peer 48 ms, 12 ms
# when it came first). genai_config.json passes unknown session_options keys on as config entries.
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}

# The graph metadata runtime.onnxruntime_genai records (JSON: intra_op_threads, null for the evaluation's):
# the studio's greedy loops then decode the graph with onnxruntime-genai's Generator.
RUNTIME_KEY = "studio.onnxruntime_genai"
GENAI_CONFIG = "genai_config.json"


def thread_overlay(threads: int) -> str:
    """genai_config.json settings that run the session on `threads` intra-op threads without idle
    spinning, as a JSON overlay (`onnxruntime_genai.Config.overlay`): the folder's file stays as written."""
    options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1, **NO_SPINNING}
    return json.dumps({"model": {"decoder": {"session_options": options}}})


def genai_problem(graph: Path) -> str | None:
    """Why onnxruntime-genai cannot load `graph`, or None: it needs genai_config.json beside the graph
    naming that file (export.onnx_genai writes it, and every later ONNX step carries it)."""
    config = Path(graph).with_name(GENAI_CONFIG)
    if not config.is_file():
        return (
            f"onnxruntime-genai loads a graph described by {GENAI_CONFIG} beside it, and {config.parent} has "
            "none: export the model with export.onnx_genai"
        )
    try:
        decoder = json.loads(config.read_text())["model"]["decoder"]
        filename = decoder["filename"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"{config} does not describe a decoder graph ({type(exc).__name__}: {exc})"
    if filename != Path(graph).name:
        return f"{config} describes {filename}, not {Path(graph).name}"
    return None


def weight_bytes(folder: Path) -> int:
    """Bytes of the model's graph and weights as written (the tokenizer files not counted)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in (".onnx", ".data"))


class OrtGenaiLoop:
    """Greedy decoding with an onnxruntime-genai model: `prefill` then `step`, one token at a time.

    The generator's buffers are sized at prefill for `max_new_tokens` (plus the last token fed, as the
    studio's loops feed it), so one loop serves every run of up to that many tokens; without it, for the
    model's whole context (genai_config.json's context_length).
    """

    def __init__(self, folder: Path, *, threads: int, max_new_tokens: int | None = None) -> None:
        import onnxruntime_genai as og
        import torch

        self.folder = Path(folder)
        config = json.loads((self.folder / GENAI_CONFIG).read_text())
        decoder = config["model"]["decoder"]
        self.path = self.folder / decoder["filename"]  # the graph: perplexity runs it in a plain session
        self.context_length = int(config["model"]["context_length"])
        self.layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_size = int(decoder["head_size"])
        self.og = og
        settings = og.Config(str(self.folder))
        settings.overlay(thread_overlay(threads))
        self.model = og.Model(settings)
        self.max_new_tokens = max_new_tokens
        self.device = torch.device("cpu")

    def _generator(self, batch: int, length: int) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(
            max_length=length, min_length=length, do_sample=False, batch_size=batch, num_beams=1
        )
        return self.og.Generator(self.model, params)

    def prefill(self, prompts: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        import numpy as np
        import torch

        ids = prompts.cpu().numpy().astype(np.int32)
        if self.max_new_tokens is None:
            length = self.context_length
        else:
            length = min(ids.shape[1] + self.max_new_tokens + 1, self.context_length)
        generator = self._generator(len(ids), length)
        generator.append_tokens(ids)
        generator.generate_next_token()  # the greedy pick from the prompt's logits: the first token
        token = torch.from_numpy(np.asarray(generator.get_next_tokens(), dtype=np.int64).copy())
        # no "cache" of the studio's loops: the generator holds it; cache_bytes(state) counts it
        state = {"generator": generator, "length": ids.shape[1], "batch": len(ids), "cache": None}
        return token, state

    def step(self, token: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """One decode step: the generator feeds the token it picked last (the same greedy token)."""
        import numpy as np
        import torch

        generator = state["generator"]
        generator.generate_next_token()
        state["length"] += 1
        return torch.from_numpy(np.asarray(generator.get_next_tokens(), dtype=np.int64).copy())

    def sync(self) -> None:
        """The generator's calls return when their work is done: nothing to wait for."""

    def generate(self, prompts: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Greedy new tokens [batch, new_tokens]; the state's cache covers prompt + new tokens."""
        from studio.evaluation.generation import greedy_run

        return greedy_run(self, prompts, new_tokens)

    def cache_bytes(self, state: dict[str, Any]) -> int:
        """Bytes of the key/value cache at the state's context length (the generator shares one buffer
        sized for the longest run, so this counts the positions filled, at the cache's element size)."""
        element = self._cache_element_size(state["generator"])
        return 2 * self.layers * self.kv_heads * self.head_size * state["length"] * state["batch"] * element

    @staticmethod
    def _cache_element_size(generator: Any) -> int:
        try:
            return int(generator.get_output("present.0.key").itemsize)
        except Exception:  # an output name another builder version spells differently: float32
            return 4

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position of `ids` [1, L] (for perplexity): one prompt pass, all positions."""
        import numpy as np
        import torch

        arr = ids.cpu().numpy().astype(np.int32)
        generator = self._generator(len(arr), arr.shape[1] + 1)
        generator.append_tokens(arr)
        return torch.from_numpy(np.asarray(generator.get_output("logits"), dtype=np.float32).copy())
