"""export.onnx with `with_cache`: a causal LM's decoder with past key/values inputs and present outputs.

A graph without the cache can only generate by running the whole sequence again for every new token; with
it, ONNX Runtime generates like transformers does (prefill once, then one position per step), so the ONNX
variant gets its own TTFT, TPOT and KV-cache bytes (studio/evaluation/onnx_generation.py).

The maintained exporters do not fit every model: optimum-onnx requires transformers<4.58 and the studio
pins transformers 5, and onnxruntime-genai's builder (export.onnx_genai, export_genai.py: the faster graph
where it applies) knows only its own list of architectures and only float weights. So this decoder is
exported by torch.onnx through a small wrapper that takes the cache as flat
tensors, fills a transformers `DynamicCache` with them, and returns the logits and the grown cache as flat
tensors: the graph's interface is what studio/evaluation/onnx_cache.py describes. The graph is verified
against torch on the prefill (the generic check, fed a zero-length past) and on one decode step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import BadInput
from studio.evaluation.onnx_cache import CacheLayout
from studio.techniques.onnx.export import FAIL_FACTOR

if TYPE_CHECKING:
    from studio.families import Batch
    from studio.techniques.base import RunContext

CACHE_FAMILIES = ("causal-lm", "seq2seq")  # seq2seq: export_seq2seq.py
TEXT_INPUTS = ["input_ids", "attention_mask"]
TRACE_PAST = 3  # past positions of the traced call: a non-zero past, so the cache path is what is traced


def cache_layout(module: Any) -> CacheLayout:
    """The cache a real forward pass of the module builds (layers, kv heads, head dim, dtype): read from
    the tensors, so grouped-query attention and models whose config names differ are measured alike."""
    import torch
    from transformers import DynamicCache

    if getattr(module, "config", None) is None:
        raise BadInput("with_cache needs a transformers causal LM (a module with a config)")
    cache = DynamicCache(config=module.config)
    with torch.no_grad():
        module(input_ids=torch.zeros((1, 2), dtype=torch.long), past_key_values=cache, use_cache=True)
    layers = list(getattr(cache, "layers", []) or [])
    if not layers or getattr(layers[0], "keys", None) is None:
        raise BadInput("with_cache: the model did not fill a transformers DynamicCache")
    _, heads, _, head_dim = layers[0].keys.shape
    dtype = str(layers[0].keys.dtype).removeprefix("torch.")
    return CacheLayout(layers=len(layers), kv_heads=int(heads), head_dim=int(head_dim), dtype=dtype)


def input_names(layout: CacheLayout) -> list[str]:
    return [*TEXT_INPUTS, *layout.inputs]


def output_names(layout: CacheLayout) -> list[str]:
    return ["logits", *layout.outputs]


def dynamic_dims(layout: CacheLayout) -> dict[str, dict[int, str]]:
    """Named dynamic axes of every input and output (batch, new positions, past and total positions)."""
    dims: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    dims.update({n: {0: "batch", 2: "past_sequence"} for n in layout.inputs})
    dims.update({n: {0: "batch", 2: "total_sequence"} for n in layout.outputs})
    return dims


def trace_args(batch: Batch, layout: CacheLayout, dtype: Any) -> tuple[Any, ...]:
    """input_ids, the mask over past + new positions, and a small random past (seeded)."""
    import torch

    ids = batch.inputs["input_ids"]
    mask = batch.inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    n = len(ids)
    mask = torch.cat([torch.ones((n, TRACE_PAST), dtype=mask.dtype), mask], dim=1)
    generator = torch.Generator().manual_seed(0)
    shape = (n, layout.kv_heads, TRACE_PAST, layout.head_dim)
    past = [torch.randn(shape, generator=generator).to(dtype) for _ in layout.inputs]
    return (ids, mask, *past)


def cache_wrapper(module: Any, layout: CacheLayout) -> Any:
    """A module taking (input_ids, attention_mask, past.0.key, past.0.value, ...) positionally and
    returning (logits, present.0.key, present.0.value, ...)."""
    import torch
    from transformers import DynamicCache

    from studio.evaluation.generation import cache_tensors

    config = module.config

    class WithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            input_ids, attention_mask, past = args[0], args[1], args[2:]
            cache = DynamicCache(config=config)
            for i in range(layout.layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
            )
            return (out.logits, *cache_tensors(out.past_key_values))

    return WithCache().eval()


def verify_decode_step(
    module: Any, path: Path, batch: Batch, layout: CacheLayout, tolerance: float, ctx: RunContext
) -> float:
    """Prefill the batch in torch and in ONNX Runtime, feed both the same next token, and compare the
    step's logits and the grown cache; fails when the graph's cache path is wrong."""
    import numpy as np
    import torch
    from transformers import DynamicCache

    from studio.evaluation.generation import cache_tensors
    from studio.evaluation.onnx_cache import empty_past
    from studio.evaluation.runners import open_session, past_inputs

    session = open_session(path, device="cpu")
    ids = batch.inputs["input_ids"]
    mask = batch.inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    feeds = {
        "input_ids": ids.numpy(),
        "attention_mask": mask.numpy(),
        **empty_past(past_inputs(session), len(ids)),
    }
    wanted = ["logits", *layout.outputs]  # by name: a graph may order its outputs otherwise (keys first)
    prefill = session.run(wanted, feeds)
    cache = DynamicCache(config=module.config)
    with torch.no_grad():
        ref = module(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    token = ref[:, -1].float().argmax(-1)[:, None]
    mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    step_feeds = {"input_ids": token.numpy(), "attention_mask": mask.numpy()}
    step_feeds.update(dict(zip(layout.inputs, prefill[1:], strict=True)))
    logits, *presents = session.run(wanted, step_feeds)
    with torch.no_grad():
        ref = module(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    expected = list(cache_tensors(cache))
    diff = float(np.abs(logits.astype(np.float32) - ref.float().numpy()).max())
    for got, want in zip(presents, expected, strict=True):
        if got.shape != tuple(want.shape):
            raise BadInput(
                f"the graph's cache output has shape {got.shape}, torch's {tuple(want.shape)}", path=path
            )
        diff = max(diff, float(np.abs(got.astype(np.float32) - want.float().numpy()).max()))
    scale = float(ref.abs().max())
    summary = (
        f"decode step with the cache: largest difference to torch {diff:.2e} (tolerance {tolerance:.1e})"
    )
    ctx.metric("onnx_decode_max_abs_diff", diff)
    if diff > FAIL_FACTOR * tolerance or diff > 0.1 * scale:
        raise BadInput(
            f"the exported graph's cache path does not reproduce the torch model: {summary}", path=path
        )
    ctx.log(f"verified: {summary}", level="info" if diff <= tolerance else "warning")
    return diff
