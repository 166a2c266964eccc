"""Per-layer quantization error of a saved torch variant: each quantized layer's dequantized weight against
the float weight of the same name in the checkpoint the variant was made from.

The variant's layers are found by what they hold, not by their class (the layer classes live with the
techniques, above this package): a layer with `dequantize()` and `bits` stores group-wise codes
(quantize.weight_only's round-to-nearest, GPTQ and AWQ write the same layer); one with `unpacked()` holds
FBGEMM-packed int8 (quantize.dynamic_int8); one with `weight_int8` and `weight_scale` holds int8 rows with
one scale per row (an int8 embedding, or SmoothQuant's W8A8). Each is turned back into float32 through
its own layout, and compared with the original's `<layer>.weight`.

AWQ and SmoothQuant scale each input column of a layer by s_j and fold 1/s_j into the operation before it
(AWQ also divides the output rows of up_proj and v_proj), so the float model is unchanged but the stored
weight is no longer the original's. For their layers the error is of the rounding alone: the original is
rescaled by the row and column factors that fit the dequantized weight best (alternating least squares),
and the dequantized weight is mapped back through them, so both histograms are in the original's units.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from studio.checkpoints.base import LoadedModel, TensorRef
from studio.checkpoints.variant_folder import TRANSFORMS_KEY
from studio.inspection.stats import DEFAULT_BINS, as_float_array

# Techniques whose stored weights are the original's rescaled per row and column (see the module docstring).
RESCALING_TECHNIQUES = ("quantize.awq", "quantize.smoothquant")
RESCALE_ROUNDS = 4  # alternating least-squares rounds; the fit stops moving after two or three
MANIFEST = "manifest.json"
# A quantized layer's tensors that hold its weight (codes, or a float weight left as it was); `weight_packed`
# is the codes' name in a compressed-tensors folder (how 4-bit causal-LM variants are saved).
WEIGHT_TENSORS = ("qweight", "weight_int8", "weight", "weight_packed")


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized layer of a variant, described from its stored state."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # the layer's class name
    bits: int
    # Input columns sharing one scale: the group size, the input width for one scale per output row, None
    # for one scale for the whole tensor.
    group_size: int | None
    symmetric: bool
    shape: tuple[int, int]  # [out, in] of the weight it stands for
    dequantize: Callable[[], Any] = field(repr=False, compare=False)  # float32 weight [out, in] (torch)

    @property
    def scheme(self) -> str:
        """How the weight is stored, in words ("int4 symmetric, groups of 32 columns")."""
        kind = "symmetric" if self.symmetric else "asymmetric"
        if self.group_size is None:
            where = "one scale per tensor"
        elif self.group_size == self.shape[1]:
            where = "one scale per row"
        else:
            where = f"groups of {self.group_size} columns"
        return f"int{self.bits} {kind}, {where}"


def _weight_only(name: str, m: Any) -> QuantizedLayer:
    return QuantizedLayer(
        name=name,
        kind=type(m).__name__,
        bits=int(m.bits),
        group_size=int(m.group_size),
        symmetric=bool(m.symmetric),
        shape=(int(m.out_features), int(m.in_features)),
        dequantize=lambda: m.dequantize(_float32()),
    )


def _packed_int8(name: str, m: Any) -> QuantizedLayer:
    def dequantize() -> Any:
        codes, scales, _bias = m.unpacked()
        return codes.float() * scales.float().reshape(-1, 1)  # [out] scales per row, or [1] per tensor

    per_channel = bool(getattr(m, "per_channel", True))
    return QuantizedLayer(
        name=name,
        kind=type(m).__name__,
        bits=8,
        group_size=int(m.in_features) if per_channel else None,
        symmetric=True,
        shape=(int(m.out_features), int(m.in_features)),
        dequantize=dequantize,
    )


def _int8_rows(name: str, m: Any) -> QuantizedLayer:
    rows, cols = (int(s) for s in m.weight_int8.shape)
    return QuantizedLayer(
        name=name,
        kind=type(m).__name__,
        bits=8,
        group_size=cols,
        symmetric=True,
        shape=(rows, cols),
        dequantize=lambda: m.weight_int8.float() * m.weight_scale.float().reshape(-1, 1),
    )


def _float32() -> Any:
    import torch

    return torch.float32


def quantized_layers(module: Any) -> dict[str, QuantizedLayer]:
    """Every quantized layer of a torch module, by module path, in the module's order."""
    found: dict[str, QuantizedLayer] = {}
    for name, m in module.named_modules():
        if not name:
            continue
        if callable(getattr(m, "dequantize", None)) and hasattr(m, "bits") and hasattr(m, "qweight"):
            found[name] = _weight_only(name, m)
        elif callable(getattr(m, "unpacked", None)) and hasattr(m, "in_features"):
            found[name] = _packed_int8(name, m)
        elif getattr(getattr(m, "weight_int8", None), "ndim", 0) == 2 and hasattr(m, "weight_scale"):
            found[name] = _int8_rows(name, m)
    return found


def source_of(variant: LoadedModel) -> str | None:
    """The checkpoint a workspace variant was made from (its manifest's `model`); None for a checkpoint that
    is not a variant folder."""
    manifest = Path(variant.path) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        source = json.loads(manifest.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError):
        return None
    return str(source) if source else None


def rescaled_layers(records: list[dict[str, Any]], layers: list[str]) -> set[str]:
    """Layers whose weights a rescaling technique changed before they were quantized: the layers of AWQ
    and SmoothQuant records, or every layer after a smooth-only SmoothQuant (the quantization that
    followed it may be any)."""
    out: set[str] = set()
    for record in records:
        if record.get("technique") not in RESCALING_TECHNIQUES:
            continue
        if record.get("smooth_only"):
            return set(layers)
        out.update(record.get("modules") or [])
    return out


