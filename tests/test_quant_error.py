"""Per-layer quantization error (studio.inspection.quant_error) on builtin:tinylm: real quantized layers of
its weights (8 bits err less than 4, both histograms on one set of bins, an unchanged layer errs 0), the
AWQ / SmoothQuant rescaling taken out, and a saved round-to-nearest INT4 variant matched layer by layer to
the checkpoint its manifest names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.checkpoints import open_checkpoint
from studio.events import Done
from studio.inspection.quant_error import (
    fit_rescaling,
    layer_error,
    open_variant_quant_error,
    quantized_layers,
    rescaled_layers,
    source_of,
)
from studio.techniques.quantized_layers import DynamicInt8Linear, W8A8Linear, WeightOnlyLinear
from studio.worker import WorkerClient

LAYER = "model.layers.1.self_attn.q_proj"
RTN_RECIPE = {
    "version": 1,
    "model": "builtin:tinylm",
    "data": {"evaluation_examples": 2, "calibration_examples": 2},
    "steps": [{"technique": "quantize.weight_only", "params": {"bits": 4, "group_size": 32}}],
    "evaluate": {"batch_sizes": [1], "sequence_length": 16, "latency": False},
}


@pytest.fixture(scope="module")
def tinylm():
    return open_checkpoint("builtin:tinylm")


@pytest.fixture(scope="module")
def weight(tinylm):
    (ref,) = [r for r in tinylm.tensors() if r.name == f"{LAYER}.weight"]
    return ref.load().to(torch.float32)


def as_layers(**modules):
    root = torch.nn.Module()
    for name, module in modules.items():
        root.add_module(name, module)
    return quantized_layers(root)


def test_eight_bits_err_less_than_four_on_the_same_bins(weight):
    layers = as_layers(
        int8=WeightOnlyLinear.from_float(weight, None, 8, 32, True),
        int4=WeightOnlyLinear.from_float(weight, None, 4, 32, True),
        int4_asym=WeightOnlyLinear.from_float(weight, None, 4, 32, False),
    )
    e8, e4, e4a = (layer_error(layers[n], weight, 64) for n in ("int8", "int4", "int4_asym"))
    assert 0 < e8.relative_l2 < e4.relative_l2 < 0.5
    assert e4a.relative_l2 < 0.5
    # 4 bits have 16 levels per group, 8 bits 256: the error grows by about 16x
    assert 8 < e4.relative_l2 / e8.relative_l2 < 32
    for result, name in ((e8, "int8"), (e4, "int4"), (e4a, "int4_asym")):
        # one set of bins for both weights, spanning the values of either
        dq = layers[name].dequantize()
        lo, hi = min(float(weight.min()), float(dq.min())), max(float(weight.max()), float(dq.max()))
        assert result.edges[0] == pytest.approx(lo) and result.edges[-1] == pytest.approx(hi)
    assert len(e4.edges) == 65 and len(e4.float_counts) == len(e4.dequantized_counts) == 64
    assert sum(e4.float_counts) == sum(e4.dequantized_counts) == weight.numel()
    assert e4.float_counts != e4.dequantized_counts  # 16 levels per group pile values into fewer bins
    assert (
        e4.layer.bits == 4
        and e4.layer.group_size == 32
        and e4.layer.scheme == ("int4 symmetric, groups of 32 columns")
    )
    assert e4a.layer.scheme.startswith("int4 asymmetric")
    expected = float(torch.linalg.norm(layers["int4"].dequantize() - weight) / torch.linalg.norm(weight))
    assert e4.relative_l2 == pytest.approx(expected, rel=1e-5)


def test_an_unchanged_layer_errs_zero(weight):
    layer = as_layers(q=WeightOnlyLinear.from_float(weight, None, 4, 32, True))["q"]
    same = layer.dequantize()
    result = layer_error(layer, same, 32)
    assert result.relative_l2 == 0.0 and result.rms == 0.0
    assert result.float_counts == result.dequantized_counts


def test_every_int8_layout_is_read_back(weight):
    layers = as_layers(
        dynamic=DynamicInt8Linear.from_float(weight, None, per_channel=True),
        per_tensor=DynamicInt8Linear.from_float(weight, None, per_channel=False),
        w8a8=W8A8Linear.from_float(weight, None),
    )
    assert layers["dynamic"].scheme == "int8 symmetric, one scale per row"
    assert layers["per_tensor"].scheme == "int8 symmetric, one scale per tensor"
    errors = {n: layer_error(layer, weight).relative_l2 for n, layer in layers.items()}
    assert all(0 < e < 0.02 for e in errors.values()), errors
    assert errors["per_tensor"] > errors["dynamic"]  # one scale for all rows is coarser


def test_awq_style_rescaling_is_taken_out(weight):
    """A weight stored with its columns and rows rescaled (AWQ, SmoothQuant) and then quantized errs as
    much as the rounding alone, not as much as the rescaling."""
    gen = torch.Generator().manual_seed(0)
    cols = torch.exp(torch.randn(weight.shape[1], generator=gen) * 0.5)
    rows = torch.exp(torch.randn(weight.shape[0], generator=gen) * 0.3)
    scaled = weight * rows[:, None] * cols[None, :]
    layer = as_layers(q=WeightOnlyLinear.from_float(scaled, None, 8, 32, True))["q"]
    plain = layer_error(layer, weight)
    taken_out = layer_error(layer, weight, rescale=True)
    assert plain.relative_l2 > 0.3
    assert 0 < taken_out.relative_l2 < 0.02
    r, c = fit_rescaling(weight.numpy(), scaled.numpy())
    np.testing.assert_allclose(np.outer(r, c), np.outer(rows, cols), rtol=1e-3)
    assert rescaled_layers([{"technique": "quantize.awq", "modules": ["a"]}], ["a", "b"]) == {"a"}
    assert rescaled_layers([{"technique": "quantize.smoothquant", "smooth_only": True}], ["a", "b"]) == {
        "a",
        "b",
    }
    assert rescaled_layers([{"technique": "quantize.gptq", "modules": ["a"]}], ["a"]) == set()


@pytest.fixture(scope="module")
def rtn_variant(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-error")
    events = list(WorkerClient(RTN_RECIPE, root).events())
    assert isinstance(events[-1], Done), events[-1]
    (variant,) = events[-1].result["variants"]
    return open_checkpoint(root / "variants" / variant["id"])


def test_a_saved_variant_is_matched_to_its_source(rtn_variant):
    assert source_of(rtn_variant) == "builtin:tinylm"
    report = open_variant_quant_error(rtn_variant)
    assert report is not None
    assert len(report.layers) == 4 * 7  # every Linear of the four decoder blocks
    assert report.layer_of(f"{LAYER}.qweight") == LAYER and report.layer_of(LAYER) == LAYER
    assert report.layer_of("model.layers.1.input_layernorm.weight") is None
    assert report.layer_of(f"{LAYER}.scales") is None  # the scales keep their own histogram
    errors = report.relative_errors()
    assert set(errors) == set(report.layers)
    assert all(0.03 < e < 0.3 for e in errors.values()), errors
    result = report.error(LAYER, 48)
    assert result is not None and result.source_tensor == f"{LAYER}.weight"
    assert result.relative_l2 == pytest.approx(errors[LAYER])
    assert len(result.float_counts) == len(result.dequantized_counts) == 48
    assert not result.rescaled


def test_a_checkpoint_that_is_no_variant_has_no_report(tinylm):
    assert source_of(tinylm) is None
    assert open_variant_quant_error(tinylm) is None
