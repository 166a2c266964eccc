"""export.onnx with `with_cache` for encoder-decoder models (Marian): two graphs that generate by themselves.

Without the cache an ONNX seq2seq graph is a teacher-forcing graph: to generate, every new token would run
the encoder and the whole decoded sequence again. With it the variant folder holds two graphs (their
interface is `Seq2SeqCacheLayout` in studio/evaluation/onnx_cache.py):

- `model.onnx`: encoder + decoder over the decoder inputs, returning the logits (output 0, so it is still
  the graph every runner teacher-forces), the self-attention cache and the cross-attention cache. The
  first greedy step (the decoder start token) is this graph, run once per source.
- `decoder_with_past.onnx`: the decoder alone for the new positions, given both caches; it returns the
  logits and the grown self-attention cache. The cross-attention cache, computed once from the encoder
  output, is passed back unchanged every step.

Two files rather than one merged graph with an If node: each is a plain graph torch.onnx traces and ONNX
Runtime runs without subgraphs. Both are traced through wrappers that fill a transformers
`EncoderDecoderCache` from flat tensors (cross-attention marked computed, so its keys and values are taken
from the cache, not recomputed), as export_cache.py does for causal LMs. The export is verified by greedy
decoding the calibration batch on ONNX Runtime along torch's greedy path: every step's logits against
torch's, and the greedy tokens equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import BadInput
from studio.evaluation.onnx_cache import SELF, Seq2SeqCacheLayout

if TYPE_CHECKING:
    from studio.families import Batch, Family
    from studio.techniques.base import RunContext
    from studio.techniques.onnx.export import ExportOnnxParams

TRACE_PAST = 3  # past decoder positions of the traced decoder call: a non-zero past, so it is traced
TRACE_NEW = 2  # new positions of the traced decoder call: more than one, so no one-position shortcut is baked
VERIFY_TOKENS = 8  # greedy steps compared with torch after the export
DECODER_INPUTS = ["decoder_input_ids", "encoder_attention_mask"]


def empty_cache(config: Any) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))


def layer_tensors(cache: Any, layers: int) -> list[Any]:
    """A filled EncoderDecoderCache as flat tensors, per layer: self key, self value, cross key, cross value
    (the order of `Seq2SeqCacheLayout.prefill_outputs`)."""
    own, cross = cache.self_attention_cache.layers, cache.cross_attention_cache.layers
    return [t for i in range(layers) for t in (own[i].keys, own[i].values, cross[i].keys, cross[i].values)]


def filled_cache(config: Any, past: tuple[Any, ...], layers: int) -> Any:
    """An EncoderDecoderCache holding flat past tensors (the order `layer_tensors` writes). The cross
    caches are filled before the EncoderDecoderCache is made, which marks each layer's as computed."""
    from transformers import DynamicCache, EncoderDecoderCache

    own, cross = DynamicCache(config=config), DynamicCache(config=config)
    for i in range(layers):
        own.update(past[4 * i], past[4 * i + 1], i)
        cross.update(past[4 * i + 2], past[4 * i + 3], i)
    return EncoderDecoderCache(own, cross)


def cache_layout(module: Any) -> Seq2SeqCacheLayout:
    """The caches a real forward pass of the module fills (decoder layers, heads, head dim, dtype)."""
    import torch

    config = getattr(module, "config", None)
    if config is None or not getattr(config, "is_encoder_decoder", False):
        raise BadInput("with_cache needs a transformers encoder-decoder model (a module with a config)")
    cache = empty_cache(config)
    ids = torch.ones((1, 2), dtype=torch.long)
    with torch.no_grad():
        module(input_ids=ids, decoder_input_ids=ids, past_key_values=cache, use_cache=True)
    layers = list(getattr(cache.self_attention_cache, "layers", []) or [])
    if not layers or getattr(layers[0], "keys", None) is None:
        raise BadInput("with_cache: the model did not fill a transformers EncoderDecoderCache")
    _, heads, _, head_dim = layers[0].keys.shape
    dtype = str(layers[0].keys.dtype).removeprefix("torch.")
    return Seq2SeqCacheLayout(layers=len(layers), heads=int(heads), head_dim=int(head_dim), dtype=dtype)


