"""The layers that quantize.dynamic_int8 and quantize.weight_only put into a torch model.

Imported only when a quantization technique runs or a quantized variant is rebuilt (it imports torch).

Every layer keeps its state as *plain* tensors (int8 / uint8 codes, float scales, float bias), never as
torch quantized tensors (`qint8`, deprecated in torch 2.13) nor tensor subclasses: a quantized variant is
then written to model.safetensors, reopens without unpickling anything, and stays readable by the weight
inspection like any other checkpoint. Each layer's `__init__` builds it from shapes alone, which is what
`Technique.restore` needs; the codes and scales arrive with the state dict.

- `DynamicInt8Linear`: int8 weights (symmetric, per output channel or per tensor), activations quantized
  per batch at run time; the matmul is FBGEMM's `quantized::linear_dynamic`, the same kernel
  `torch.ao.quantization.quantize_dynamic` uses. The weights are packed for the kernel when loaded and
  unpacked only to save, so they are held once.
- `Int8Embedding`: int8 embedding rows with one scale per row (weight-only, dequantized on lookup), so an
  encoder's vocabulary table, often half its size, shrinks too.
- `WeightOnlyLinear`: 8- or 4-bit group-wise round-to-nearest weights (two 4-bit codes per byte),
  dequantized in `forward` and multiplied in the activations' precision: smaller on disk and in memory,
  not faster on CPU.
- `WeightOnlyEmbedding`: an embedding table in the same format, dequantized row by row on lookup.
- `W8A8Linear`: int8 weights (one scale per output channel) times int8 activations (one scale per token,
  computed at run time, or one fixed scale per tensor measured on calibration data), accumulated in int32
  by `torch._int_mm`: what quantize.smoothquant stores.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


@contextmanager
def _quiet_quantized_ops() -> Iterator[None]:
    """torch 2.13 warns that quantized tensor constructors are deprecated; they exist only for a moment
    here, to hand FBGEMM its packed weights, and never reach a saved file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def vnni_available() -> bool:
    """AVX512-VNNI (or AMX) accumulates u8 x s8 products straight into int32."""
    for name in ("_is_vnni_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except (RuntimeError, AttributeError):
            continue
    return False


def _missing(state_dict: dict, prefix: str, names: tuple[str, ...], missing_keys: list[str]) -> bool:
    absent = [prefix + n for n in names if prefix + n not in state_dict]
    missing_keys.extend(absent)
    return bool(absent)


def _unexpected(state_dict: dict, prefix: str, known: tuple[str, ...], unexpected_keys: list[str]) -> None:
    for key in state_dict:
        if key.startswith(prefix) and key[len(prefix) :] not in known:
            unexpected_keys.append(key)


class DynamicInt8Linear(nn.Module):
    """A Linear layer with int8 weights and dynamically quantized int8 activations (FBGEMM).

    FBGEMM's default (`reduce_range=True`) quantizes activations to 7 bits so that u8 x s8 pair sums
    cannot saturate the int16 accumulator of AVX2's VPMADDUBSW. With AVX512-VNNI the products go straight
    into int32 and the 8th bit is free accuracy (MiniLM: mean cosine 0.978 -> 0.994), so the full range is
    used where the CPU has VNNI; this is decided on the machine that runs the model, not stored.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, per_channel: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.per_channel = per_channel
        self.has_bias = bias
        self.reduce_range = not vnni_available()
        scales = torch.ones(out_features if per_channel else 1)
        self._pack(
            torch.zeros(out_features, in_features, dtype=torch.int8),
            scales,
            torch.zeros(out_features) if bias else None,
        )

    def _pack(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        scales = scales.detach().to(torch.float64).reshape(-1)
        codes = codes.detach().to(torch.int8).contiguous()
        with _quiet_quantized_ops():
            if self.per_channel:
                zeros = torch.zeros(len(scales), dtype=torch.long)
                qweight = torch._make_per_channel_quantized_tensor(codes, scales, zeros, 0)
            else:
                qweight = torch._make_per_tensor_quantized_tensor(codes, float(scales[0]), 0)
            b = None if bias is None else bias.detach().to(torch.float32).contiguous()
            self._packed = torch.ops.quantized.linear_prepack(qweight, b)

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, per_channel: bool
    ) -> DynamicInt8Linear:
        """Quantize a float weight [out, in] with torch.ao's weight observers (symmetric int8, as
        `per_channel_dynamic_qconfig` / `default_dynamic_qconfig` do)."""
        from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

        w = weight.detach().to(torch.float32)
        if per_channel:
            observer = PerChannelMinMaxObserver(
                ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
            )
        else:
            observer = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        observer(w)
        scales, _zero = observer.calculate_qparams()
        scales = scales.to(torch.float32).reshape(-1)
        per_row = scales.reshape(-1, 1) if per_channel else scales.reshape(1, 1)
        codes = torch.round(w / per_row).clamp(observer.quant_min, observer.quant_max).to(torch.int8)
        layer = cls(w.shape[1], w.shape[0], bias is not None, per_channel)
        layer._pack(codes, scales, bias)
        return layer

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(int8 codes [out, in], float32 scales [out] or [1], bias or None)."""
        with _quiet_quantized_ops():
            qweight, bias = torch.ops.quantized.linear_unpack(self._packed)
            codes = qweight.int_repr()
            if self.per_channel:
                scales = qweight.q_per_channel_scales().to(torch.float32)
            else:
                scales = torch.tensor([qweight.q_scale()], dtype=torch.float32)
        return codes, scales, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.to(torch.float32), self._packed, self.reduce_range)
        return y.to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        codes, scales, bias = self.unpacked()
        destination[prefix + "weight_int8"] = codes
        destination[prefix + "weight_scale"] = scales
        if bias is not None:
            destination[prefix + "bias"] = bias.detach().clone()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        names = ("weight_int8", "weight_scale", *(("bias",) if self.has_bias else ()))
        _unexpected(state_dict, prefix, names, unexpected_keys)
        if _missing(state_dict, prefix, names, missing_keys):
            return
        codes, scales = state_dict[prefix + "weight_int8"], state_dict[prefix + "weight_scale"]
        n_scales = self.out_features if self.per_channel else 1
        if tuple(codes.shape) != (self.out_features, self.in_features) or scales.numel() != n_scales:
            error_msgs.append(
                f"size mismatch for {prefix}weight_int8: {tuple(codes.shape)} / {scales.numel()} scales, "
                f"expected ({self.out_features}, {self.in_features}) / {n_scales}"
            )
            return
        self._pack(codes, scales, state_dict.get(prefix + "bias"))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
            f"per_channel={self.per_channel}, reduce_range={self.reduce_range}"
        )


