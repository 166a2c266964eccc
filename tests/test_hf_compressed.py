"""4-bit causal-LM variants in compressed-tensors' pack-quantized form: plain
`AutoModelForCausalLM.from_pretrained` on CPU loads builtin:tinylm quantized by round-to-nearest (groups of
32) and by GPTQ, and a small random Llama mixing 4-bit, 8-bit and float layers, and computes the studio's
logits (the same dequantized weights); the studio reopens every folder into its own layers; asymmetric
4-bit layers, which this transformers cannot load in that form, are refused."""

from __future__ import annotations

import json

import pytest

from studio.checkpoints import open_checkpoint
from studio.evaluation.data import Example
from studio.techniques.torch_io import save_torch_variant
from tests.test_hf_loadable import logits_of, transformers_load
from tests.test_tech_gptq import CALIBRATION_MODULES, apply, docstrings


@pytest.fixture(scope="module")
def tinylm():
    return open_checkpoint("builtin:tinylm")


@pytest.fixture(scope="module")
def ids():
    import torch

    return torch.arange(5, 69, dtype=torch.long).reshape(1, 64)


def quantization_config(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def assert_same_model(folder, module, ids, quantized, float_layers=()):
    """transformers' load computes `module`'s logits with the quantized layers decompressed from the packed
    codes; the studio reopens the folder into WeightOnlyLinear layers with the very same logits."""
    import torch

    plain = transformers_load(folder)
    ours = logits_of(module, ids)
    theirs = logits_of(plain, ids)
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-5 * float(ours.abs().max()))
    named = dict(plain.named_modules())
    for name, layer in dict(module.named_modules()).items():
        if name in quantized:
            # the dense weight transformers rebuilt is the studio's dequantized one, value for value
            assert torch.equal(named[name].weight, layer.dequantize())
    for name in float_layers:
        assert torch.equal(named[name].weight, dict(module.named_modules())[name].weight)
    back = open_checkpoint(str(folder)).module
    for name in quantized:
        assert type(dict(back.named_modules())[name]).__name__ == "WeightOnlyLinear"
    assert torch.equal(logits_of(back, ids), ours)


@pytest.mark.parametrize(
    ("technique", "params"),
    [
        ("quantize.weight_only", {"bits": 4, "group_size": 32}),
        ("quantize.gptq", {"bits": 4, "group_size": 32, "calibration_examples": 24}),
    ],
)
def test_a_4bit_tinylm_variant_loads_in_plain_transformers_with_the_studios_logits(
    tinylm, ids, tmp_path, technique, params
):
    from studio.techniques.hf_format import quantized_layers

    calibration = [Example(text=t) for t in docstrings(CALIBRATION_MODULES)][:24]
    state, _ = apply(tinylm, technique, params, calibration, tmp_path)
    folder = tmp_path / "v"
    save_torch_variant(state.module, state.transforms, folder, tinylm.path)
    config = quantization_config(folder)
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    (scheme,) = config["config_groups"].values()
    assert scheme["weights"]["num_bits"] == 4 and scheme["weights"]["group_size"] == 32
    layers = dict(quantized_layers(state.module))
    assert sorted(scheme["targets"]) == sorted(layers)
    assert_same_model(folder, state.module, ids, layers)
    # the codes stay packed (eight per int32 word): under 45% of the float file, as the studio's own layout
    float_bytes = (tinylm.path / "model.safetensors").stat().st_size
    assert (folder / "model.safetensors").stat().st_size < 0.45 * float_bytes


def test_a_llama_mixing_4bit_8bit_and_float_layers_loads_alike(llama, ids, tmp_path):
    model = open_checkpoint(str(llama))
    # attention and the (untied) head 4-bit in groups of 16, gate/up 8-bit per channel, down_proj float
    state, _ = apply(
        model, "quantize.weight_only", {"bits": 4, "group_size": 16, "exclude": ["*.mlp.*"]}, [], tmp_path
    )
    state, _ = apply(
        model, "quantize.weight_only", {"bits": 8, "exclude": ["*.mlp.down_proj"]}, [], tmp_path, state=state
    )
    folder = tmp_path / "mixed"
    save_torch_variant(state.module, state.transforms, folder, model.path)
    groups = {
        (g["weights"]["num_bits"], g["weights"]["group_size"]): sorted(g["targets"])
        for g in quantization_config(folder)["config_groups"].values()
    }
    four = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"] + ["lm_head"]
    eight = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up")]
    assert groups == {(4, 16): sorted(four), (8, 32): sorted(eight)}
    float_layers = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert_same_model(folder, state.module, ids, four + eight, float_layers)


def test_asymmetric_4bit_layers_are_refused_loudly(tinylm, ids, tmp_path):
    import torch

    params = {"bits": 4, "group_size": 32, "symmetric": False}
    state, _ = apply(tinylm, "quantize.weight_only", params, [], tmp_path)
    folder = tmp_path / "asym"
    save_torch_variant(state.module, state.transforms, folder, tinylm.path)
    with pytest.raises(Exception, match="ModelStudioQuantizedLayers") as raised:
        transformers_load(folder)
    assert "zero points beside 4-bit codes" in str(raised.value)
    back = open_checkpoint(str(folder))
    assert torch.equal(logits_of(back.module, ids), logits_of(state.module, ids))