def prefill_wrapper(module: Any, layout: Seq2SeqCacheLayout, names: list[str]) -> Any:
    """(input_ids, attention_mask, decoder_input_ids) in `names` order -> (logits, both caches flat)."""
    import torch

    config = module.config

    class Prefill(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = empty_cache(config)
            out = self.model(
                **dict(zip(names, args, strict=True)), past_key_values=cache, use_cache=True, return_dict=True
            )
            return (out.logits, *layer_tensors(out.past_key_values, layout.layers))

    return Prefill().eval()


def decoder_wrapper(module: Any, layout: Seq2SeqCacheLayout) -> Any:
    """(decoder_input_ids, encoder_attention_mask, past self/cross keys and values) -> (logits, the grown
    self-attention cache). The encoder output is not an input: cross-attention reads its cache, and the
    decoder is handed zeros of the encoder output's shape only so it takes its cross-attention path."""
    import torch

    config = module.config
    width = int(getattr(config, "d_model", 0) or getattr(config, "hidden_size", 0))

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            ids, encoder_mask, past = args[0], args[1], args[2:]
            cache = filled_cache(config, past, layout.layers)
            hidden = past[2].new_zeros((ids.shape[0], encoder_mask.shape[1], width))
            out = self.model(
                attention_mask=encoder_mask,
                decoder_input_ids=ids,
                encoder_outputs=(hidden,),
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
            )
            own = out.past_key_values.self_attention_cache.layers
            return (out.logits, *(t for i in range(layout.layers) for t in (own[i].keys, own[i].values)))

    return Decoder().eval()


def prefill_dims(layout: Seq2SeqCacheLayout) -> dict[str, dict[int, str]]:
    dims: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "decoder_input_ids": {0: "batch", 1: "decoder_sequence"},
        "logits": {0: "batch", 1: "decoder_sequence"},
    }
    for name in layout.prefill_outputs:
        dims[name] = {0: "batch", 2: "decoder_sequence" if f".{SELF}." in name else "sequence"}
    return dims


def decoder_dims(layout: Seq2SeqCacheLayout) -> dict[str, dict[int, str]]:
    dims: dict[str, dict[int, str]] = {
        "decoder_input_ids": {0: "batch", 1: "decoder_sequence"},
        "encoder_attention_mask": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "decoder_sequence"},
    }
    for name in layout.decoder_inputs:
        dims[name] = {0: "batch", 2: "past_decoder_sequence" if f".{SELF}." in name else "sequence"}
    dims.update({n: {0: "batch", 2: "total_decoder_sequence"} for n in layout.decoder_outputs})
    return dims


def decoder_trace_args(batch: Batch, layout: Seq2SeqCacheLayout, dtype: Any) -> tuple[Any, ...]:
    """TRACE_NEW decoder positions after a seeded random past of TRACE_PAST, over the batch's sources."""
    import torch

    ids = batch.inputs["input_ids"]
    mask = batch.inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    n, source = ids.shape
    generator = torch.Generator().manual_seed(0)
    new = torch.randint(1, 100, (n, TRACE_NEW), generator=generator)
    past = []
    for _ in range(layout.layers):
        for positions in (TRACE_PAST, TRACE_PAST, source, source):
            shape = (n, layout.heads, positions, layout.head_dim)
            past.append(torch.randn(shape, generator=generator).to(dtype))
    return (new, mask, *past)


