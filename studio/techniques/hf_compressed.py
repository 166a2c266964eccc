"""4-bit weight-only causal-LM variants in compressed-tensors' `pack-quantized` form, which plain transformers
loads on CPU (its compressed-tensors quantizer, with compressed-tensors installed) into the same model.

Why this form: the studio packs two 4-bit codes per byte, and compressed-tensors packs eight per int32 word
with the same nibble order (element 2j in the low nibble of its byte, 2j+1 in the high one, codes offset by
8), so the file keeps the studio's size; torchao's CPU format would keep one code per byte. transformers
builds each listed Linear with `weight_packed` / `weight_scale` (/ `weight_zero_point`) parameters and
dequantizes `(q - zero) * scale` group by group on the first forward pass, then calls the same `linear`:
the same weights, so the same logits.

What is written per quantized layer (symmetric `WeightOnlyLinear` layers, any mix of 4 and 8 bits and
group sizes): `weight_packed` int32 [out, in * bits / 32] (signed codes in [-2^(bits-1), 2^(bits-1)),
packed by compressed-tensors' `pack_to_int32`), `weight_scale` [out, in / group] in the weight's dtype
(the studio's symmetric scales may be negative; dequantization only multiplies) and `weight_shape`
[out, in]. The quantization_config has one config group per (bits, group size) scheme, each targeting its
layers by exact name, so float Linear layers (a head left float, layers mixed precision kept float) are
targeted by no group and stay dense.

Asymmetric layers are not written here: compressed-tensors 0.20.1 packs zero points into int32 along the
output dimension, while transformers 5.23 builds the model's `weight_zero_point` unpacked (int8 [out,
groups]) before loading, so a packed one stops the load on a shape mismatch and an unpacked one fails the
int32-only unpacking on the first forward (`studio.techniques.hf_format` refuses those variants).

The studio reads the same tensors back into its own layers (`read_layer`, called from
`WeightOnlyLinear`'s state-dict loading), so the folder still reopens in Model Studio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"


def _scheme_of(layer: Any) -> tuple[int, int]:
    return int(layer.bits), int(layer.group_size)


def signed_codes(layer: Any) -> Any:
    """A symmetric layer's codes as compressed-tensors' signed int8 values: the studio stores 4-bit codes
    with an offset of 8 and 8-bit ones already signed."""
    import torch

    if not layer.symmetric:
        raise ValueError("compressed-tensors' packed form is written for symmetric layers only")
    codes = layer.codes().to(torch.int16)
    return (codes - 8 if layer.bits == 4 else codes).to(torch.int8)


def layer_tensors(layer: Any) -> dict[str, Any]:
    """The compressed-tensors tensors of one symmetric WeightOnlyLinear, by local name."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return {
        "weight_packed": pack_to_int32(signed_codes(layer), layer.bits),
        # in the layer's compute dtype: transformers reads the scales as the model's dtype (an up-cast of
        # float16 scales is exact)
        "weight_scale": layer.scales.detach().to(layer.dtype).contiguous(),
        "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }


def read_layer(layer: Any, state: dict[str, Any], prefix: str) -> None:
    """Replace a layer's compressed-tensors entries in `state` by the studio's buffers (qweight, scales);
    leaves `state` alone when it holds no `weight_packed` for this layer."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    packed = state.pop(prefix + "weight_packed", None)
    if packed is None:
        return
    shape = torch.Size(int(v) for v in state.pop(prefix + "weight_shape"))
    codes = unpack_from_int32(packed, layer.bits, shape)
    if layer.bits == 4:
        nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
        codes = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    state[prefix + "qweight"] = codes.to(layer.qweight.dtype)
    state[prefix + "scales"] = state.pop(prefix + "weight_scale")


def quantization_config(layers: list[tuple[str, Any]]) -> dict[str, Any]:
    """The quantization_config transformers' compressed-tensors quantizer reads: one group per scheme,
    targeting its layers by name (so every other module stays float)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_scheme: dict[tuple[int, int], list[str]] = {}
    for name, layer in layers:
        by_scheme.setdefault(_scheme_of(layer), []).append(name)
    groups = {}
    for i, ((bits, group_size), names) in enumerate(sorted(by_scheme.items())):
        weights = QuantizationArgs(
            num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size
        )
        groups[f"group_{i}"] = QuantizationScheme(targets=names, weights=weights, format=FORMAT)
    config = QuantizationConfig(
        config_groups=groups, quant_method=QUANT_METHOD, format=FORMAT, quantization_status="compressed"
    )
    return config.model_dump(exclude_none=True)


def drop_tied_sources(module: Any, state: dict[str, Any]) -> None:
    """safetensors holds one name per shared tensor: keep a tied head's name, as save_model does."""
    for target, source in dict(getattr(module, "all_tied_weights_keys", None) or {}).items():
        if target in state and source in state:
            state.pop(source)


def is_compressed(config: dict[str, Any]) -> bool:
    q = config.get("quantization_config") or {}
    return q.get("quant_method") == QUANT_METHOD


def write_compressed(
    module: Any, layers: list[tuple[str, Any]], folder: Path, config: dict[str, Any]
) -> None:
    """model.safetensors with the quantized layers in compressed-tensors' form, and the quantization_config
    set in `config` (not yet written)."""
    from safetensors.torch import save_file

    state = dict(module.state_dict())
    for name, layer in layers:
        for key in ("qweight", "scales", "zeros"):
            state.pop(f"{name}.{key}", None)
        for key, value in layer_tensors(layer).items():
            state[f"{name}.{key}"] = value
    drop_tied_sources(module, state)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), {"format": "pt"}
    )
    config["quantization_config"] = quantization_config(layers)
