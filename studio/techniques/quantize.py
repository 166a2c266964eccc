"""Quantization of a torch module's Linear layers: dynamic INT8 and INT8 / INT4 weight-only.

Both techniques swap layers for the ones in studio/techniques/quantized_layers.py and record which layers
they swapped, so `restore` swaps the same layers of a freshly built model before its weights are loaded.
The swapped layers hold plain int8 / uint8 codes and float scales: a quantized variant saves to
model.safetensors and reopens without unpickling anything.

Why these implementations (measured on this project's CPU, 2 cores with AVX512-VNNI, torch 2.13,
MiniLM at batch 32 x sequence 128):

- dynamic INT8: float32 ~860 ms; FBGEMM dynamic linear (what `torch.ao.quantization.quantize_dynamic`
  installs) ~400-460 ms with per-channel weights; torchao's `Int8DynamicActivationInt8WeightConfig`
  ~870 ms, because in eager mode its activation quantization runs as a dozen separate elementwise ops
  (it is written to be fused by `torch.compile`). FBGEMM is the fast one, so its kernel is used, in a
  small layer of our own that stores plain tensors (`quantize_dynamic`'s modules save deprecated quantized
  tensors and a tuple, which safetensors cannot hold) and that keeps full 8-bit activations on
  VNNI CPUs (mean cosine 0.994 instead of 0.978, see DynamicInt8Linear).
- weight-only: torchao 0.18's INT4 weight-only tensors do not run on CPU (its packing formats need
  CUDA, XPU or the `mslk` kernels) and its int4 "intx" tensors keep one code per byte, so the file would
  not shrink; round-to-nearest group-wise codes packed two per byte in plain uint8 tensors do.

Families: any torch model built of `torch.nn.Linear` layers (and transformers' `Conv1D`, GPT-2's
transposed Linear). Which layers are swapped (exactly those types; tied weights stay float) and the
quantized layer built for each are decided in studio/techniques/layer_swap.py, shared with the
mixed-precision search so that it measures the very layers these blocks build.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register
from studio.techniques.layer_swap import (
    DEFAULT_INT4_GROUP,
    LayerScheme,
    Selection,
    empty_layer,
    group_misfit,
    group_width,
    input_width,
    is_linear,
    module_named,
    select,
    set_submodule,
    swap_layers,
)

# Config fields giving the input widths of a transformer's Linear layers (name -> description).
WIDTH_FIELDS = {
    "hidden_size": "hidden size",
    "n_embd": "hidden size",
    "d_model": "model width",
    "intermediate_size": "FFN width",
    "n_inner": "FFN width",
    "ffn_dim": "FFN width",
    "encoder_ffn_dim": "encoder FFN width",
    "decoder_ffn_dim": "decoder FFN width",
}


def exclude_field() -> Any:
    return Field(
        default_factory=list,
        description="layers kept in floating point: module names (e.g. 'encoder.layer.0.output.dense'), "
        "a module prefix that covers everything inside it (e.g. 'pooler'), or glob patterns "
        "(e.g. '*.output.dense'); each entry must match at least one layer",
    )


def _mixed_precision_field() -> Any:
    return Field(
        None,
        gt=0.0,
        lt=1.0,
        description="mixed precision: a fidelity target (mean cosine to the original for encoders, 1 - the "
        "output divergence otherwise) measured on up to 64 calibration examples. Every layer's sensitivity "
        "is measured (all but one quantized) and layers are kept in floating point, most fidelity won back per "
        "parameter first, until the target is met; see `model-studio sensitivity`. Empty: quantize every layer "
        "that is not excluded",
    )


def _max_bits_field() -> Any:
    return Field(
        None,
        gt=0.0,
        le=16.0,
        description="mixed precision: a size budget, the most bits per weight on average over the quantized "
        "layers (scales and zero points counted; a layer kept float counts its float bits). Layers are kept "
        "float, most fidelity won back per extra bit first, while the average stays within it; with "
        "`mixed_precision` too, only until that fidelity is reached. It cannot be below what the storage "
        "itself takes (4 bits with float32 scales per 128 weights: 4.25). Empty: no budget",
    )


def mixed_precision_exclusions(
    ctx: RunContext, technique: str, root: Any, p: Any, *, embeddings: bool = False, **scheme: Any
) -> list[str]:
    """The layers `mixed_precision` (a fidelity target) and `max_bits_per_weight` (a size budget) keep
    float, measured on a copy of `root` with the same `scheme`; logged and kept as metrics there."""
    target = getattr(p, "mixed_precision", None)
    budget = getattr(p, "max_bits_per_weight", None)
    if target is None and budget is None:
        return []
    from studio.techniques.mixed_precision import TorchScheme, mixed_precision

    torch_scheme = TorchScheme(root, embeddings=embeddings, exclude=p.exclude, **scheme)
    choice = mixed_precision(ctx, torch_scheme, target, technique, budget=budget)
    if not choice.met:
        within = "" if budget is None else f" within {budget:g} bits per weight"
        ctx.log(
            f"{technique}: fidelity {choice.fidelity:.5f} stays below the target {target} "
            f"even with {len(choice.excluded)} layers float{within}",
            level="warning",
        )
    return choice.excluded


def _selection(
    ctx: RunContext, technique: str, root: Any, p: DynamicInt8Params | WeightOnlyParams, **scheme: Any
) -> Selection:
    """The layers to quantize: every candidate but the excluded ones and those mixed precision keeps
    float."""
    exclude = list(p.exclude)
    exclude += mixed_precision_exclusions(ctx, technique, root, p, embeddings=p.embeddings, **scheme)
    return select(root, exclude, technique, embeddings=p.embeddings)


def check_patterns(value: list[str]) -> list[str]:
    for pattern in value:
        if not pattern.strip():
            raise ValueError("an exclude entry is empty")
    return value


def refuse_unbuildable(technique: str, model: LoadedModel) -> None:
    if model.format in ("torchscript", "exported-program", "onnx"):
        raise BadInput(
            f"{technique} swaps layers of a Python torch module; a {model.format} model has no layers to swap "
            "(quantize a Hugging Face checkpoint, or quantize after export with onnx.quantize_dynamic)"
        )


def report_swap(ctx: RunContext, technique: str, sel: Selection, bytes_before: int, bytes_after: int) -> None:
    ctx.log(f"{technique}: {len(sel.chosen)} layers quantized, {len(sel.excluded)} excluded")
    if sel.tied:
        ctx.log(
            f"{technique}: kept float because their weights are tied to another layer: {', '.join(sel.tied)}"
        )
    ctx.metric("quantized_layers", len(sel.chosen))
    ctx.metric("quantized_weight_bytes_before", bytes_before)
    ctx.metric("quantized_weight_bytes_after", bytes_after)


def _restore(module: Any, record: dict[str, Any], scheme: LayerScheme, technique: str) -> Any:
    """Swap the layers a variant's record names for empty quantized ones, before its weights are loaded."""
    for key, what in (("modules", "layer"), ("embeddings", "embedding")):
        for name in record.get(key, []):
            old = module_named(module, name, technique)
            try:
                new = empty_layer(old, scheme)
            except ValueError as exc:
                raise BadInput(f"{technique}: cannot rebuild {what} '{name}': {exc}") from exc
            set_submodule(module, name, new)
    return module


