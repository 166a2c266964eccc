"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", ICML 2023): move the difficulty of quantizing activations into the weights, then run the
Linear layers in INT8 (W8A8).

A language model's activations have a few input channels with values 10-100x larger than the rest, in the
same channels for every token; one int8 scale for a token then leaves the other channels a handful of
levels. The weights are smooth. So each input channel j of the Linear layers reading a norm's output is
divided by s_j and the matching weight column multiplied by s_j, which leaves the float model unchanged:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(max|X_j| over the calibration tokens, max|W_j| over the column in every layer of the group; alpha = 0.5
balances both). The 1/s is folded into the norm's weight (and bias), so the quantized model computes no
extra op. Only a norm whose output is read by Linear layers alone can carry it: in pre-norm decoders
(Llama's `input_layernorm` -> q/k/v and `post_attention_layernorm` -> gate/up, GPT-2's `ln_1` -> `c_attn`)
the residual stream bypasses the norm; in a post-norm encoder (BERT) the norm's output *is* the residual
stream, so smoothing it would change the model, and the block applies to causal LMs only. Which Linear
layers read which norm is found on the first calibration window (the very tensor the norm returns reaching
the layer), not from names, and a group with a reader that cannot be scaled (a tied LM head) is left as it
is. After smoothing the block checks that the float model's logits did not move.

Then every chosen Linear layer becomes a `W8A8Linear` (studio/techniques/quantized_layers.py): int8
weights per output channel, int8 activations per token at run time (`dynamic`) or per tensor with a scale
from the calibration maxima (`static`), int32 accumulation. `smooth_only` stops after the smoothing: the
float model then exports to ONNX like the original, for `onnx.quantize_static` to quantize the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register
from studio.techniques.layer_swap import (
    float_weight,
    is_linear,
    module_named,
    select,
    set_submodule,
    shape,
    weight_bytes,
)
from studio.techniques.quantize import check_patterns, exclude_field, refuse_unbuildable, report_swap

if TYPE_CHECKING:
    import torch

# Relative change of the logits the smoothing may cause (float rounding of the rescaled weights).
EQUIVALENCE_TOLERANCE = 1e-3
MIN_SCALE = 1e-5  # the reference implementation's clamp of s, and of the maxima it is computed from


def is_norm(module: Any) -> bool:
    """A normalisation layer with one weight per channel (LayerNorm, Llama's RMSNorm, ...)."""
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("Norm") and getattr(weight, "dim", lambda: 0)() == 1


@dataclasses.dataclass
class Calibration:
    """What one pass over the calibration windows measured: each Linear layer's per-channel input maxima,
    and which norm's output each Linear layer reads (on the first window)."""

    channel_max: dict[str, torch.Tensor]
    groups: dict[str, list[str]]  # norm name -> the Linear layers reading exactly its output


