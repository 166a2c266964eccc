"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
MLSys 2024): before round-to-nearest, scale up the input channels that carry large activations.

A Linear layer's output error from rounding its weights is dominated by the few input channels with large
activations. Multiplying those weight columns by s > 1 (and the inputs by 1/s) leaves the float layer
unchanged but gives those columns relatively finer steps of the group's grid. Per group of layers that
read one input, s = mean|x|^alpha over the calibration tokens (normalised so that sqrt(max * min) = 1),
with alpha chosen on a grid of 20 values in [0, 1) to minimise the error of the decoder block's output
(every layer of the group rounded with its scaled weights, the rest of the block float) on calibration
windows. The 1/s on the inputs is folded into
the operation that produces them, so the quantized model computes no extra op:

- q/k/v read `input_layernorm`: its weight is divided by s;
- gate/up read `post_attention_layernorm`: the same;
- down reads act(gate) * up: `up_proj`'s output rows are divided by s;
- o reads the attention values: when v_proj's outputs feed o_proj column for column (no grouped-query
  attention), v_proj's rows are divided by s; with grouped-query attention o_proj is left unscaled.

That folding needs to know which operation feeds which layer, so AWQ applies to Llama-style decoder blocks
(Llama, Mistral, Qwen2: `input_layernorm`, `self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`,
`mlp.{gate,up,down}_proj`) and refuses other families. AutoAWQ's weight-clipping search is not done here.
Each block is scaled with its float inputs and then stored exactly as `quantize.weight_only` stores it (the
same packed codes, size and reload); the quantized block's outputs feed the next block
(studio.techniques.layerwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.techniques.base import RunContext, StageState, Technique, register
from studio.techniques.gptq import CalibratedWeightParams, calibration_texts, check_widths
from studio.techniques.layer_swap import Selection, is_linear, select, set_submodule, weight_bytes
from studio.techniques.quantize import (
    WeightOnly,
    WeightOnlyParams,
    refuse_unbuildable,
    report_swap,
)

if TYPE_CHECKING:
    import torch

ALPHAS = 20  # grid points of alpha in [0, 1), as in the paper's reference implementation
# Calibration windows the block output error is measured on (4 measured too few: it overfits).
SEARCH_WINDOWS = 8
# (the operation producing the input, the layers reading it), relative to a decoder block.
SCALED_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
REQUIRED = ("input_layernorm", "post_attention_layernorm", *(n for _, g in SCALED_GROUPS for n in g))


def scales_for(magnitude: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = magnitude^alpha, normalised to sqrt(max * min) = 1 (the reference implementation's rule)."""
    s = magnitude.clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """What round-to-nearest storage (WeightOnlyLinear) makes of a weight [out, in], as float."""
    from studio.techniques.quantized_layers import WeightOnlyLinear

    layer = WeightOnlyLinear.from_float(weight.detach(), None, bits, group_size, symmetric)
    return layer.dequantize(weight.dtype)


def block_error(block: Any, calls: Sequence[Any], reference: Sequence[torch.Tensor]) -> float:
    """Squared error of the block's outputs against the float block's, summed over the windows."""
    import torch

    total = 0.0
    with torch.no_grad():
        for call, ref in zip(calls, reference, strict=True):
            y = block(*call.args, **call.kwargs)
            y = y[0] if isinstance(y, tuple) else y
            total += float(((y.to(torch.float32) - ref) ** 2).sum())
    return total


def search_scales(
    block: Any,
    producer: Any,
    layers: Sequence[Any],
    magnitude: torch.Tensor,
    calls: Sequence[Any],
    reference: Sequence[torch.Tensor],
    storage: WeightOnlyParams,
) -> tuple[torch.Tensor, float, float, float]:
    """(best s, its alpha, the block's output error with it, the error without scaling) for the layers
    reading one input: each candidate scales the layers' columns by s and the producer by 1/s, rounds the
    layers to the storage grid, and runs the block on the search windows. The block is left as it was."""
    import torch

    saved = [producer.weight.detach().clone(), *(m.weight.detach().clone() for m in layers)]
    saved_bias = None if getattr(producer, "bias", None) is None else producer.bias.detach().clone()
    group = storage.group_for(int(layers[0].weight.shape[1]))

    def restore() -> None:
        with torch.no_grad():
            producer.weight.copy_(saved[0])
            if saved_bias is not None:
                producer.bias.copy_(saved_bias)
            for m, w in zip(layers, saved[1:], strict=True):
                m.weight.copy_(w)

    def error(s: torch.Tensor) -> float:
        restore()
        with torch.no_grad():
            fold_inverse(producer, s)
            for m in layers:
                scaled = m.weight * s.to(m.weight.dtype)
                m.weight.copy_(fake_quantize(scaled, storage.bits, group, storage.symmetric))
        return block_error(block, calls, reference)

    try:
        plain = error(torch.ones_like(magnitude))
        best = (torch.ones_like(magnitude), 0.0, plain)
        for i in range(1, ALPHAS):
            alpha = i / ALPHAS
            s = scales_for(magnitude, alpha)
            e = error(s)
            if e < best[2]:
                best = (s, alpha, e)
    finally:
        restore()
    return best[0], best[1], best[2], plain


def fold_inverse(producer: Any, s: torch.Tensor) -> None:
    """Divide the producer's output channels by s: a norm's weight, or a Linear layer's rows (and bias)."""
    import torch

    with torch.no_grad():
        if isinstance(producer, torch.nn.Linear):
            producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
        else:
            producer.weight.div_(s.to(producer.weight.dtype))


class AWQParams(CalibratedWeightParams):
    """AWQ searches its scales itself: the storage and the calibration are all it is told."""


@register
class AWQ(Technique[AWQParams]):
    id = "quantize.awq"
    title = "AWQ INT4 / INT8"
    category = "quantization"
    input_kind = "torch"
    output_kind = "torch"
    description = (
        "AWQ (Lin et al. 2024): before round-to-nearest 4- or 8-bit weight-only quantization, the input "
        "channels with large activations on the calibration text get their weight columns scaled up (and the "
        "operation before them scaled down by the same factor, so the float model is unchanged), which "
        "protects the weights that matter most. Scales are searched per group of layers for the least output "
        "error. Llama-style decoder blocks only (Llama, Mistral, Qwen2). Stored like quantize.weight_only "
        "(same size, same reload). Needs calibration text."
    )
    Params = AWQParams

    def check(self, params: AWQParams, model: LoadedModel) -> None:
        super().check(params, model)
        refuse_unbuildable(self.id, model)
        if model.module is not None:
            self._plan(model.module, params)

    def _plan(self, root: Any, p: AWQParams) -> tuple[Selection, str, Any]:
        """The layers to quantize and the decoder blocks, checked before anything changes."""
        from studio.techniques import layerwise

        sel = select(root, p.exclude, self.id, embeddings=False)
        found = layerwise.decoder_blocks(root, is_linear)
        if found is None:
            raise BadInput(f"{self.id} needs a model made of repeated decoder blocks; this one has none")
        prefix, blocks = found
        missing = [n for n in REQUIRED if not has_submodule(blocks[0], n)]
        if missing:
            raise BadInput(
                f"{self.id} applies to Llama-style decoder blocks (Llama, Mistral, Qwen2); this model's "
                f"{type(blocks[0]).__name__} has no {', '.join(missing[:3])}"
            )
        check_widths(root, sel.chosen, p, self.id)
        return sel, prefix, blocks

    def run(self, state: StageState, params: AWQParams, ctx: RunContext) -> StageState:
        import torch

        from studio.techniques import layerwise

        p = params.with_budget(state, ctx, self.id, "awq")
        root = state.module
        sel, prefix, blocks = self._plan(root, p)
        chosen = set(sel.chosen)
        needed = max(int(root.get_submodule(n).weight.shape[1]) for n in sel.chosen)
        examples = calibration_texts(list(ctx.calibration), p.calibration_examples)
        windows = layerwise.calibration_windows(state.model, examples, ctx.sequence_length, needed, self.id)
        calls = layerwise.capture_first_block(root, blocks[0], windows)
        storage = p.storage()
        quantized: list[str] = []
        before = after = 0
        gains = []
        for b, block in enumerate(blocks):
            pre = f"{prefix}.{b}."
            magnitudes: dict[str, torch.Tensor] = {}
            for _, group in SCALED_GROUPS:  # every group's input statistics, from the block still in float
                sums: list[torch.Tensor] = []

                def collect(x: Any, into: list[Any] = sums) -> None:
                    into.append(abs_sum(x))

                layerwise.feed_inputs(block, block.get_submodule(group[0]), calls, collect)
                tokens = sum(int(c.hidden().numel() // c.hidden().shape[-1]) for c in calls)
                magnitudes[group[0]] = torch.stack(sums).sum(dim=0) / tokens
            search = calls[:SEARCH_WINDOWS]
            reference = [o.hidden().to(torch.float32) for o in layerwise.run_block(block, search)]
            for producer, group in SCALED_GROUPS:
                prod = block.get_submodule(producer)
                layers = [block.get_submodule(n) for n in group]
                if prod.weight.shape[0] != layers[0].weight.shape[1]:
                    continue  # grouped-query attention: v_proj's outputs are not o_proj's inputs one to one
                if not any(pre + n in chosen for n in group):
                    continue
                s, _alpha, err, plain = search_scales(
                    block, prod, layers, magnitudes[group[0]], search, reference, storage
                )
                gains.append(err / plain if plain else 1.0)
                with torch.no_grad():
                    for m in layers:
                        m.weight.mul_(s.to(m.weight.dtype))
                fold_inverse(prod, s)
            with torch.no_grad():
                for name in [n for _, g in SCALED_GROUPS for n in g]:
                    if pre + name not in chosen:
                        continue
                    old = block.get_submodule(name)
                    new = _weight_only(old, storage)
                    before, after = before + weight_bytes(old), after + weight_bytes(new)
                    set_submodule(block, name, new)
                    quantized.append(pre + name)
                    ctx.progress(len(quantized) / len(sel.chosen), f"quantized {pre + name}")
            if b < len(blocks) - 1:
                calls = layerwise.run_block(block, calls)
        outside = [n for n in sel.chosen if n not in set(quantized)]
        if outside:
            ctx.log(f"{self.id}: kept float, outside the decoder blocks: {', '.join(outside)}")
        if gains:
            ctx.log(
                f"{self.id}: the searched scales leave {sum(gains) / len(gains):.2f} of round-to-nearest's "
                "output error on the calibration inputs, on average over the scaled groups"
            )
        report_swap(ctx, self.id, Selection(quantized, sel.excluded + outside, sel.tied), before, after)
        record = {
            "technique": self.id,
            "bits": p.bits,
            "group_size": p.group_size,
            "symmetric": p.symmetric,
            "modules": quantized,
        }
        return dataclasses.replace(state, module=root, transforms=[*state.transforms, record])

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        # The scales live in the saved weights (norms and Linear layers); the storage is weight-only's.
        return WeightOnly.restore(module, record)


def abs_sum(x: Any) -> Any:
    """sum |x| over the tokens of one window's input [..., in], in float32."""
    import torch

    return x.detach().abs().to(torch.float32).reshape(-1, x.shape[-1]).sum(dim=0)


def has_submodule(block: Any, name: str) -> bool:
    try:
        block.get_submodule(name)
    except AttributeError:
        return False
    return True


def _weight_only(old: Any, storage: WeightOnlyParams) -> Any:
    from studio.techniques.quantized_layers import WeightOnlyLinear

    in_features = int(old.weight.shape[1])
    return WeightOnlyLinear.from_float(
        old.weight, old.bias, storage.bits, storage.group_for(in_features), storage.symmetric
    )