# ---------------------------------------------------------------------------------------------- dynamic INT8


class DynamicInt8Params(Params):
    per_channel: bool = Field(
        True,
        description="one weight scale per output channel (more accurate) instead of one per layer",
    )
    embeddings: bool = Field(
        True,
        description="also store embedding tables as int8 (one scale per row, dequantized on lookup): in "
        "encoders the vocabulary table is often half of the model's size",
    )
    exclude: list[str] = exclude_field()
    mixed_precision: float | None = _mixed_precision_field()

    _patterns = field_validator("exclude")(check_patterns)


@register
class DynamicInt8(Technique[DynamicInt8Params]):
    id = "quantize.dynamic_int8"
    title = "Dynamic INT8"
    category = "quantization"
    input_kind = "torch"
    output_kind = "torch"
    description = (
        "INT8 weights for every Linear layer (and transformers Conv1D), with activations quantized to INT8 "
        "on the fly for each batch, using FBGEMM's int8 matmul: about 4x smaller Linear weights and faster "
        "CPU inference, no calibration data. Embedding tables are stored as int8 too (optional). Layers whose "
        "weight is tied to another (a shared LM head) stay float. CPU only; a later ONNX export is not "
        "supported from this stage (use onnx.quantize_dynamic after export.onnx instead)."
    )
    Params = DynamicInt8Params

    def check(self, params: DynamicInt8Params, model: LoadedModel) -> None:
        super().check(params, model)
        refuse_unbuildable(self.id, model)

    def run(self, state: StageState, params: DynamicInt8Params, ctx: RunContext) -> StageState:
        from studio.techniques.quantized_layers import vnni_available

        p = params
        root = state.module
        if not any(is_linear(m) for m in root.modules()):
            raise BadInput(f"{self.id}: the model has no Linear layer to quantize")
        sel = _selection(ctx, self.id, root, p, scheme="torch-int8", per_channel=p.per_channel)
        linears = [n for n in sel.chosen if is_linear(root.get_submodule(n))]
        embeddings = [n for n in sel.chosen if n not in set(linears)]
        scheme = LayerScheme("int8", per_channel=p.per_channel)
        before, after = swap_layers(root, linears + embeddings, scheme, ctx.progress)
        report_swap(ctx, self.id, sel, before, after)
        ctx.log(
            f"{self.id}: activations use {'8' if vnni_available() else '7 (no VNNI on this CPU)'} bits "
            "with FBGEMM"
        )
        record = {
            "technique": self.id,
            "per_channel": p.per_channel,
            "modules": linears,
            "embeddings": embeddings,
        }
        return dataclasses.replace(state, module=root, transforms=[*state.transforms, record])

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        scheme = LayerScheme("int8", per_channel=bool(record.get("per_channel", True)))
        return _restore(module, record, scheme, cls.id)


