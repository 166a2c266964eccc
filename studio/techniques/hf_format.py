"""What plain transformers makes of a saved causal-LM variant: the same model, or a loud refusal.

A variant folder is a Hugging Face folder (config.json + model.safetensors), so someone will call
`AutoModelForCausalLM.from_pretrained(folder)` on it. For a variant with the studio's quantized layers
that would be silently wrong: transformers skips a `quantization_config` it does not know (with a
warning), finds no `weight` for the quantized layers and initialises them at random. So every variant with
quantized layers is written in one of three ways:

- **torchao** (a causal LM whose quantized layers are all 8-bit weight-only: quantize.weight_only,
  quantize.gptq and quantize.awq with bits 8):
  each layer's codes, scales and zero points become a torchao `IntxUnpackedToInt8Tensor` (one int8 code
  per weight, as the studio stores 8-bit codes, so the file keeps its size), saved with torchao's
  safetensors metadata, and config.json carries a `TorchAoConfig`. transformers 5 with torchao installed
  loads it on CPU and computes the same logits (the tensor dequantizes `(q - zero) * scale` and calls the
  same `linear`); the studio reads the same tensors back into its own layers (`WeightOnlyLinear`).
- **compressed** (a causal LM with 4-bit weight-only layers, all symmetric: RTN, GPTQ and AWQ with bits 4,
  8-bit layers beside them allowed): compressed-tensors' `pack-quantized` form, which keeps 4-bit codes
  packed and which transformers' compressed-tensors quantizer loads on CPU (`studio.techniques.hf_compressed`).
- **refused**: asymmetric 4-bit layers (compressed-tensors 0.20.1 packs zero points into int32 along the
  output dimension, but transformers 5.23 builds the model's zero-point parameters unpacked, int8
  [out, groups], so the load stops on a shape mismatch, and unpacked ones fail compressed-tensors'
  int32-only unpacking on the first forward), W8A8 and dynamic-INT8 layers (activation quantization
  transformers has no CPU format for with the same rounding), int8 embedding tables, custom KV caches, and
  quantized encoders (whose saved layout the studio's weight tools read as it is). config.json carries a
  `quantization_config` whose torchao type does not exist, so `from_pretrained` raises (`Failed to find
  class ModelStudioQuantizedLayers...`) instead of loading a float model with random weights; the studio's
  own loader rebuilds it from `studio_transforms` as before. `model-studio export --format hf` converts
  the remaining 4-bit weight-only layers to the torchao format (larger, loadable) and refuses the rest
  with the reason.

Variants without quantized layers (smoothed-only, half precision) stay plain folders.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from studio.errors import BadInput
from studio.techniques.hf_compressed import drop_tied_sources, is_compressed, write_compressed

QUANTIZATION_KEY = "quantization_config"
REFUSED_TYPE = "ModelStudioQuantizedLayers"
# Records whose effect lives outside the weights, which transformers would not reproduce.
UNREPRESENTED_RECORDS = {"kv_cache.quantize": "a quantized KV cache"}


@dataclasses.dataclass(frozen=True)
class Form:
    """How a variant is written for transformers: 'plain', 'torchao' or 'refused' (with why)."""

    kind: str
    reason: str = ""


def quantized_layers(module: Any) -> list[tuple[str, Any]]:
    """The studio's quantized layers in `module`, by name."""
    from studio.techniques import quantized_layers as ql

    kinds = (ql.DynamicInt8Linear, ql.Int8Embedding, ql.WeightOnlyLinear, ql.W8A8Linear)
    return [(n, m) for n, m in module.named_modules() if isinstance(m, kinds)]


