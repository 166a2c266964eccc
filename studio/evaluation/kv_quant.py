"""Quantized KV caches for torch causal LMs: per-channel integer codes (quanto/hqq style) and TurboQuant.

Both can keep the most recent `residual_length` tokens in the model's precision and store older tokens
quantized, as transformers' `QuantizedLayer` does (KIVI: the newest tokens matter most to the next one and
change the statistics of a group most). quanto keeps 16 by default: a key channel's scale spans a block of
tokens, so the newest ones wait in float until a block is full. TurboQuant keeps none by default, as in the
paper: it quantizes each token's vectors alone, with no statistics to wait for (on builtin:tinylm at its full
512-token context a 16-token float window costs 6 points of the fp16 bytes and buys 1 point of perplexity).
Why our own classes and not `transformers.QuantizedCache`: its backends need optimum-quanto or hqq, which
are not installed here, and it re-quantizes the whole dequantized history at every flush, so old tokens
accumulate rounding error; these layers quantize each token once, in blocks, and only append.

- `quanto`: asymmetric min-max integer codes. Keys per channel (one scale and zero point per channel over
  a block of `group_size` tokens: key outliers sit in fixed channels), values per token (one scale and zero
  per `group_size` channels of a token).
- `turboquant` (Zandieh et al. 2025, arXiv 2504.19874): each head vector is split into its norm (kept in
  float16) and its direction; a seeded random orthogonal rotation (a randomized Hadamard transform when the
  head width is a power of two) makes every coordinate of the direction close to N(0, 1/d), so one fixed
  Lloyd-Max codebook per bit width quantizes every coordinate with no per-block scale. Keys spend one of
  their bits on the QJL sketch of the residual (the sign of a Gaussian projection, plus the residual's
  norm), which makes the attention inner product <q, k> unbiased; values, which are averaged rather than
  matched, use all their bits for the codebook. A fractional width (3.5) gives half the coordinates the
  higher width and half the lower: after the rotation every coordinate is alike, so which ones does not
  matter.

Held bytes (`QuantizedKVCache.held_bytes`) count every tensor kept per token: packed codes, scales and zero
points, norms, sketch bits, and the float residual window. The rotation and the sketch matrix are not
counted: they are one constant pair per head width, regenerated from the seed, and independent of context.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from studio.errors import BadInput

if TYPE_CHECKING:
    import torch

METHODS = ("quanto", "turboquant")
QUANTO_BITS = (2, 4, 8)
TURBOQUANT_BITS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
# the float window each method keeps when a spec names none (see the module docstring)
DEFAULT_RESIDUAL = {"quanto": 16, "turboquant": 0}
CONFIG_KEY = "studio_kv_cache"  # the model config field a kv_cache.quantize variant carries its choice in


@dataclass(frozen=True)
class KVCacheSpec:
    """Which quantized cache a variant generates with (stored in its config as a plain dict)."""

    method: str
    bits: float
    value_bits: float
    residual_length: int = -1  # -1: the method's default, DEFAULT_RESIDUAL
    group_size: int = 32
    seed: int = 0
    # decoder layers (0-based) whose cache stays in the model's precision: how mixed precision keeps the
    # layers whose caches do not tolerate the bits, as `model-studio sensitivity --scheme kv-bits` finds them
    float_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "float_layers", tuple(sorted({int(i) for i in self.float_layers})))
        if any(i < 0 for i in self.float_layers):
            raise BadInput(f"float_layers are decoder layer numbers from 0, got {list(self.float_layers)}")
        if self.method not in METHODS:
            raise BadInput(f"unknown KV-cache method '{self.method}' (known: {', '.join(METHODS)})")
        allowed = QUANTO_BITS if self.method == "quanto" else TURBOQUANT_BITS
        for name, b in (("bits", self.bits), ("value_bits", self.value_bits)):
            if float(b) not in [float(a) for a in allowed]:
                raise BadInput(
                    f"KV-cache {name} {b:g} is not supported by {self.method} "
                    f"(supported: {', '.join(f'{a:g}' for a in allowed)})"
                )
        if self.residual_length == -1:
            object.__setattr__(self, "residual_length", DEFAULT_RESIDUAL[self.method])
        if self.residual_length < 0:
            raise BadInput(f"residual_length must be 0 or more, got {self.residual_length}")
        if self.group_size < 1:
            raise BadInput(f"group_size must be at least 1, got {self.group_size}")

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        if self.float_layers:
            out["float_layers"] = list(self.float_layers)
        else:  # a cache quantized in every layer keeps the record it always had
            del out["float_layers"]
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> KVCacheSpec:
        fields = {k: record[k] for k in cls.__dataclass_fields__ if k in record}
        return cls(**fields)


def kv_spec_of(module: Any) -> KVCacheSpec | None:
    """The quantized-cache choice a torch module's config carries, or None for a plain cache."""
    record = getattr(getattr(module, "config", None), CONFIG_KEY, None)
    return KVCacheSpec.from_record(record) if record else None