# ---------------------------------------------------------------------------------------------- weight-only


class WeightStorageParams(Params):
    """What every weight-only block stores by (round-to-nearest, GPTQ, AWQ): bits, groups, symmetry."""

    bits: Literal[8, 4] = Field(4, description="bits per weight: 8 or 4 (two 4-bit codes per byte)")
    group_size: int | None = Field(
        None,
        description="input columns sharing one scale; must divide every quantized layer's input width. "
        f"Default: {DEFAULT_INT4_GROUP} for 4 bits, the whole row (one scale per output channel) for 8 bits",
    )
    symmetric: bool = Field(
        True,
        description="codes centred on zero (one scale per group); off: a zero point per group too, "
        "which fits skewed weight groups better",
    )
    exclude: list[str] = exclude_field()
    max_bits_per_weight: float | None = _max_bits_field()

    _patterns = field_validator("exclude")(check_patterns)

    @model_validator(mode="after")
    def _budget_above_bits(self) -> WeightStorageParams:
        if self.max_bits_per_weight is not None and self.max_bits_per_weight < self.bits:
            raise ValueError(
                f"max_bits_per_weight {self.max_bits_per_weight:g} is below the {self.bits} bits every "
                "quantized weight takes; raise it or use fewer bits"
            )
        return self

    @field_validator("group_size")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("group_size must be a positive number of input columns")
        return value


class WeightOnlyParams(WeightStorageParams):
    embeddings: bool = Field(
        default=False,
        description="also store embedding tables this way (one scale per group of embedding columns, only "
        "the rows looked up are dequantized): MiniLM's vocabulary table is half its weights, and 4 bits "
        "with groups of 128 cost it about 0.002 of cosine",
    )
    mixed_precision: float | None = _mixed_precision_field()
    clip_search: bool = Field(
        default=False,
        description="round each group on the clipped range (a fraction of its largest |weight|, 1.0 to "
        "0.5) whose codes are closest to the float weights, instead of the full range; stored the same "
        "way. MiniLM, 4-bit encoder layers: fewer of the FFNs' outliers stretch a whole group's step",
    )
    scale_float16: bool = Field(
        default=False,
        description="store the scales as float16 instead of the weights' float32: half their bytes (a "
        "float16 scale is within 0.05% of the float32 one, far below a 4-bit step; the codes are rounded "
        "against the stored scale). MiniLM's 4-bit vocabulary with groups of 128: 0.37 MB -> 0.18 MB",
    )

    def group_for(self, in_features: int) -> int:
        return group_width(self.bits, self.group_size, in_features)

    def layer_scheme(self) -> LayerScheme:
        return LayerScheme(
            "weight-only",
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            scale_float16=self.scale_float16,
        )


def _float_of(layer: Any) -> Any:
    """The float weight [out, in] a Linear (Conv1D) layer or embedding table is quantized from."""
    from studio.techniques.layer_swap import float_weight

    return float_weight(layer) if is_linear(layer) else layer.weight


def _largest_divisor(width: int, at_most: int) -> int:
    g = 1
    while g * 2 <= at_most and width % (g * 2) == 0:
        g *= 2
    return g