def form_of(module: Any, transforms: list[dict[str, Any]], *, export: bool = False) -> Form:
    """Which form a variant takes: 'plain', 'torchao', 'compressed' or 'refused'. A saved variant takes a
    loadable form only when it is a causal LM; an export (`export`) also converts asymmetric 4-bit layers
    (to torchao's form, at twice the size of packed codes) and other architectures."""
    from studio.techniques.quantized_layers import WeightOnlyEmbedding, WeightOnlyLinear

    for record in transforms:
        what = UNREPRESENTED_RECORDS.get(str(record.get("technique")))
        if what:
            return Form("refused", f"{what} ({record['technique']}), which transformers does not rebuild")
    layers = quantized_layers(module)
    if not layers:
        return Form("plain")
    for name, layer in layers:
        if isinstance(layer, WeightOnlyEmbedding) or not isinstance(layer, WeightOnlyLinear):
            return Form(
                "refused",
                f"layer '{name}' is a {type(layer).__name__}, which no transformers format on CPU computes alike",
            )
    causal = type(module).__name__.endswith("ForCausalLM")
    four = next((name for name, layer in layers if layer.bits == 4), None)
    if causal and four is not None:
        asymmetric = next((name for name, layer in layers if not layer.symmetric), None)
        if asymmetric is None:
            return Form("compressed")
        if not export:
            return Form(
                "refused",
                f"layer '{asymmetric}' has zero points beside 4-bit codes, whose packed compressed-tensors "
                "form transformers cannot load",
            )
        return Form("torchao")
    if four is not None and not export:
        return Form("refused", f"layer '{four}' holds 4-bit codes packed two per byte")
    if not export and not causal:
        # encoders keep the studio's layout, which its weight inspection and tools read
        return Form("refused", f"a {type(module).__name__} keeps the studio's own quantized layout")
    return Form("torchao")


def refusal(reason: str) -> dict[str, Any]:
    """A quantization_config transformers refuses loudly: torchao cannot find the named type."""
    note = (
        f"{REFUSED_TYPE}: this Model Studio variant cannot be loaded by transformers as saved ({reason}); "
        "open it with Model Studio, or use `model-studio export --format hf` where a loadable form exists"
    )
    return {
        "quant_method": "torchao",
        "quant_type": {"default": {"_type": note, "_version": 1, "_data": {}}},
        "model_studio": note,
    }


def _torchao_weight(layer: Any) -> Any:
    """The layer's weight as a torchao IntxUnpackedToInt8Tensor with the same codes, scales and zeros."""
    import torch
    from torchao.quantization import IntxUnpackedToInt8Tensor

    offset = 2 ** (layer.bits - 1)  # the studio's unsigned codes are centred on 8 (4 bit) or 128 (8 bit)
    codes = layer.codes().to(torch.int16)
    if layer.zeros is None:
        qdata = codes - offset if layer.bits == 4 else codes
        zero = torch.zeros_like(layer.scales, dtype=torch.int16)
    else:
        qdata = codes - offset
        zero = layer.zeros.to(torch.int16) - offset
    return IntxUnpackedToInt8Tensor(
        qdata.to(torch.int8).contiguous(),
        layer.scales.detach().to(layer.dtype),  # float16 scales up-cast exactly to the model's dtype
        zero.to(torch.int8).contiguous(),
        getattr(torch, f"int{layer.bits}"),
        (1, layer.group_size),
        layer.dtype,
        None,
    )


def torchao_config(module: Any, layers: list[tuple[str, Any]]) -> dict[str, Any]:
    """A TorchAoConfig naming the float Linear layers left unconverted. The per-layer block sizes are in
    the weights' metadata, which is what a pre-quantized load reads; the config states the first layer's."""
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup
    from transformers import TorchAoConfig

    from studio.techniques.layer_swap import is_linear

    _, first = layers[0]
    config = IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{first.bits}"),
        granularity=PerGroup(first.group_size),
        mapping_type=MappingType.SYMMETRIC if first.symmetric else MappingType.ASYMMETRIC,
    )
    floats = [n for n, m in module.named_modules() if n and is_linear(m)]
    return TorchAoConfig(config, modules_to_not_convert=floats or None).to_dict()