def fit_rescaling(reference: Any, stored: Any, rounds: int = RESCALE_ROUNDS) -> tuple[Any, Any]:
    """(row factors r [out], column factors c [in]) with r_i * reference_ij * c_j closest to stored_ij in
    the least-squares sense, by alternating exact solves for c with r fixed and r with c fixed."""
    ref = np.asarray(reference, dtype=np.float64)
    dq = np.asarray(stored, dtype=np.float64)
    r = np.ones(ref.shape[0])
    c = np.ones(ref.shape[1])
    for _ in range(rounds):
        scaled = ref * r[:, None]
        c = _ratio((dq * scaled).sum(axis=0), np.square(scaled).sum(axis=0))
        scaled = ref * c[None, :]
        r = _ratio((dq * scaled).sum(axis=1), np.square(scaled).sum(axis=1))
    return r, c


def _ratio(num: Any, den: Any) -> Any:
    """num / den, 1 where den is 0 (an all-zero row or column of the original tells nothing)."""
    out = np.ones_like(num)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


@dataclass
class LayerError:
    """A quantized layer against its float original: the error and both weights' histograms on one set
    of bins."""

    layer: QuantizedLayer
    source_tensor: str  # the original's tensor compared with
    relative_l2: float  # ||dequantized - float|| / ||float|| (0 for an unchanged layer)
    rms: float  # root mean square of dequantized - float, in the weight's units
    rescaled: bool  # AWQ / SmoothQuant factors were fitted and taken out first
    edges: list[float]
    float_counts: list[int]
    dequantized_counts: list[int]

    @property
    def params(self) -> int:
        return self.layer.shape[0] * self.layer.shape[1]


def layer_error(
    layer: QuantizedLayer, original: Any, bins: int = DEFAULT_BINS, *, rescale: bool = False, name: str = ""
) -> LayerError:
    """Compare `layer`'s dequantized weight with `original` (the float weight, torch or numpy, [out, in])."""
    w = np.asarray(as_float_array(original), dtype=np.float64).reshape(layer.shape)
    dq = np.asarray(as_float_array(layer.dequantize()), dtype=np.float64).reshape(layer.shape)
    if rescale:
        r, c = fit_rescaling(w, dq)
        factors = np.outer(r, c)
        dq = np.divide(dq, factors, out=np.zeros_like(dq), where=factors != 0)
    diff = dq - w
    norm = float(np.linalg.norm(w))
    err = float(np.linalg.norm(diff))
    relative = err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
    finite = np.isfinite(dq)
    lo = float(min(w.min(), dq[finite].min() if finite.any() else w.min()))
    hi = float(max(w.max(), dq[finite].max() if finite.any() else w.max()))
    span = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)
    float_counts, edges = np.histogram(w, bins=bins, range=span)
    dq_counts, _ = np.histogram(dq[finite], bins=edges)
    return LayerError(
        layer=layer,
        source_tensor=name,
        relative_l2=relative,
        rms=float(np.sqrt(np.mean(np.square(diff)))),
        rescaled=rescale,
        edges=[float(e) for e in edges],
        float_counts=float_counts.tolist(),
        dequantized_counts=dq_counts.tolist(),
    )


class VariantQuantError:
    """The quantized layers of an opened variant, matched by name to the float checkpoint it came from.

    Building it builds the variant's module (its layers hold the codes); each layer's error then reads one
    tensor of the source.
    """

    def __init__(
        self, variant: LoadedModel, source: LoadedModel, layers: dict[str, QuantizedLayer] | None = None
    ) -> None:
        self.variant = variant
        self.source = source
        self.layers = quantized_layers(variant.module) if layers is None else layers
        records = list(getattr(variant.config, TRANSFORMS_KEY, None) or []) if variant.config else []
        self.rescaled = rescaled_layers(records, list(self.layers))
        self._refs: dict[str, TensorRef] = {r.name: r for r in source.tensors()}

    def source_tensor(self, layer: str) -> str | None:
        """The source's float weight of `layer`, when the source has one of the right shape."""
        ref = self._refs.get(f"{layer}.weight")
        if ref is None or tuple(ref.shape) != self.layers[layer].shape:
            return None
        return ref.name

    def layer_of(self, path: str) -> str | None:
        """The quantized layer a module or tensor path stands for: the layer itself, or the tensor holding
        its weight's codes (its scales, zero points and bias stand for themselves)."""
        if path in self.layers:
            return path
        parent, _, tensor = path.rpartition(".")
        return parent if tensor in WEIGHT_TENSORS and parent in self.layers else None

    def error(self, layer: str, bins: int = DEFAULT_BINS) -> LayerError | None:
        """`layer` against its original; None when the source has no float weight of that name and shape."""
        name = self.source_tensor(layer)
        if name is None:
            return None
        return layer_error(
            self.layers[layer], self._refs[name].load(), bins, rescale=layer in self.rescaled, name=name
        )

    def relative_errors(self, bins: int = 8) -> dict[str, float]:
        """Relative L2 error of every layer that has an original (few bins: only the error is kept)."""
        out: dict[str, float] = {}
        for layer in self.layers:
            result = self.error(layer, bins)
            if result is not None:
                out[layer] = result.relative_l2
        return out


def open_variant_quant_error(variant: LoadedModel) -> VariantQuantError | None:
    """The quantized layers of `variant` against its source, or None when it is not a workspace variant
    with quantized layers (the source is then not opened)."""
    source = source_of(variant)
    if source is None or not variant.runnable:
        return None
    from studio.checkpoints import open_checkpoint

    layers = quantized_layers(variant.module)
    if not layers:
        return None
    return VariantQuantError(variant, open_checkpoint(source), layers)