def export_graphs(
    module: Any,
    layout: Seq2SeqCacheLayout,
    names: list[str],
    trace_args: tuple[Any, ...],
    trace_batch: Batch,
    family: Family,
    params: ExportOnnxParams,
    out_dir: Path,
    path: Path,
    ctx: RunContext,
) -> None:
    """Write `path` (model.onnx) and the decoder graph beside it; each is written whole, then renamed."""
    from studio.checkpoints.onnx_graph import onnx_size
    from studio.techniques.onnx.export import export_graph

    outputs = ["logits", *layout.prefill_outputs]
    wrapper = prefill_wrapper(module, layout, names)
    export_graph(wrapper, trace_args, names, family, params, out_dir, path, outputs, prefill_dims(layout))
    dtype = next(module.parameters()).dtype
    args = decoder_trace_args(trace_batch, layout, dtype)
    inputs = [*DECODER_INPUTS, *layout.decoder_inputs]
    outputs = ["logits", *layout.decoder_outputs]
    decoder = out_dir / layout.decoder
    export_graph(
        decoder_wrapper(module, layout), args, inputs, family, params, out_dir, decoder, outputs,
        decoder_dims(layout),
    )  # fmt: skip
    ctx.log(f"wrote {decoder.name} ({onnx_size(decoder) / 1e6:.1f} MB): the decoder step with both caches")


def torch_greedy(module: Any, batch: Batch, steps: int) -> tuple[Any, list[Any]]:
    """Torch's greedy tokens [batch, steps] over the batch's (padded) sources, and each step's last logits."""
    import torch

    ids = batch.inputs["input_ids"]
    mask = batch.inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    config = module.config
    start = (
        config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
    )
    cache = empty_cache(config)
    token = torch.full((len(ids), 1), int(start or 0), dtype=torch.long)
    tokens, logits = [], []
    with torch.no_grad():
        encoded = module.get_encoder()(input_ids=ids, attention_mask=mask)
        for _ in range(steps):
            out = module(
                attention_mask=mask,
                encoder_outputs=encoded,
                decoder_input_ids=token,
                past_key_values=cache,
                use_cache=True,
            )
            last = out.logits[:, -1].float()
            token = last.argmax(-1)[:, None]
            tokens.append(token[:, 0])
            logits.append(last)
    return torch.stack(tokens, dim=1), logits


def verify_greedy(
    module: Any, path: Path, batch: Batch, tolerance: float, ctx: RunContext, steps: int = VERIFY_TOKENS
) -> float:
    """Greedy-decode the batch in torch, then on ONNX Runtime fed torch's tokens (so one early difference
    does not hide the rest): fails when a step's logits are far from torch's or the greedy tokens differ
    by more than a near-tie the rounding may flip."""
    import numpy as np
    import torch

    from studio.evaluation.onnx_generation import OnnxSeq2SeqLoop
    from studio.techniques.onnx.export import FAIL_FACTOR

    expected, reference = torch_greedy(module, batch, steps)
    loop = OnnxSeq2SeqLoop(path)
    mask = batch.inputs.get("attention_mask")
    last, state = loop.start(batch.inputs["input_ids"], mask)
    diff, scale, flips = 0.0, 0.0, 0
    for k, want in enumerate(reference):
        got = last.numpy()
        diff = max(diff, float(np.abs(got - want.numpy()).max()))
        scale = max(scale, float(want.abs().max()))
        top2 = torch.topk(want, 2, dim=-1).values
        near_tie = (top2[:, 0] - top2[:, 1]) <= 2 * max(tolerance, diff)
        differ = torch.from_numpy(got).argmax(-1) != expected[:, k]
        if bool((differ & ~near_tie).any()):
            raise BadInput(
                f"the exported graphs' greedy token {k + 1} differs from torch's (largest logit difference "
                f"{diff:.2e})",
                path=path,
            )
        flips += int(differ.sum())
        if k + 1 < len(reference):
            last = loop.advance(expected[:, k], state)
    summary = (
        f"{steps} greedy steps with the cache over {len(expected)} sources: largest logit difference to "
        f"torch {diff:.2e} (tolerance {tolerance:.1e})"
    )
    ctx.metric("onnx_decode_max_abs_diff", diff)
    if diff > FAIL_FACTOR * tolerance or diff > 0.1 * max(scale, 1e-12):
        raise BadInput(
            f"the exported graphs' cache path does not reproduce the torch model: {summary}", path=path
        )
    if flips:
        ctx.log(f"verification: {summary}; {flips} near-tied greedy tokens differ", level="warning")
    else:
        ctx.log(
            f"verified: {summary}; the greedy tokens are torch's",
            level="info" if diff <= tolerance else "warning",
        )
    return diff
