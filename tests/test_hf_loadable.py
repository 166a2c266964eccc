"""Quantized causal-LM variants and plain transformers: an 8-bit weight-only variant (round-to-nearest, GPTQ)
loads with `AutoModelForCausalLM.from_pretrained` and computes the studio's logits; a variant no transformers
format represents (asymmetric 4-bit codes, W8A8, dynamic INT8, a quantized KV cache) makes `from_pretrained`
raise rather than load a float model with random weights, and still reopens in the studio; `model-studio
export --format hf` hands over loadable folders (converting asymmetric 4-bit layers) and refuses the rest.
Symmetric 4-bit variants load in compressed-tensors' form: tests/test_hf_compressed.py."""

from __future__ import annotations

import json
import warnings

import pytest

from studio.checkpoints import open_checkpoint
from studio.errors import BadInput
from studio.evaluation.data import Example
from studio.export import export_variant
from studio.techniques.torch_io import save_torch_variant
from studio.variants import Workspace
from tests.test_tech_gptq import CALIBRATION_MODULES, apply, docstrings


@pytest.fixture(scope="module")
def tinylm():
    return open_checkpoint("builtin:tinylm")


@pytest.fixture(scope="module")
def calibration():
    return [Example(text=t) for t in docstrings(CALIBRATION_MODULES)][:24]


@pytest.fixture(scope="module")
def ids():
    import torch

    return torch.arange(5, 69, dtype=torch.long).reshape(1, 64)


def logits_of(module, ids):
    import torch

    with torch.no_grad():
        return module(input_ids=ids).logits


def transformers_load(folder):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()


def saved(tinylm, calibration, tmp_path, technique, params, name="v"):
    state, _ = apply(tinylm, technique, params, calibration, tmp_path)
    folder = tmp_path / name
    save_torch_variant(state.module, state.transforms, folder, tinylm.path)
    return state, folder


LOADABLE = [
    ("quantize.weight_only", {"bits": 8}),
    ("quantize.weight_only", {"bits": 8, "group_size": 64, "symmetric": False}),
    ("quantize.gptq", {"bits": 8, "group_size": 64, "calibration_examples": 24}),
]


@pytest.mark.parametrize(("technique", "params"), LOADABLE)
def test_an_8bit_weight_only_variant_loads_in_plain_transformers_with_the_studios_logits(
    tinylm, calibration, ids, tmp_path, technique, params
):
    import torch

    state, folder = saved(tinylm, calibration, tmp_path, technique, params)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    plain = transformers_load(folder)
    weight = plain.model.layers[1].mlp.down_proj.weight
    assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"  # quantized, not a float layer
    ours = logits_of(state.module, ids)
    assert torch.allclose(logits_of(plain, ids), ours, rtol=0, atol=1e-5 * float(ours.abs().max()))
    back = open_checkpoint(str(folder))  # the studio's own loader reads the same tensors into its layers
    assert type(back.module.model.layers[1].mlp.down_proj).__name__ == "WeightOnlyLinear"
    assert torch.equal(logits_of(back.module, ids), ours)
    # one byte per weight as before: about a quarter of float32 for the quantized layers
    float_bytes = (tinylm.path / "model.safetensors").stat().st_size
    assert (folder / "model.safetensors").stat().st_size < 0.55 * float_bytes


REFUSED = [
    ("quantize.weight_only", {"bits": 4, "group_size": 32, "symmetric": False}, "zero points beside 4-bit"),
    ("quantize.smoothquant", {"calibration_examples": 24}, "W8A8Linear"),
    ("quantize.dynamic_int8", {}, "DynamicInt8Linear"),
    ("kv_cache.quantize", {"method": "quanto", "bits": 4}, "quantized KV cache"),
]


@pytest.mark.parametrize(("technique", "params", "reason"), REFUSED)
def test_a_variant_transformers_cannot_represent_makes_from_pretrained_raise(
    tinylm, calibration, ids, tmp_path, technique, params, reason
):
    import torch

    state, folder = saved(tinylm, calibration, tmp_path, technique, params)
    with pytest.raises(Exception, match="ModelStudioQuantizedLayers") as raised:
        transformers_load(folder)
    assert reason in str(raised.value)
    back = open_checkpoint(str(folder))  # the studio still rebuilds it
    assert torch.equal(logits_of(back.module, ids), logits_of(state.module, ids))


def test_smoothing_alone_stays_a_plain_folder(tinylm, calibration, ids, tmp_path):
    import torch

    state, folder = saved(tinylm, calibration, tmp_path, "quantize.smoothquant", {"smooth_only": True})
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ours = logits_of(state.module, ids)
    assert torch.allclose(
        logits_of(transformers_load(folder), ids), ours, atol=1e-5 * float(ours.abs().max())
    )


# ---------------------------------------------------------------------------------------------- export


def committed(ws, state, tinylm):
    with ws.job_folder() as job:
        staged = job / "artifact"
        save_torch_variant(state.module, state.transforms, staged, tinylm.path)
        return ws.commit_variant(
            staged, kind="torch", parent=None, model="builtin:tinylm", recipe={}, metrics={}
        )


def test_export_hf_converts_int4_passes_int8_on_and_refuses_w8a8(tinylm, calibration, ids, tmp_path):
    import torch

    ws = Workspace(tmp_path / "ws")
    params = {"bits": 4, "group_size": 32, "symmetric": False}
    int4, _ = apply(tinylm, "quantize.weight_only", params, calibration, tmp_path)
    row = committed(ws, int4, tinylm)
    out = export_variant(ws, row["id"], "hf", tmp_path / "int4")
    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao" and "studio_transforms" not in config
    ours = logits_of(int4.module, ids)
    theirs = logits_of(transformers_load(out["out"]), ids)
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-5 * float(ours.abs().max()))

    # symmetric 4-bit layers are saved loadable already: the export keeps their packed form
    int4, _ = apply(tinylm, "quantize.weight_only", {"bits": 4, "group_size": 32}, calibration, tmp_path)
    out = export_variant(ws, committed(ws, int4, tinylm)["id"], "hf", tmp_path / "int4-packed")
    config = json.loads((tmp_path / "int4-packed" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    ours = logits_of(int4.module, ids)
    theirs = logits_of(transformers_load(out["out"]), ids)
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-5 * float(ours.abs().max()))

    int8, _ = apply(tinylm, "quantize.weight_only", {"bits": 8}, calibration, tmp_path)
    out = export_variant(ws, committed(ws, int8, tinylm)["id"], "hf", tmp_path / "int8")
    ours = logits_of(int8.module, ids)
    theirs = logits_of(transformers_load(out["out"]), ids)
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-5 * float(ours.abs().max()))

    w8a8, _ = apply(tinylm, "quantize.smoothquant", {"calibration_examples": 24}, calibration, tmp_path)
    row = committed(ws, w8a8, tinylm)
    with pytest.raises(BadInput, match=r"cannot be loaded by plain transformers: layer .* is a W8A8Linear"):
        export_variant(ws, row["id"], "hf", tmp_path / "w8a8")
    assert not (tmp_path / "w8a8").exists()