def write_torchao(module: Any, folder: Path, config: dict[str, Any]) -> None:
    """model.safetensors in torchao's flattened form, and the TorchAoConfig in `config` (not yet written)."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    layers = quantized_layers(module)
    state = dict(module.state_dict())
    for name, layer in layers:
        for key in ("qweight", "scales", "zeros"):
            state.pop(f"{name}.{key}", None)
        state[f"{name}.weight"] = _torchao_weight(layer)
    drop_tied_sources(module, state)
    tensors, metadata = flatten_tensor_state_dict(state)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        {
            **metadata,
            "format": "pt",
        },
    )
    config[QUANTIZATION_KEY] = torchao_config(module, layers)


def save_weights(module: Any, transforms: list[dict[str, Any]], folder: Path, config: dict[str, Any]) -> bool:
    """Write the weights when the variant needs transformers' attention (True), setting `config`'s
    quantization_config; False leaves the plain save to the caller (after a refusal, when refused)."""
    config.pop(QUANTIZATION_KEY, None)  # an opened variant's config carries the one it was saved with
    form = form_of(module, transforms)
    if form.kind == "torchao":
        write_torchao(module, folder, config)
        return True
    if form.kind == "compressed":
        write_compressed(module, quantized_layers(module), folder, config)
        return True
    if form.kind == "refused":
        config[QUANTIZATION_KEY] = refusal(form.reason)
    return False


# ---------------------------------------------------------------------------------------------- export


def export_folder(folder: Path, studio_module: Any, transforms: list[dict[str, Any]], vid: str) -> None:
    """Make an exported copy of a variant loadable by plain transformers and prove it: a refused variant is
    converted (asymmetric 4-bit weight-only layers) or refused with the reason; then `from_pretrained` must compute
    the studio's logits."""
    config_file = folder / "config.json"
    data = json.loads(config_file.read_text())
    form = form_of(studio_module, transforms, export=True)
    if form.kind == "refused":
        raise BadInput(
            f"variant {vid} cannot be loaded by plain transformers: {form.reason}; it reopens in "
            "Model Studio, or export it to ONNX"
        )
    if form.kind == "torchao" and not _is_torchao(data):
        (folder / "model.safetensors").unlink(missing_ok=True)
        write_torchao(studio_module, folder, data)
    if form.kind == "compressed" and not is_compressed(data):
        (folder / "model.safetensors").unlink(missing_ok=True)
        write_compressed(studio_module, quantized_layers(studio_module), folder, data)
    data.pop("studio_transforms", None)
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    check_same_logits(folder, studio_module, vid)


def _is_torchao(config: dict[str, Any]) -> bool:
    q = config.get(QUANTIZATION_KEY) or {}
    kind = ((q.get("quant_type") or {}).get("default") or {}).get("_type", "")
    return q.get("quant_method") == "torchao" and not str(kind).startswith(REFUSED_TYPE)


def check_same_logits(folder: Path, studio_module: Any, vid: str) -> None:
    """Load `folder` with plain transformers and compare its logits with the studio module's."""
    import torch

    from studio.checkpoints.hf import load_pretrained, model_class, read_config

    config = read_config(folder)
    plain = load_pretrained(model_class(config, folder), folder).eval()
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    ids = torch.arange(16, dtype=torch.long).reshape(1, 16) % max(vocab, 1)
    with torch.no_grad():
        ours = _first_output(studio_module(input_ids=ids))
        theirs = _first_output(plain(input_ids=ids))
    scale = float(ours.abs().max()) or 1.0
    if ours.shape != theirs.shape or float((ours - theirs).abs().max()) > 1e-4 * scale:
        raise BadInput(f"transformers loads the exported folder of variant {vid} with different outputs")


def _first_output(out: Any) -> Any:
    import torch

    return (out.logits if hasattr(out, "logits") else out[0]).to(torch.float32)
