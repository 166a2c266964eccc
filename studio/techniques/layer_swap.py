"""Swapping a torch model's layers for quantized ones: which layers are candidates, which are chosen, and
the quantized layer that replaces each.

quantize.dynamic_int8, quantize.weight_only and the mixed-precision search (which swaps layers of a copy
of the module, one measurement at a time) all choose and build layers here, so the layer the search
measures is exactly the layer the block produces.

Candidates are layers of exactly `torch.nn.Linear`, transformers' `Conv1D` (GPT-2's transposed Linear)
and, where asked, `torch.nn.Embedding`: subclasses such as the output projection of
`nn.MultiheadAttention` are read directly by their owners, so swapping them would change nothing or break
the owner. Layers whose weight is tied to another module (a language-model head sharing the embedding
table) stay float: quantizing one would untie them.

Torch is imported inside the functions: a technique module is imported whenever the registry is listed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, Literal

from studio.errors import BadInput

DEFAULT_INT4_GROUP = 128


# ---------------------------------------------------------------------------------------------- layers


def is_conv1d(module: Any) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_linear(module: Any) -> bool:
    import torch

    return type(module) is torch.nn.Linear or is_conv1d(module)


def float_weight(module: Any) -> Any:
    """The weight as [out, in], whatever the layer's own layout (Conv1D stores [in, out])."""
    return module.weight.t() if is_conv1d(module) else module.weight


def shape(module: Any) -> tuple[int, int]:
    """(in_features, out_features)."""
    out_features, in_features = float_weight(module).shape
    return int(in_features), int(out_features)


def input_width(module: Any) -> int:
    """The width a weight-only group splits: a Linear layer's input features, an embedding's dimension."""
    return shape(module)[0] if is_linear(module) else int(module.embedding_dim)