def calibrate(root: Any, windows: Sequence[Any]) -> Calibration:
    """Run the model on every window with hooks on its norms and Linear layers."""
    import inspect

    import torch

    linears = [(n, m) for n, m in root.named_modules() if n and is_linear(m)]
    norms = [(n, m) for n, m in root.named_modules() if n and is_norm(m)]
    channel_max: dict[str, torch.Tensor] = {}
    produced: dict[int, str] = {}  # id of a norm's output tensor (first window) -> the norm
    read: list[tuple[str, int]] = []  # (Linear layer, id of its input tensor) on the first window
    keep: list[Any] = []  # the first window's tensors stay alive, so their ids cannot be reused
    first = [True]

    def on_linear(name: str) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            m = x.abs().to(torch.float32).reshape(-1, x.shape[-1]).amax(dim=0)
            channel_max[name] = torch.maximum(channel_max[name], m) if name in channel_max else m
            if first[0]:
                keep.append(args[0])
                read.append((name, id(args[0])))

        return hook

    def on_norm(name: str) -> Any:
        def hook(_module: Any, _args: tuple[Any, ...], output: Any) -> None:
            if first[0] and isinstance(output, torch.Tensor):
                keep.append(output)
                produced[id(output)] = name

        return hook

    handles = [m.register_forward_pre_hook(on_linear(n)) for n, m in linears]
    handles += [m.register_forward_hook(on_norm(n)) for n, m in norms]
    extra = {"use_cache": False} if "use_cache" in inspect.signature(root.forward).parameters else {}
    try:
        with torch.no_grad():
            for ids in windows:
                root(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
                first[0] = False
    finally:
        for h in handles:
            h.remove()
    groups: dict[str, list[str]] = {}
    for name, key in read:
        norm = produced.get(key)
        if norm is not None and name not in groups.setdefault(norm, []):
            groups[norm].append(name)
    return Calibration(channel_max, groups)


def smoothing_scales(act_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1 - alpha) per input channel; weights are [out, in]."""
    import torch

    w_max = torch.stack([w.detach().abs().to(torch.float32).amax(dim=0) for w in weights]).amax(dim=0)
    s = act_max.clamp(min=MIN_SCALE).pow(alpha) / w_max.clamp(min=MIN_SCALE).pow(1 - alpha)
    return s.clamp(min=MIN_SCALE)


def fold(norm: Any, layers: Sequence[Any], s: torch.Tensor) -> None:
    """Divide the norm's output channels by s and multiply the layers' input columns by s."""
    import torch

    with torch.no_grad():
        norm.weight.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))
        for layer in layers:
            w = float_weight(layer)  # a view for Conv1D, so the stored [in, out] weight changes too
            w.mul_(s.to(w.dtype))


def quantize_w8a8(
    root: Any, names: Sequence[str], input_max: dict[str, Any] | None, progress: Any
) -> tuple[int, int]:
    """Swap each named Linear layer for a W8A8Linear; static activation scales from `input_max` (the
    largest |input| of each layer on calibration data), per token when it is None. (bytes before, after)"""
    from studio.techniques.quantized_layers import W8A8Linear

    before = after = 0
    for i, name in enumerate(names):
        old = root.get_submodule(name)
        limit = None if input_max is None else float(input_max[name])
        new = W8A8Linear.from_float(float_weight(old), old.bias, limit)
        before, after = before + weight_bytes(old), after + weight_bytes(new)
        set_submodule(root, name, new)
        progress((i + 1) / len(names), f"quantized {name}")
    return before, after


def logits_of(root: Any, ids: Any) -> Any:
    import inspect

    import torch

    extra = {"use_cache": False} if "use_cache" in inspect.signature(root.forward).parameters else {}
    with torch.no_grad():
        out = root(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
    return (out.logits if hasattr(out, "logits") else out[0]).to(torch.float32)


class SmoothQuantParams(Params):
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="migration strength: 0 leaves the activations as they are, 1 moves all of their range "
        "into the weights; 0.5 balances both (the paper's default for most models)",
    )
    smooth_only: bool = Field(
        False,
        description="only smooth (the float model, unchanged in its outputs, with activations that quantize "
        "well): for export.onnx followed by onnx.quantize_static",
    )
    activations: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="int8 activation scales: 'dynamic' per token, measured at run time; 'static' one per "
        "tensor from the calibration maxima (no reduction at run time, values beyond them saturate)",
    )
    calibration_examples: int = Field(
        128,
        ge=1,
        description="how many calibration examples are read; their text is joined and cut into windows of "
        "the recipe's sequence length",
    )
    exclude: list[str] = exclude_field()

    _patterns = field_validator("exclude")(check_patterns)


@register
class SmoothQuant(Technique[SmoothQuantParams]):
    id = "quantize.smoothquant"
    title = "SmoothQuant W8A8"
    category = "quantization"
    input_kind = "torch"
    output_kind = "torch"
    families = ("causal-lm",)
    description = (
        "SmoothQuant (Xiao et al. 2023): divides the activation channels with outliers by a per-channel "
        "factor folded into the norm before them, and multiplies the weights by it (the float model is "
        "unchanged), then quantizes the Linear layers to INT8 weights and INT8 activations (per token at "
        "run time, or per tensor from calibration) computed with int32 accumulation. With smooth_only the "
        "smoothed float model is kept, to export to ONNX and quantize statically there. Pre-norm decoders "
        "(Llama, Mistral, Qwen2, GPT-2). Needs calibration text."
    )
    Params = SmoothQuantParams

    def check(self, params: SmoothQuantParams, model: LoadedModel) -> None:
        super().check(params, model)
        refuse_unbuildable(self.id, model)
        if model.module is not None:
            select(model.module, params.exclude, self.id, embeddings=False)

    def run(self, state: StageState, params: SmoothQuantParams, ctx: RunContext) -> StageState:
        from studio.techniques import layerwise

        p = params
        root = state.module
        kind = type(root).__name__
        sel = select(root, p.exclude, self.id, embeddings=False)
        examples = list(ctx.calibration)[: p.calibration_examples]
        if not examples:
            raise BadInput(
                f"{self.id} measures the activations on calibration text and the run has none: set "
                "data.calibration_examples (or give calibration data)"
            )
        windows = layerwise.calibration_windows(state.model, examples, ctx.sequence_length, 1, self.id)
        ctx.progress(0.0, f"calibrating on {sum(int(w.shape[1]) for w in windows)} tokens")
        cal = calibrate(root, windows)
        chosen = set(sel.chosen)
        groups = {n: g for n, g in cal.groups.items() if all(m in chosen for m in g)}
        skipped = sorted(set(cal.groups) - set(groups))
        if not groups:
            raise BadInput(
                f"{self.id}: this {kind} ({state.model.family}) has no norm layer whose output is read "
                "only by Linear layers that can be quantized, so there is nothing to fold the smoothing "
                "into (it applies to pre-norm decoders such as Llama, Mistral, Qwen2 and GPT-2)"
            )
        reference = logits_of(root, windows[0])
        for norm_name, names in groups.items():
            layers = [root.get_submodule(n) for n in names]
            act_max = cal.channel_max[names[0]]
            s = smoothing_scales(act_max, [float_weight(m) for m in layers], p.alpha)
            fold(root.get_submodule(norm_name), layers, s)
            for n in names:  # what the layers now read
                cal.channel_max[n] = cal.channel_max[n] / s
        drift = float((logits_of(root, windows[0]) - reference).abs().max() / reference.abs().max())
        ctx.metric("smoothing_logit_drift", drift)
        if drift > EQUIVALENCE_TOLERANCE:
            raise BadInput(
                f"{self.id}: smoothing changed this {kind}'s float outputs (relative {drift:.2g}); a norm's "
                "output is read by more than its Linear layers (a post-norm model), which this block "
                "cannot smooth"
            )
        smoothed = sorted(n for g in groups.values() for n in g)
        ctx.log(
            f"{self.id}: smoothed {len(smoothed)} layers after {len(groups)} norms with alpha {p.alpha} "
            f"(float logits moved by {drift:.1e} relative)"
            + (f"; left unsmoothed (a reader cannot be scaled): {', '.join(skipped)}" if skipped else "")
        )
        record: dict[str, Any] = {
            "technique": self.id,
            "alpha": p.alpha,
            "smooth_only": p.smooth_only,
            "activations": p.activations,
            "smoothed": sorted(groups),
            "modules": [],
        }
        if not p.smooth_only:
            maxima = None
            if p.activations == "static":
                maxima = {n: cal.channel_max[n].max() for n in sel.chosen if n in cal.channel_max}
                unseen = [n for n in sel.chosen if n not in cal.channel_max]
                if unseen:
                    raise BadInput(
                        f"{self.id}: static activation scales need every layer called on the calibration "
                        f"text; never called: {', '.join(unseen[:3])} (exclude them or use dynamic)"
                    )
            before, after = quantize_w8a8(root, sel.chosen, maxima, ctx.progress)
            report_swap(ctx, self.id, sel, before, after)
            record["modules"] = list(sel.chosen)
        return dataclasses.replace(state, module=root, transforms=[*state.transforms, record])

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        """The smoothing lives in the saved weights; quantized layers are rebuilt empty (the activation
        scales, static or not, arrive with the state dict)."""
        from studio.techniques.quantized_layers import W8A8Linear

        for name in record.get("modules", []):
            old = module_named(module, name, cls.id)
            if not is_linear(old):
                raise BadInput(f"{cls.id}: cannot rebuild layer '{name}': it is not a Linear layer")
            in_features, out_features = shape(old)
            set_submodule(module, name, W8A8Linear(in_features, out_features, old.bias is not None))
        return module
