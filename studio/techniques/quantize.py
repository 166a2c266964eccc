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
transposed Linear). Only layers of exactly those types are swapped (subclasses such as the output
projection of `nn.MultiheadAttention` are read directly by their owners); layers whose weight is tied
to another module (a language-model head sharing the embedding table) stay float.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register

DEFAULT_INT4_GROUP = 128
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


def _exclude_field() -> Any:
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


def _choose_float_layers(ctx: RunContext, technique: str, target: float, **scheme: Any) -> list[str]:
    """The layers mixed precision keeps float (logged and kept as a metric by studio.sensitivity)."""
    from studio.sensitivity import TorchScheme, mixed_precision

    choice = mixed_precision(ctx, TorchScheme(**scheme), target, technique)
    if not choice.met:
        ctx.log(
            f"{technique}: fidelity {choice.fidelity:.5f} stays below the target {target} even with "
            f"{len(choice.excluded)} layers float",
            level="warning",
        )
    return choice.excluded


def _check_patterns(value: list[str]) -> list[str]:
    for pattern in value:
        if not pattern.strip():
            raise ValueError("an exclude entry is empty")
    return value


# ---------------------------------------------------------------------------------------------- layers


def _is_conv1d(module: Any) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _is_linear(module: Any) -> bool:
    import torch

    return type(module) is torch.nn.Linear or _is_conv1d(module)