def set_submodule(root: Any, name: str, new: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def module_named(root: Any, name: str, technique: str) -> Any:
    """The layer a variant's record names, in a freshly built model."""
    try:
        return root.get_submodule(name)
    except AttributeError as exc:
        raise BadInput(
            f"{technique}: the variant's record names layer '{name}', which the rebuilt model does not have"
        ) from exc


def weight_bytes(module: Any) -> int:
    """Bytes of a layer's own parameters and buffers (a packed FBGEMM weight counted as its codes)."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    total = sum(t.numel() * t.element_size() for t in tensors)
    if hasattr(module, "unpacked"):  # DynamicInt8Linear keeps its weights packed for FBGEMM
        codes, scales, bias = module.unpacked()
        total += codes.numel() + scales.numel() * 4 + (0 if bias is None else bias.numel() * 4)
    return total


def weight_bits(module: Any) -> int:
    """Bits a layer's weight takes as stored, what a bits-per-weight budget counts: a float layer's weight
    tensor; a quantized layer's codes with their scales and zero points. The bias is not counted (it is
    not a weight of the matrix and stays float in every scheme)."""
    if hasattr(module, "unpacked"):  # DynamicInt8Linear: codes and float32 scales, packed for FBGEMM
        codes, scales, _bias = module.unpacked()
        return codes.numel() * 8 + scales.numel() * 32
    tensors = [t for name, t in module.named_buffers(recurse=False) if t is not None]
    tensors += [p for name, p in module.named_parameters(recurse=False) if name != "bias"]
    return sum(t.numel() * t.element_size() * 8 for t in tensors)


# ---------------------------------------------------------------------------------------------- choice


@dataclasses.dataclass
class Selection:
    chosen: list[str]
    excluded: list[str]
    tied: list[str]


def _tied_parameters(root: Any) -> set[int]:
    """ids of parameters reachable under more than one name (tied embeddings and heads)."""
    seen: dict[int, int] = {}
    for _name, p in root.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def select(root: Any, exclude: Sequence[str], technique: str, *, embeddings: bool) -> Selection:
    """The Linear layers (and embedding tables, with `embeddings`) to quantize, minus the excluded and the
    tied ones. An exclude entry is a module name, a prefix covering a subtree, or a glob; one that matches
    no candidate is an error (a typo would otherwise quantize the layer it meant to keep)."""
    import torch

    what = "Linear layer or embedding" if embeddings else "Linear layer"

    def is_candidate(m: Any) -> bool:
        return is_linear(m) or (embeddings and type(m) is torch.nn.Embedding)

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


# ---------------------------------------------------------------------------------------------- groups


def group_width(bits: int, group_size: int | None, width: int) -> int:
    """Input columns sharing one weight-only scale: the given size, else 128 for 4 bits and the whole row
    (one scale per output channel) for 8 bits."""
    if group_size is not None:
        return group_size
    return DEFAULT_INT4_GROUP if bits == 4 else width


def group_misfit(width: int, bits: int, group: int) -> Literal["indivisible", "odd"] | None:
    """Why weight-only codes cannot be laid out for a layer of this input width, or None if they can:
    groups must tile the row, and 4-bit codes are packed two per byte."""
    if width % group:
        return "indivisible"
    if bits == 4 and width % 2:
        return "odd"
    return None


# ---------------------------------------------------------------------------------------------- swapping


@dataclasses.dataclass(frozen=True)
class LayerScheme:
    """How a chosen layer is quantized.

    "int8": dynamic INT8 Linear layers (FBGEMM) and int8 embedding rows; "weight-only": group-wise 8- or
    4-bit codes for both.
    """

    kind: Literal["int8", "weight-only"]
    per_channel: bool = True  # int8 Linear layers: one scale per output channel instead of per layer
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    scale_float16: bool = False  # weight-only: scales stored as float16 instead of the weight's dtype

    def __post_init__(self) -> None:
        if self.kind not in ("int8", "weight-only"):
            raise BadInput(f"unknown layer quantization '{self.kind}'")
        if self.bits not in (8, 4):
            raise BadInput(f"weight-only quantization takes 8 or 4 bits, not {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise BadInput("group_size must be a positive number of input columns")

    def group_for(self, width: int) -> int:
        return group_width(self.bits, self.group_size, width)

    def scale_dtype(self) -> Any:
        """The dtype weight-only scales are stored in: float16 where asked, else None (the weight's)."""
        import torch

        return torch.float16 if self.scale_float16 else None

    def misfit(self, module: Any) -> Literal["indivisible", "odd"] | None:
        """Why this layer cannot be quantized by the scheme (weight-only group layout), or None."""
        if self.kind == "int8":
            return None
        width = input_width(module)
        return group_misfit(width, self.bits, self.group_for(width))


def quantized_layer(old: Any, scheme: LayerScheme) -> Any:
    """The quantized replacement of a float Linear (or Conv1D) layer or embedding table."""
    import torch

    from studio.techniques.quantized_layers import (
        DynamicInt8Linear,
        Int8Embedding,
        WeightOnlyEmbedding,
        WeightOnlyLinear,
    )

    with torch.no_grad():
        if scheme.kind == "int8":
            if is_linear(old):
                return DynamicInt8Linear.from_float(float_weight(old), old.bias, scheme.per_channel)
            return Int8Embedding.from_float(old.weight)
        group = scheme.group_for(input_width(old))
        if is_linear(old):
            return WeightOnlyLinear.from_float(
                float_weight(old), old.bias, scheme.bits, group, scheme.symmetric, scheme.scale_dtype()
            )
        return WeightOnlyEmbedding.from_float(
            old.weight, None, scheme.bits, group, scheme.symmetric, scheme.scale_dtype()
        )


def empty_layer(old: Any, scheme: LayerScheme) -> Any:
    """A quantized layer shaped like `old` with no weights yet: what a saved variant's state dict is loaded
    into. Raises ValueError when the scheme's groups do not fit the layer."""
    from studio.techniques.quantized_layers import (
        DynamicInt8Linear,
        Int8Embedding,
        WeightOnlyEmbedding,
        WeightOnlyLinear,
    )

    dtype = old.weight.dtype
    if is_linear(old):
        in_features, out_features = shape(old)
        if scheme.kind == "int8":
            return DynamicInt8Linear(in_features, out_features, old.bias is not None, scheme.per_channel)
        return WeightOnlyLinear(
            in_features,
            out_features,
            old.bias is not None,
            scheme.bits,
            scheme.group_for(in_features),
            scheme.symmetric,
            dtype,
            scheme.scale_dtype(),
        )
    if scheme.kind == "int8":
        return Int8Embedding(old.num_embeddings, old.embedding_dim, dtype)
    width = old.embedding_dim
    return WeightOnlyEmbedding(
        width,
        old.num_embeddings,
        False,
        scheme.bits,
        scheme.group_for(width),
        scheme.symmetric,
        dtype,
        scheme.scale_dtype(),
    )


def swap_layers(
    root: Any, names: Sequence[str], scheme: LayerScheme, progress: Callable[[float, str], None]
) -> tuple[int, int]:
    """Replace each named layer by its quantized version, in order; (weight bytes before, after)."""
    before = after = 0
    for i, name in enumerate(names):
        old = root.get_submodule(name)
        new = quantized_layer(old, scheme)
        before, after = before + weight_bytes(old), after + weight_bytes(new)
        set_submodule(root, name, new)
        progress((i + 1) / len(names), f"quantized {name}")
    return before, after