def refuse_misfits(root: Any, names: list[str], p: WeightOnlyParams, technique: str) -> None:
    """Every chosen layer is checked before any is changed: a group that does not tile its row, or an odd
    width for 4-bit codes, is refused with the fix."""
    scheme = p.layer_scheme()
    for name in names:
        module = root.get_submodule(name)
        problem = scheme.misfit(module)
        if problem is None:
            continue
        width = input_width(module)
        group = p.group_for(width)
        if not is_linear(module):
            raise BadInput(
                f"{technique}: group_size {group} does not fit the width {width} of embedding "
                f"'{name}' (it must divide it, and 4-bit widths must be even); choose a divisor of "
                f"{width} (e.g. {_largest_divisor(width, group)}) or exclude the table"
            )
        if problem == "indivisible":
            raise BadInput(
                f"{technique}: group_size {group} does not divide the input width {width} "
                f"of layer '{name}'; choose a divisor of {width} (e.g. "
                f"{_largest_divisor(width, group)}) or exclude the layer"
            )
        raise BadInput(
            f"{technique}: layer '{name}' has an odd input width ({width}); 4-bit codes "
            "are packed in pairs: exclude the layer or use bits 8"
        )


@register
class WeightOnly(Technique[WeightOnlyParams]):
    id = "quantize.weight_only"
    title = "Weight-only INT8 / INT4"
    category = "quantization"
    input_kind = "torch"
    output_kind = "torch"
    description = (
        "Stores the weights of every Linear layer (and transformers Conv1D) as 8- or 4-bit integers with one "
        "scale per group of input columns (round-to-nearest, the GPTQ/AWQ storage format): 4 bits with "
        "groups of 128 make Linear weights about 7x smaller. Weights are dequantized in each forward pass, "
        "so the model is smaller on disk and in memory but not faster on CPU. With `embeddings`, embedding "
        "tables are stored the same way (only the rows looked up are dequantized). Layers whose weight is "
        "tied to another (a shared LM head) stay float."
    )
    Params = WeightOnlyParams

    def check(self, params: WeightOnlyParams, model: LoadedModel) -> None:
        super().check(params, model)
        refuse_unbuildable(self.id, model)
        p = params
        if model.config is None or p.exclude:
            return  # excluded layers may be the ones that do not fit: checked layer by layer when run
        config = model.config
        for field, what in WIDTH_FIELDS.items():
            width = getattr(config, field, None)
            if not isinstance(width, int) or width <= 0:
                continue
            group = p.group_for(width)
            problem = group_misfit(width, p.bits, group)
            if problem == "indivisible":
                raise BadInput(
                    f"quantize.weight_only: group_size {group} does not divide the model's {what} "
                    f"({field} = {width}), the input width of the Linear layers that read it; "
                    f"choose a divisor of {width}, e.g. {_largest_divisor(width, group)}"
                )
            if problem == "odd":
                raise BadInput(
                    f"quantize.weight_only: 4-bit codes are packed in pairs but the {what} ({field} = {width}) "
                    "is odd; use bits 8"
                )

    def run(self, state: StageState, params: WeightOnlyParams, ctx: RunContext) -> StageState:
        p = params
        root = state.module
        scheme = {"bits": p.bits, "group_size": p.group_size, "symmetric": p.symmetric}
        sel = _selection(ctx, self.id, root, p, scheme="weight-only", **scheme)
        embeddings = [n for n in sel.chosen if not is_linear(root.get_submodule(n))]
        linears = [n for n in sel.chosen if n not in set(embeddings)]
        refuse_misfits(root, embeddings + linears, p, self.id)
        floats = {n: _float_of(root.get_submodule(n)) for n in sel.chosen} if p.clip_search else {}
        before, after = swap_layers(root, sel.chosen, p.layer_scheme(), ctx.progress)
        if floats:
            from studio.techniques.clip_search import requantize_clipped

            for i, (name, weight) in enumerate(floats.items()):
                set_submodule(root, name, requantize_clipped(root.get_submodule(name), weight))
                ctx.progress((i + 1) / len(floats), f"searched the clipped ranges of {name}")
        report_swap(ctx, self.id, sel, before, after)
        record = {
            "technique": self.id,
            "bits": p.bits,
            "group_size": p.group_size,
            "symmetric": p.symmetric,
            "modules": linears,
        }
        if p.scale_float16:  # absent otherwise: records written before it read the same
            record["scale_float16"] = True
        if embeddings:
            record["embeddings"] = embeddings
        return dataclasses.replace(state, module=root, transforms=[*state.transforms, record])

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        params = WeightOnlyParams(
            bits=record.get("bits", 4),
            group_size=record.get("group_size"),
            symmetric=record.get("symmetric", True),
            scale_float16=bool(record.get("scale_float16", False)),
        )
        return _restore(module, record, params.layer_scheme(), cls.id)