# ------------------------------------------------------------------------------------------------ bit packing


@functools.cache
def _bit_weights(bits: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(0..bits-1 as shifts, 1 << 0..bits-1) on a device, made once: decoding packs and unpacks every step."""
    import torch

    shifts = torch.arange(bits, device=device, dtype=torch.int32)
    return shifts, (1 << shifts.to(torch.int64))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes below 2**bits along the last axis, packed `bits` bits each into uint8 bytes."""
    import torch

    if bits == 0:
        return torch.zeros((*codes.shape[:-1], 0), dtype=torch.uint8, device=codes.device)
    n = codes.shape[-1]
    shifts, _ = _bit_weights(bits, codes.device)
    flat = ((codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., n * bits]
    pad = (-n * bits) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    _, weights = _bit_weights(8, codes.device)
    return (flat.unflatten(-1, (-1, 8)) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_codes`: [..., n] int64 codes."""
    import torch

    if bits == 0:
        return torch.zeros((*packed.shape[:-1], n), dtype=torch.long, device=packed.device)
    shifts, _ = _bit_weights(8, packed.device)
    flat = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : n * bits]
    _, weights = _bit_weights(bits, packed.device)
    return (flat.unflatten(-1, (n, bits)).to(torch.int64) * weights).sum(-1)


Packed = dict[str, "torch.Tensor"]  # every tensor laid out with its token (or token block) axis at -2


# ------------------------------------------------------------------------------------------------ quanto


def _minmax_codes(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric codes of x over `dim`, and the float16 scale and zero point (the minimum) they use."""
    import torch

    levels = (1 << bits) - 1
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    scale = ((hi - lo) / levels).clamp(min=1e-8).to(torch.float16)
    zero = lo.to(torch.float16)
    codes = ((x - zero.float()) / scale.float()).round().clamp(0, levels).to(torch.uint8)
    return codes, scale, zero


class ChannelQuantizer:
    """quanto-style keys: per channel, one scale and zero point over each block of `block` tokens."""

    def __init__(self, bits: int, block: int) -> None:
        self.bits, self.block = bits, block

    def quantize(self, x: torch.Tensor) -> Packed:
        b, h, t, d = x.shape
        blocks = x.float().reshape(b, h, t // self.block, self.block, d)
        codes, scale, zero = _minmax_codes(blocks, self.bits, dim=-2)
        return {
            "codes": pack_codes(codes.reshape(b, h, t, d), self.bits),
            "scale": scale.squeeze(-2),
            "zero": zero.squeeze(-2),
        }

    def dequantize(self, p: Packed, dim: int) -> torch.Tensor:
        b, h, t, _ = p["codes"].shape
        codes = unpack_codes(p["codes"], self.bits, dim).float().reshape(b, h, -1, self.block, dim)
        x = codes * p["scale"].float().unsqueeze(-2) + p["zero"].float().unsqueeze(-2)
        return x.reshape(b, h, t, dim)


class TokenQuantizer:
    """quanto-style values: per token, one scale and zero point per `group` channels."""

    block = 1

    def __init__(self, bits: int, group: int, dim: int) -> None:
        self.bits = bits
        self.group = group if dim % group == 0 else dim

    def quantize(self, x: torch.Tensor) -> Packed:
        b, h, t, d = x.shape
        groups = x.float().reshape(b, h, t, d // self.group, self.group)
        codes, scale, zero = _minmax_codes(groups, self.bits, dim=-1)
        return {
            "codes": pack_codes(codes.reshape(b, h, t, d), self.bits),
            "scale": scale.squeeze(-1),
            "zero": zero.squeeze(-1),
        }

    def dequantize(self, p: Packed, dim: int) -> torch.Tensor:
        b, h, t, _ = p["codes"].shape
        codes = unpack_codes(p["codes"], self.bits, dim).float().reshape(b, h, t, -1, self.group)
        x = codes * p["scale"].float().unsqueeze(-1) + p["zero"].float().unsqueeze(-1)
        return x.reshape(b, h, t, dim)


# ------------------------------------------------------------------------------------------------ TurboQuant


@functools.cache
def lloyd_max_gaussian(bits: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(centroids, boundaries) of the optimal `bits`-bit scalar quantizer of N(0, 1), by Lloyd's algorithm
    on the density itself (closed-form conditional means), computed once per width."""
    from scipy.special import ndtr, ndtri

    n = 1 << bits
    if n == 1:
        return (0.0,), ()
    c = [float(ndtri((i + 0.5) / n)) for i in range(n)]

    def pdf(x: float) -> float:
        return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0

    for _ in range(1000):
        t = [(c[i] + c[i + 1]) / 2 for i in range(n - 1)]
        edges = [-math.inf, *t, math.inf]
        new = [
            (pdf(edges[i]) - pdf(edges[i + 1])) / max(float(ndtr(edges[i + 1]) - ndtr(edges[i])), 1e-300)
            for i in range(n)
        ]
        done = max(abs(a - b) for a, b in zip(new, c, strict=True)) < 1e-12
        c = new
        if done:
            break
    return tuple(c), tuple((c[i] + c[i + 1]) / 2 for i in range(n - 1))


def gaussian_mse(bits: int) -> float:
    """Expected squared error of the Lloyd-Max quantizer on N(0, 1) (the paper's per-coordinate cost)."""
    import numpy as np

    c, _ = lloyd_max_gaussian(bits)
    x = np.random.default_rng(0).standard_normal(400_000)
    idx = np.searchsorted(np.array(c[:-1]) + np.diff(c) / 2, x) if len(c) > 1 else np.zeros(len(x), int)
    return float(np.mean((x - np.array(c)[idx]) ** 2))


@functools.cache
def rotation(dim: int, seed: int) -> torch.Tensor:
    """A seeded random orthogonal [dim, dim] matrix: H·D (normalized Walsh-Hadamard times random signs) when
    dim is a power of two, else the Q of a Gaussian matrix's QR (sign-fixed, so it is Haar-distributed)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if dim & (dim - 1) == 0:
        h = torch.ones(1, 1)
        while h.shape[0] < dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (dim,), generator=g).float() * 2 - 1
        return (h / math.sqrt(dim)) * signs  # columns scaled: H @ diag(signs)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    return q * torch.sign(torch.diagonal(r))


@functools.cache
def sketch_matrix(dim: int, seed: int) -> torch.Tensor:
    """The QJL projection: a seeded [dim, dim] matrix of independent N(0, 1) entries."""
    import torch

    return torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed + 7919))


class TurboQuantizer:
    """TurboQuant of head vectors [..., d]: norm + rotated Lloyd-Max codes (+ the QJL residual sketch)."""

    block = 1

    def __init__(self, bits: float, dim: int, *, qjl: bool, seed: int = 0) -> None:
        self.dim, self.qjl, self.seed = dim, qjl, seed
        mse_bits = bits - 1 if qjl else bits
        low = math.floor(mse_bits)
        self.n_high = round((mse_bits - low) * dim)  # coordinates that get low + 1 bits
        self.widths = (low + 1, low)  # the first n_high coordinates, then the rest
        self._tables: dict[Any, tuple[Any, ...]] = {}

    def _on(self, device: Any) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[Any, ...]]]:
        """(rotation, sketch, [(coordinates, width, centroids, boundaries)]) on `device`, made once."""
        import torch

        if device not in self._tables:
            scale = 1.0 / math.sqrt(self.dim)  # the codebook is for N(0, 1/d): the coordinates' distribution
            parts = []
            for part, w in (
                (slice(0, self.n_high), self.widths[0]),
                (slice(self.n_high, self.dim), self.widths[1]),
            ):
                centroids, bounds = lloyd_max_gaussian(w)
                c = torch.tensor(centroids, device=device) * scale
                parts.append((part, w, c, torch.tensor(bounds, device=device) * scale))
            sketch = sketch_matrix(self.dim, self.seed).to(device) if self.qjl else None
            self._tables[device] = (rotation(self.dim, self.seed).to(device), sketch, parts)
        return self._tables[device]

    def _mse_codes(
        self, y: torch.Tensor, parts: list[tuple[Any, ...]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Codes of the rotated unit vectors y per coordinate part, and y's reconstruction."""
        import torch

        codes, recon = [], torch.empty_like(y)
        for part, _, c, bounds in parts:
            idx = torch.bucketize(y[..., part].contiguous(), bounds)
            codes.append(idx)
            recon[..., part] = c[idx]
        return codes, recon

    def quantize(self, x: torch.Tensor) -> Packed:
        import torch

        rot, sketch, parts = self._on(x.device)
        x = x.float()
        norm = x.norm(dim=-1, keepdim=True).to(torch.float16)
        unit = x / norm.float().clamp(min=1e-12)
        codes, recon = self._mse_codes(unit @ rot.T, parts)
        out: Packed = {"norm": norm}
        for i, ((_, w, _, _), c) in enumerate(zip(parts, codes, strict=True)):
            out[f"codes{i}"] = pack_codes(c, w)
        if sketch is not None:
            residual = x - norm.float() * (recon @ rot)
            out["signs"] = pack_codes((residual @ sketch.T >= 0).to(torch.uint8), 1)
            out["residual_norm"] = residual.norm(dim=-1, keepdim=True).to(torch.float16)
        return out

    def dequantize(self, p: Packed, dim: int) -> torch.Tensor:
        import torch

        norm = p["norm"]
        rot, sketch, parts = self._on(norm.device)
        y = torch.empty((*norm.shape[:-1], dim), device=norm.device)
        for i, (part, w, c, _) in enumerate(parts):
            y[..., part] = c[unpack_codes(p[f"codes{i}"], w, part.stop - part.start)]
        x = norm.float() * (y @ rot)
        if sketch is not None:
            # E[S^T sign(S r)] = d * sqrt(2/pi) * r / |r| for Gaussian S, hence the sqrt(pi/2) / d factor:
            # <q, this> is the QJL estimator of <q, r>, unbiased.
            signs = unpack_codes(p["signs"], 1, dim).float() * 2 - 1
            x = x + math.sqrt(math.pi / 2) / dim * p["residual_norm"].float() * (signs @ sketch)
        return x


# ------------------------------------------------------------------------------------------------ the cache


def _cat(a: Packed | None, b: Packed) -> Packed:
    import torch

    if a is None:
        return b
    return {k: torch.cat([a[k], b[k]], dim=-2) for k in b}


def _nbytes(p: Packed | None) -> int:
    return sum(t.numel() * t.element_size() for t in (p or {}).values())


def quantizers(spec: KVCacheSpec, head_dim: int) -> tuple[Any, Any]:
    """(key quantizer, value quantizer) for a head width."""
    if spec.method == "quanto":
        return ChannelQuantizer(int(spec.bits), spec.group_size), TokenQuantizer(
            int(spec.value_bits), spec.group_size, head_dim
        )
    return (
        TurboQuantizer(spec.bits, head_dim, qjl=True, seed=spec.seed),
        TurboQuantizer(spec.value_bits, head_dim, qjl=False, seed=spec.seed + 1),
    )


@functools.lru_cache(maxsize=1)
def quantized_layer_class() -> type:
    """The quantized cache layer, a `DynamicLayer` subclass (made on first use, so that importing this module
    does not import transformers)."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class QuantizedKVLayer(DynamicLayer):
        """One attention layer's cache: `keys`/`values` hold the float residual window, older tokens sit
        quantized in `quantized_keys`/`quantized_values` (appended block by block, never re-quantized)."""

        def __init__(self, key_q: Any, value_q: Any, residual_length: int) -> None:
            super().__init__()
            self.key_q, self.value_q = key_q, value_q
            self.residual_length = residual_length
            self.cumulative_length = 0
            self.quantized_keys: Packed | None = None
            self.quantized_values: Packed | None = None
            self.head_dim = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self.head_dim = key_states.shape[-1]

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            parts_k, parts_v = [], []
            if self.quantized_keys is not None and self.quantized_values is not None:
                parts_k.append(self.key_q.dequantize(self.quantized_keys, self.head_dim).to(self.dtype))
                parts_v.append(self.value_q.dequantize(self.quantized_values, self.head_dim).to(self.dtype))
            keys = torch.cat([self._window(self.keys, key_states), key_states], dim=-2)
            values = torch.cat([self._window(self.values, value_states), value_states], dim=-2)
            keys_out = torch.cat([*parts_k, keys], dim=-2)
            values_out = torch.cat([*parts_v, values], dim=-2)
            self.cumulative_length += key_states.shape[-2]
            self.keys, self.values = self._flush(keys, values)
            return keys_out, values_out

        @staticmethod
        def _window(held: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
            return held if held is not None else like[..., :0, :]

        def _flush(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Quantize the oldest float tokens beyond the residual window, in whole blocks; the float
            window left."""
            block = max(self.key_q.block, self.value_q.block)
            n = (keys.shape[-2] - self.residual_length) // block * block
            if n <= 0:
                return keys, values
            self.quantized_keys = _cat(self.quantized_keys, self.key_q.quantize(keys[..., :n, :]))
            self.quantized_values = _cat(self.quantized_values, self.value_q.quantize(values[..., :n, :]))
            # copies: a slice would keep the whole float tensor alive
            return keys[..., n:, :].clone(), values[..., n:, :].clone()

        def get_seq_length(self) -> int:
            return self.cumulative_length

        def held_bytes(self) -> int:
            floats = sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)
            return floats + _nbytes(self.quantized_keys) + _nbytes(self.quantized_values)

        def reset(self) -> None:
            super().reset()
            self.cumulative_length = 0
            self.quantized_keys = self.quantized_values = None

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a quantized KV cache cannot be cropped")

    return QuantizedKVLayer


def quantized_cache(config: Any, spec: KVCacheSpec) -> Any:
    """A transformers `Cache` of quantized layers, one per decoder layer of `config`."""
    from transformers.cache_utils import Cache, get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types, _ = get_layer_types_and_kwargs(text)  # sliding windows, chunked or no attention per layer
    odd = sorted(set(layer_types) - {"full_attention"})
    if odd:
        raise BadInput(
            f"a quantized KV cache needs full-attention layers only; this model has {', '.join(odd)}"
        )
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if not head_dim:
        raise BadInput("a quantized KV cache needs attention heads, and this model's config names none")
    count = int(text.num_hidden_layers)
    beyond = [i for i in spec.float_layers if i >= count]
    if beyond:
        raise BadInput(
            f"float_layers {beyond} name decoder layers this model does not have (it has {count}: 0-{count - 1})"
        )
    from transformers.cache_utils import DynamicLayer

    layer_class = quantized_layer_class()
    key_q, value_q = quantizers(spec, head_dim)
    layers = [
        DynamicLayer() if i in spec.float_layers else layer_class(key_q, value_q, spec.residual_length)
        for i in range(count)
    ]
    return Cache(layers=layers)


def held_bytes(cache: Any) -> int:
    """Bytes a quantized cache holds (its layers' float windows and packed states; a layer kept float, its
    keys and values)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "held_bytes"):
            total += layer.held_bytes()
        else:
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
    return total


def is_quantized_cache(cache: Any) -> bool:
    """Whether any layer of the cache is quantized (float_layers may keep some in the model's precision)."""
    layers = getattr(cache, "layers", None) or []
    return any(hasattr(layer, "held_bytes") for layer in layers)


def decode_logits(module: Any, ids: torch.Tensor, spec: KVCacheSpec) -> torch.Tensor:
    """Logits [1, L, vocab] of `ids` [1, L] fed one token at a time through a fresh quantized cache, so each
    position attends to the earlier tokens as decoding would hold them (a full-sequence forward would not
    see the cache at all)."""
    import torch

    tensors = [*module.parameters()]
    device = tensors[0].device if tensors else torch.device("cpu")
    cache = quantized_cache(module.config, spec)
    ids = ids.to(device)
    out = []
    with torch.inference_mode():
        for i in range(ids.shape[1]):
            step = module(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            out.append(step.logits[:, -1:].float().cpu())
    return torch.cat(out, dim=1)