def int8_rows(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, scales in `dtype`) of a matrix with one symmetric scale per row, max |row| -> 127."""
    w = weight.detach().to(torch.float32)
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(dtype).tiny)
    scales = scales.to(dtype)  # codes are rounded against the stored scale
    codes = torch.round(w / scales.to(torch.float32).unsqueeze(1)).clamp(-127, 127)
    return codes.to(torch.int8), scales


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one scale per row (symmetric), dequantized on lookup."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=dtype))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Embedding:
        w = weight.detach()
        layer = cls(w.shape[0], w.shape[1], w.dtype)
        codes, scales = int8_rows(w, layer.weight_scale.dtype)
        layer.weight_int8.copy_(codes)
        layer.weight_scale.copy_(scales)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_int8).to(self.weight_scale.dtype)
        return rows * F.embedding(ids, self.weight_scale.unsqueeze(1))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


class WeightOnlyLinear(nn.Module):
    """A Linear layer whose weight is stored as 8- or 4-bit codes with one scale per group of
    `group_size` input columns (and a zero point per group when asymmetric).

    Buffers: `qweight` (int8 [out, in] for symmetric 8 bit, uint8 [out, in] for asymmetric 8 bit,
    uint8 [out, in/2] for 4 bit: column 2j in the low nibble, 2j+1 in the high one), `scales`
    [out, in/group] in the weight's float dtype or in `scale_dtype` (float16 scales halve their bytes;
    the codes are rounded against the stored scale), `zeros` uint8 [out, in/group] (asymmetric only).
    Symmetric 4-bit codes are stored with an offset of 8; symmetric scales may be negative. `dtype` is the
    layer's compute dtype (its bias and what it returns).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int,
        group_size: int,
        symmetric: bool,
        dtype: torch.dtype = torch.float32,
        scale_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        # float16 scales kept beside wider weights: the dtype the layer computes in (a later module.to()
        # casting the scales to another dtype makes that the compute dtype again)
        self.scales_beside = dtype if scale_dtype is not None and scale_dtype != dtype else None
        if bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, not {bits}")
        if group_size <= 0 or in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide the input width {in_features}")
        if bits == 4 and in_features % 2:
            raise ValueError(f"4-bit codes are packed in pairs: the input width {in_features} is odd")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        groups = in_features // group_size
        if bits == 4:
            qweight = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        else:
            qweight = torch.zeros(out_features, in_features, dtype=torch.int8 if symmetric else torch.uint8)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype or dtype))
        if symmetric:
            self.register_buffer("zeros", None)
        else:
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int,
        symmetric: bool,
        scale_dtype: torch.dtype | None = None,
    ) -> WeightOnlyLinear:
        """Round-to-nearest quantization of a float weight [out, in], group by group."""
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            bias is not None,
            bits,
            group_size,
            symmetric,
            weight.dtype,
            scale_dtype,
        )
        stored = layer.scales.dtype  # the codes are rounded against the scale as stored
        tiny = torch.finfo(stored).tiny
        w = weight.detach().to(torch.float32).reshape(out_features, -1, group_size)
        if symmetric:
            # The group's largest-magnitude weight maps to the code -2^(bits-1) exactly (the scale takes
            # its sign), so all 2^bits codes are used: MiniLM int4/g32 cosine 0.960 -> 0.970 compared with
            # scale = max|w| / 7.
            qmin = -(2 ** (bits - 1))
            extreme = torch.gather(w, -1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
            magnitude = (extreme.abs() / -qmin).clamp(min=tiny)
            scales = torch.where(extreme > 0, -magnitude, magnitude).to(stored)
            codes = torch.round(w / scales.to(torch.float32).unsqueeze(-1)).clamp(qmin, -qmin - 1)
            if bits == 4:
                codes = codes + 8
        else:
            levels = 2**bits - 1
            lo = w.amin(dim=-1).clamp(max=0)  # the range holds 0, so zero weights stay exact
            hi = w.amax(dim=-1).clamp(min=0)
            scales = ((hi - lo) / levels).clamp(min=tiny).to(stored)
            s = scales.to(torch.float32)
            zeros = torch.round(-lo / s).clamp(0, levels)
            codes = (torch.round(w / s.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, levels)
            assert layer.zeros is not None  # asymmetric layers are built with zero points
            layer.zeros.copy_(zeros.to(torch.uint8))
        codes = codes.reshape(out_features, in_features)
        if bits == 4:
            nibbles = codes.to(torch.uint8)
            layer.qweight.copy_(nibbles[:, 0::2] | (nibbles[:, 1::2] << 4))
        else:
            layer.qweight.copy_(codes.to(layer.qweight.dtype))
        layer.scales.copy_(scales)
        if bias is not None and layer.bias is not None:
            layer.bias.data.copy_(bias.detach().to(layer.dtype))
        return layer

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the layer computes in: its bias and what it returns."""
        if self.scales_beside is not None and self.scales.dtype == torch.float16:
            return self.scales_beside
        return self.scales.dtype

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A 4-bit variant written for transformers holds compressed-tensors' packed tensors instead
        from studio.techniques.hf_compressed import read_layer

        read_layer(self, state_dict, prefix)
        # An 8-bit variant written for transformers holds the weight as torchao's flattened
        # IntxUnpackedToInt8Tensor (signed codes, int8 zero points); read it back into this layout.
        qdata = state_dict.pop(prefix + "_weight_qdata", None)
        if qdata is not None:
            scale = state_dict.pop(prefix + "_weight_scale")
            zero = state_dict.pop(prefix + "_weight_zero_point").to(torch.int16)
            offset = 2 ** (self.bits - 1)
            codes = qdata.to(torch.int16) + (offset if self.bits == 4 or not self.symmetric else 0)
            if self.bits == 4:
                nibbles = codes.to(torch.uint8)
                codes = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
            state_dict[prefix + "qweight"] = codes.to(self.qweight.dtype)
            state_dict[prefix + "scales"] = scale
            if not self.symmetric:
                state_dict[prefix + "zeros"] = (zero + offset).to(torch.uint8)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The integer codes [out, in] (unpacked, offsets not yet removed); only `rows` when given."""
        q = self.qweight if rows is None else self.qweight[rows]
        if self.bits == 4:
            q = torch.stack((q & 0x0F, q >> 4), dim=-1).reshape(q.shape[0], self.in_features)
        return q

    def dequantize(self, dtype: torch.dtype | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight [out, in] these codes stand for (only `rows` of it when given)."""
        groups = self.in_features // self.group_size
        q = self.codes(rows)
        n = q.shape[0]
        q = q.reshape(n, groups, self.group_size).to(torch.float32)
        scales = self.scales if rows is None else self.scales[rows]
        if self.zeros is not None:
            zeros = self.zeros if rows is None else self.zeros[rows]
            q = q - zeros.to(torch.float32).unsqueeze(-1)
        elif self.bits == 4:
            q = q - 8
        w = (q * scales.to(torch.float32).unsqueeze(-1)).reshape(n, self.in_features)
        return w.to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int{self.bits} {kind}, group_size={self.group_size}"
        )


class WeightOnlyEmbedding(WeightOnlyLinear):
    """An embedding table stored like `WeightOnlyLinear`'s weight: one row per token, 8- or 4-bit codes
    with one scale per group of `group_size` embedding columns; only the rows looked up are dequantized.

    Built with the Linear signature (in_features = embedding width, out_features = vocabulary size, no
    bias), so `from_float(table, None, bits, group, symmetric)` quantizes a table. 4-bit tables with
    groups of 128 are about 7x smaller than float32 (MiniLM's vocabulary: 46.9 MB -> 6.2 MB, mean cosine
    0.998 with everything else float).
    """

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.dequantize(self.dtype, rows=ids.reshape(-1))
        return rows.reshape(*ids.shape, self.in_features)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"{self.out_features}, {self.in_features}, int{self.bits} {kind}, group_size={self.group_size}"


class W8A8Linear(nn.Module):
    """A Linear layer computed in integers: int8 weights with one symmetric scale per output channel, int8
    activations, int32 accumulation (`torch._int_mm`), rescaled to float afterwards.

    Activations are quantized symmetrically either per token at run time (`input_scale` is 0: each row of
    the input gets max |row| / 127, which follows the large spread between tokens of a language model) or
    with one fixed scale per tensor measured on calibration data (`input_scale` > 0: no reduction at run
    time; values beyond the calibrated range saturate). SmoothQuant makes the per-channel spread small
    enough for either to work; without it a few outlier channels set the scale of every other channel.
    """

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor
    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("input_scale", torch.zeros((), dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, input_max: float | None = None
    ) -> W8A8Linear:
        """Quantize a float weight [out, in]; `input_max` (the largest |input| seen on calibration data)
        makes the activation scale static, None keeps it per token."""
        layer = cls(int(weight.shape[1]), int(weight.shape[0]), bias is not None)
        codes, scales = int8_rows(weight, torch.float32)
        layer.weight_int8.copy_(codes)
        layer.weight_scale.copy_(scales)
        if input_max is not None:
            layer.input_scale.fill_(max(float(input_max), torch.finfo(torch.float32).tiny) / 127)
        if bias is not None and layer.bias is not None:
            layer.bias.data.copy_(bias.detach().to(torch.float32))
        return layer

    @property
    def static(self) -> bool:
        return bool(self.input_scale > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.float32)
        if self.static:
            scale = self.input_scale.reshape(1, 1)
        else:
            scale = (rows.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        codes = torch.round(rows / scale).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(codes, self.weight_int8.t()).to(torch.float32) * (scale * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        activations = "static per-tensor" if self.static else "dynamic per-token"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int8 weights per channel, int8 activations {activations}"
        )