def _float_weight(module: Any) -> Any:
    """The weight as [out, in], whatever the layer's own layout (Conv1D stores [in, out])."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def _shape(module: Any) -> tuple[int, int]:
    """(in_features, out_features)."""
    out_features, in_features = _float_weight(module).shape
    return int(in_features), int(out_features)


def _tied_parameters(root: Any) -> set[int]:
    """ids of parameters reachable under more than one name (tied embeddings and heads)."""
    seen: dict[int, int] = {}
    for _name, p in root.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def set_submodule(root: Any, name: str, new: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _module_named(root: Any, name: str, technique: str) -> Any:
    try:
        return root.get_submodule(name)
    except AttributeError as exc:
        raise BadInput(
            f"{technique}: the variant's record names layer '{name}', which the rebuilt model does not have"
        ) from exc


@dataclasses.dataclass
class Selection:
    chosen: list[str]
    excluded: list[str]
    tied: list[str]


def _select(root: Any, is_candidate: Any, exclude: Sequence[str], technique: str, what: str) -> Selection:
    """The candidate layers to quantize, minus excluded ones and tied ones; unmatched patterns are errors."""
    tied_ids = _tied_parameters(root)
    candidates = [(n, m) for n, m in root.named_modules() if n and is_candidate(m)]
    if not candidates:
        raise BadInput(f"{technique}: the model has no {what} to quantize")
    names = [n for n, _ in candidates]
    for pattern in exclude:
        if not any(_matches(n, pattern) for n in names):
            examples = ", ".join(f"'{n}'" for n in names[:3])
            raise BadInput(
                f"{technique}: exclude entry '{pattern}' matches no {what} (they are named like {examples})"
            )
    sel = Selection([], [], [])
    for name, module in candidates:
        if any(_matches(name, p) for p in exclude):
            sel.excluded.append(name)
        elif id(getattr(module, "weight", None)) in tied_ids:
            sel.tied.append(name)
        else:
            sel.chosen.append(name)
    if not sel.chosen:
        raise BadInput(f"{technique}: every {what} is excluded or tied; nothing would be quantized")
    return sel


def _refuse_unbuildable(technique: str, model: LoadedModel) -> None:
    if model.format in ("torchscript", "exported-program", "onnx"):
        raise BadInput(
            f"{technique} swaps layers of a Python torch module; a {model.format} model has no layers to swap "
            "(quantize a Hugging Face checkpoint, or quantize after export with onnx.quantize_dynamic)"
        )


def _report(ctx: RunContext, technique: str, sel: Selection, bytes_before: int, bytes_after: int) -> None:
    ctx.log(f"{technique}: {len(sel.chosen)} layers quantized, {len(sel.excluded)} excluded")
    if sel.tied:
        ctx.log(
            f"{technique}: kept float because their weights are tied to another layer: {', '.join(sel.tied)}"
        )
    ctx.metric("quantized_layers", len(sel.chosen))
    ctx.metric("quantized_weight_bytes_before", bytes_before)
    ctx.metric("quantized_weight_bytes_after", bytes_after)


def _nbytes(module: Any) -> int:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    total = sum(t.numel() * t.element_size() for t in tensors)
    if hasattr(module, "unpacked"):  # DynamicInt8Linear keeps its weights packed for FBGEMM
        codes, scales, bias = module.unpacked()
        total += codes.numel() + scales.numel() * 4 + (0 if bias is None else bias.numel() * 4)
    return total


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
    exclude: list[str] = _exclude_field()
    mixed_precision: float | None = _mixed_precision_field()

    _patterns = field_validator("exclude")(_check_patterns)


@register
class DynamicInt8(Technique):
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

    def check(self, params: DynamicInt8Params, model: LoadedModel) -> None:  # type: ignore[override]
        super().check(params, model)
        _refuse_unbuildable(self.id, model)

    def run(self, state: StageState, params: DynamicInt8Params, ctx: RunContext) -> StageState:  # type: ignore[override]
        import torch

        from studio.techniques.quantized_layers import DynamicInt8Linear, Int8Embedding, vnni_available

        p = params
        root = state.module
        if not any(_is_linear(m) for m in root.modules()):
            raise BadInput(f"{self.id}: the model has no Linear layer to quantize")

        def candidate(m: Any) -> bool:
            return _is_linear(m) or (p.embeddings and type(m) is torch.nn.Embedding)

        what = "Linear layer or embedding" if p.embeddings else "Linear layer"
        exclude = list(p.exclude)
        if p.mixed_precision is not None:
            exclude += _choose_float_layers(
                ctx,
                self.id,
                p.mixed_precision,
                module=root,
                scheme="torch-int8",
                per_channel=p.per_channel,
                embeddings=p.embeddings,
                exclude=p.exclude,
            )
        sel = _select(root, candidate, exclude, self.id, what)
        linears = dataclasses.replace(
            sel, chosen=[n for n in sel.chosen if _is_linear(root.get_submodule(n))]
        )
        embeddings = [n for n in sel.chosen if n not in set(linears.chosen)]
        total = len(sel.chosen)
        before = after = 0
        with torch.no_grad():
            for i, name in enumerate(linears.chosen):
                old = root.get_submodule(name)
                layer = DynamicInt8Linear.from_float(_float_weight(old), old.bias, p.per_channel)
                before, after = before + _nbytes(old), after + _nbytes(layer)
                set_submodule(root, name, layer)
                ctx.progress((i + 1) / total, f"quantized {name}")
            for j, name in enumerate(embeddings):
                old = root.get_submodule(name)
                new = Int8Embedding.from_float(old.weight)
                before, after = before + _nbytes(old), after + _nbytes(new)
                set_submodule(root, name, new)
                ctx.progress((len(linears.chosen) + j + 1) / total, f"quantized {name}")
        _report(ctx, self.id, sel, before, after)
        ctx.log(
            f"{self.id}: activations use {'8' if vnni_available() else '7 (no VNNI on this CPU)'} bits "
            "with FBGEMM"
        )
        record = {
            "technique": self.id,
            "per_channel": p.per_channel,
            "modules": linears.chosen,
            "embeddings": embeddings,
        }
        return dataclasses.replace(state, module=root, transforms=[*state.transforms, record])

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        from studio.techniques.quantized_layers import DynamicInt8Linear, Int8Embedding

        per_channel = bool(record.get("per_channel", True))
        for name in record.get("modules", []):
            old = _module_named(module, name, cls.id)
            in_features, out_features = _shape(old)
            set_submodule(
                module, name, DynamicInt8Linear(in_features, out_features, old.bias is not None, per_channel)
            )
        for name in record.get("embeddings", []):
            old = _module_named(module, name, cls.id)
            set_submodule(
                module, name, Int8Embedding(old.num_embeddings, old.embedding_dim, old.weight.dtype)
            )
        return module


# ---------------------------------------------------------------------------------------------- weight-only


class WeightOnlyParams(Params):
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
    embeddings: bool = Field(
        default=False,
        description="also store embedding tables this way (one scale per group of embedding columns, only "
        "the rows looked up are dequantized): MiniLM's vocabulary table is half its weights, and 4 bits "
        "with groups of 128 cost it about 0.002 of cosine",
    )
    exclude: list[str] = _exclude_field()
    mixed_precision: float | None = _mixed_precision_field()

    _patterns = field_validator("exclude")(_check_patterns)

    @field_validator("group_size")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("group_size must be a positive number of input columns")
        return value

    def group_for(self, in_features: int) -> int:
        if self.group_size is not None:
            return self.group_size
        return DEFAULT_INT4_GROUP if self.bits == 4 else in_features


def _largest_divisor(width: int, at_most: int) -> int:
    g = 1
    while g * 2 <= at_most and width % (g * 2) == 0:
        g *= 2
    return g


@register
class WeightOnly(Technique):
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

    def check(self, params: WeightOnlyParams, model: LoadedModel) -> None:  # type: ignore[override]
        super().check(params, model)
        _refuse_unbuildable(self.id, model)
        p = params
        if model.config is None or p.exclude:
            return  # excluded layers may be the ones that do not fit: checked layer by layer when run
        config = model.config
        for field, what in WIDTH_FIELDS.items():
            width = getattr(config, field, None)
            if not isinstance(width, int) or width <= 0:
                continue
            group = p.group_for(width)
            if width % group:
                raise BadInput(
                    f"quantize.weight_only: group_size {group} does not divide the model's {what} "
                    f"({field} = {width}), the input width of the Linear layers that read it; "
                    f"choose a divisor of {width}, e.g. {_largest_divisor(width, group)}"
                )
            if p.bits == 4 and width % 2:
                raise BadInput(
                    f"quantize.weight_only: 4-bit codes are packed in pairs but the {what} ({field} = {width}) "
                    "is odd; use bits 8"
                )

    def run(self, state: StageState, params: WeightOnlyParams, ctx: RunContext) -> StageState:  # type: ignore[override]
        import torch

        from studio.techniques.quantized_layers import WeightOnlyEmbedding, WeightOnlyLinear

        p = params
        root = state.module

        def candidate(m: Any) -> bool:
            return _is_linear(m) or (p.embeddings and type(m) is torch.nn.Embedding)

        exclude = list(p.exclude)
        if p.mixed_precision is not None:
            exclude += _choose_float_layers(
                ctx,
                self.id,
                p.mixed_precision,
                module=root,
                scheme="weight-only",
                embeddings=p.embeddings,
                bits=p.bits,
                group_size=p.group_size,
                symmetric=p.symmetric,
                exclude=p.exclude,
            )
        what = "Linear layer or embedding" if p.embeddings else "Linear layer"
        sel = _select(root, candidate, exclude, self.id, what)
        embeddings = [n for n in sel.chosen if not _is_linear(root.get_submodule(n))]
        for name in embeddings:
            width = root.get_submodule(name).embedding_dim
            group = p.group_for(width)
            if width % group or (p.bits == 4 and width % 2):
                raise BadInput(
                    f"quantize.weight_only: group_size {group} does not fit the width {width} of embedding "
                    f"'{name}' (it must divide it, and 4-bit widths must be even); choose a divisor of "
                    f"{width} (e.g. {_largest_divisor(width, group)}) or exclude the table"
                )
        linears = [n for n in sel.chosen if n not in set(embeddings)]
        for name in linears:  # every layer is checked before any is changed
            in_features, _ = _shape(root.get_submodule(name))
            group = p.group_for(in_features)
            if in_features % group:
                raise BadInput(
                    f"quantize.weight_only: group_size {group} does not divide the input width {in_features} "
                    f"of layer '{name}'; choose a divisor of {in_features} (e.g. "
                    f"{_largest_divisor(in_features, group)}) or exclude the layer"
                )
            if p.bits == 4 and in_features % 2:
                raise BadInput(
                    f"quantize.weight_only: layer '{name}' has an odd input width ({in_features}); 4-bit codes "
                    "are packed in pairs: exclude the layer or use bits 8"
                )
        before = after = 0
        with torch.no_grad():
            for i, name in enumerate(sel.chosen):
                old = root.get_submodule(name)
                if name in embeddings:
                    new = WeightOnlyEmbedding.from_float(
                        old.weight, None, p.bits, p.group_for(old.embedding_dim), p.symmetric
                    )
                else:
                    in_features, _ = _shape(old)
                    new = WeightOnlyLinear.from_float(
                        _float_weight(old), old.bias, p.bits, p.group_for(in_features), p.symmetric
                    )
                before, after = before + _nbytes(old), after + _nbytes(new)
                set_submodule(root, name, new)
                ctx.progress((i + 1) / len(sel.chosen), f"quantized {name}")
        _report(ctx, self.id, sel, before, after)
        record = {
            "technique": self.id,
            "bits": p.bits,
            "group_size": p.group_size,
            "symmetric": p.symmetric,
            "modules": linears,
        }
        if embeddings:
            record["embeddings"] = embeddings
        return dataclasses.replace(state, module=root, transforms=[*state.transforms, record])

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        from studio.techniques.quantized_layers import WeightOnlyEmbedding, WeightOnlyLinear

        params = WeightOnlyParams(
            bits=record.get("bits", 4),
            group_size=record.get("group_size"),
            symmetric=record.get("symmetric", True),
        )
        for name in record.get("modules", []):
            old = _module_named(module, name, cls.id)
            in_features, out_features = _shape(old)
            try:
                new = WeightOnlyLinear(
                    in_features,
                    out_features,
                    old.bias is not None,
                    params.bits,
                    params.group_for(in_features),
                    params.symmetric,
                    old.weight.dtype,
                )
            except ValueError as exc:
                raise BadInput(f"{cls.id}: cannot rebuild layer '{name}': {exc}") from exc
            set_submodule(module, name, new)
        for name in record.get("embeddings", []):
            old = _module_named(module, name, cls.id)
            width = old.embedding_dim
            try:
                new = WeightOnlyEmbedding(
                    width,
                    old.num_embeddings,
                    False,
                    params.bits,
                    params.group_for(width),
                    params.symmetric,
                    old.weight.dtype,
                )
            except ValueError as exc:
                raise BadInput(f"{cls.id}: cannot rebuild embedding '{name}': {exc}") from exc
            set_submodule(module, name, new)
        return module
