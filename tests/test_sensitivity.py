"""Per-layer quantization sensitivity and mixed precision, on a small real BERT encoder in which one
layer is made deliberately fragile: every row of the last FFN output projection gets one outlier 100x
larger than its other weights, on an input the model keeps at zero (the FFN neuron feeding it is switched
off), so the model computes the same kind of thing but quantizing that layer (per channel, or in groups)
rounds its other weights away.

What must hold: that layer is ranked first by every scheme, the mixed-precision option of the
quantization blocks keeps exactly such layers float, and an excluded layer stays float in the saved
artifact (torch variant folder and ONNX graph)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from studio.checkpoints import open_checkpoint
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.sensitivity import choose_exclusions_from_report, layer_sensitivity
from studio.techniques.base import RunContext, get_technique, initial_state
from studio.techniques.mixed_precision import FidelityProbe, TorchScheme, choose_exclusions

FRAGILE = "encoder.layer.1.output.dense"
FRAGILE_NODE = "/model/encoder/layer.1/output/dense/MatMul"
SEQ = 32


@pytest.fixture(scope="module")
def fragile_encoder(tmp_path_factory) -> Path:
    """A 2-layer BERT encoder (hidden 64, FFN 128) with MiniLM's tokenizer; FRAGILE has one outlier per
    row, on input 0, which is always ~0 (GELU(-10))."""
    import torch
    from transformers import BertConfig, BertModel

    from tests.conftest import TOKENIZER_FILES, minilm_dir

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        initializer_range=0.05,
    )
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        feeding = model.get_submodule("encoder.layer.1.intermediate.dense")
        feeding.weight[0] = 0.0
        feeding.bias[0] = -10.0
        w = model.get_submodule(FRAGILE).weight
        w.mul_(4.0)  # the FFN weighs on the output, so its precision matters
        w[:, 0] = w.abs().max() * 100.0
    folder = tmp_path_factory.mktemp("fragile") / "encoder"
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (minilm_dir() / name).exists():
            shutil.copy(minilm_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def examples():
    return load_examples("builtin:sentences", 12)


def _context(model, tmp_path: Path, examples) -> tuple[RunContext, list[dict]]:
    events: list[dict] = []
    ctx = RunContext(
        original=model, workdir=tmp_path, calibration=examples, sequence_length=SEQ, emit=events.append
    )
    return ctx, events


# ---------------------------------------------------------------------------------------------- ranking


def test_torch_int8_ranks_the_fragile_layer_first_in_both_modes(fragile_encoder, examples):
    model = open_checkpoint(fragile_encoder)
    seen: list[float] = []
    report = layer_sensitivity(model, "torch-int8", examples, SEQ, "both", lambda f, _m: seen.append(f))
    ranked = report.ranked()
    assert ranked[0].layer == FRAGILE
    others = [r.fidelity_loss for r in ranked[1:]]
    assert ranked[0].fidelity_loss > 10 * max(max(others), 1e-4)
    # keeping it float wins back more than keeping any other layer float
    assert ranked[0].recovered == max(r.recovered for r in report.layers)
    assert report.fidelity_none == pytest.approx(1.0, abs=1e-6)
    assert report.fidelity_all < 1.0 - ranked[0].fidelity_loss / 2
    # every Linear layer and every embedding table is a candidate, reported with its size
    kinds = {r.layer: r.kind for r in report.layers}
    assert kinds["embeddings.word_embeddings"] == "embedding" and kinds[FRAGILE] == "linear"
    assert next(r.parameters for r in report.layers if r.layer == FRAGILE) == 128 * 64
    assert seen and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    data = report.to_dict()
    assert data["layers"][0]["layer"] == FRAGILE
    assert data["exclusion_parameter"] == {"technique": "quantize.dynamic_int8", "param": "exclude"}
    json.dumps(data)  # what --json prints and the GUI plots


def test_int4_and_onnx_int8_rank_the_fragile_layer_first(fragile_encoder, examples, tmp_path):
    model = open_checkpoint(fragile_encoder)
    int4 = layer_sensitivity(model, "int4", examples, SEQ, "one", group_size=32)
    assert int4.ranked()[0].layer == FRAGILE
    assert {r.kind for r in int4.layers} == {"linear"}
    assert int4.settings == {"bits": 4, "group_size": 32, "symmetric": True}

    onnx_report = layer_sensitivity(model, "onnx-int8", examples, SEQ, "one", workdir=tmp_path)
    first = onnx_report.ranked()[0]
    assert first.layer == FRAGILE_NODE and first.module == FRAGILE
    kinds = {r.kind for r in onnx_report.layers}
    assert "attention" in kinds  # the fused Attention nodes are layers of this scheme
    assert all(r.module for r in onnx_report.layers)
    assert onnx_report.exclusion_block() == ("onnx.quantize_dynamic", "exclude_nodes")


def test_estimated_exclusions_and_refusals(fragile_encoder, examples):
    model = open_checkpoint(fragile_encoder)
    report = layer_sensitivity(model, "torch-int8", examples, SEQ, "all-but-one")
    assert all(r.fidelity_alone is None for r in report.layers)
    choice = choose_exclusions_from_report(
        report, min(0.9999, report.fidelity_all + 0.5 * (1 - report.fidelity_all))
    )
    assert choice["excluded"][0] == FRAGILE and choice["met"]
    assert choose_exclusions_from_report(report, 0.0001)["excluded"] == []
    with pytest.raises(BadInput, match="unknown scheme"):
        layer_sensitivity(model, "int3", examples, SEQ)
    with pytest.raises(BadInput, match="unknown mode"):
        layer_sensitivity(model, "torch-int8", examples, SEQ, "some")


def test_choose_exclusions_measures_until_the_target(fragile_encoder, examples):
    model = open_checkpoint(fragile_encoder)
    scheme = TorchScheme(model.module, "torch-int8")
    probe = FidelityProbe(model, examples, SEQ)
    full = scheme.fidelity([layer.name for layer in scheme.layers], probe)
    target = full + 0.8 * (1.0 - full)
    choice = choose_exclusions(scheme, probe, target)
    assert choice.met and choice.fidelity >= target
    assert choice.excluded[0] == FRAGILE
    assert choice.trace[0] == (0, pytest.approx(full))
    # the model itself is untouched: the scheme works on its own copy
    import torch

    assert type(model.module.get_submodule(FRAGILE)) is torch.nn.Linear


# ---------------------------------------------------------------------------------------------- blocks


def test_dynamic_int8_mixed_precision_keeps_the_fragile_layer_float_in_the_saved_variant(
    fragile_encoder, examples, tmp_path
):
    import torch

    from studio.techniques.quantized_layers import DynamicInt8Linear
    from studio.techniques.torch_io import save_torch_variant

    model = open_checkpoint(fragile_encoder)
    technique = get_technique("quantize.dynamic_int8")()
    params = technique.Params(mixed_precision=0.995)
    ctx, events = _context(model, tmp_path, examples)
    state = technique.run(initial_state(model), params, ctx)
    assert FRAGILE not in state.transforms[-1]["modules"]
    assert type(state.module.get_submodule(FRAGILE)) is torch.nn.Linear
    assert isinstance(state.module.get_submodule("encoder.layer.0.intermediate.dense"), DynamicInt8Linear)
    metric = next(e for e in events if e["type"] == "metric" and e["name"] == "mixed_precision_fidelity")
    assert metric["value"] >= 0.995
    assert any("kept float" in e["message"] and FRAGILE in e["message"] for e in events if e["type"] == "log")

    folder = tmp_path / "variant"
    save_torch_variant(state.module, state.transforms, folder, model.path)
    reopened = open_checkpoint(folder).module
    assert type(reopened.get_submodule(FRAGILE)) is torch.nn.Linear
    assert torch.equal(reopened.get_submodule(FRAGILE).weight, model.module.get_submodule(FRAGILE).weight)
    assert isinstance(reopened.get_submodule("encoder.layer.0.intermediate.dense"), DynamicInt8Linear)


def test_weight_only_embeddings_and_mixed_precision_reload(fragile_encoder, examples, tmp_path):
    import torch

    from studio.techniques.quantized_layers import WeightOnlyEmbedding, WeightOnlyLinear
    from studio.techniques.torch_io import save_torch_variant

    model = open_checkpoint(fragile_encoder)
    technique = get_technique("quantize.weight_only")()
    params = technique.Params(bits=4, group_size=32, embeddings=True, mixed_precision=0.99)
    ctx, _ = _context(model, tmp_path, examples)
    state = technique.run(initial_state(model), params, ctx)
    record = state.transforms[-1]
    assert FRAGILE not in record["modules"]
    assert "embeddings.word_embeddings" in record["embeddings"]
    table = state.module.get_submodule("embeddings.word_embeddings")
    assert isinstance(table, WeightOnlyEmbedding)
    ids = torch.tensor([[101, 2023, 102]])
    original = model.module.get_submodule("embeddings.word_embeddings")
    assert torch.allclose(table(ids), original(ids), atol=float(original.weight.detach().abs().max()) / 7)

    folder = tmp_path / "variant"
    save_torch_variant(state.module, state.transforms, folder, model.path)
    tensors = _safetensors_dtypes(folder / "model.safetensors")
    assert tensors["embeddings.word_embeddings.qweight"] == ("U8", (30522, 32))  # two codes per byte
    reopened = open_checkpoint(folder).module
    assert type(reopened.get_submodule(FRAGILE)) is torch.nn.Linear
    assert isinstance(reopened.get_submodule("encoder.layer.0.intermediate.dense"), WeightOnlyLinear)
    assert torch.equal(reopened.get_submodule("embeddings.word_embeddings")(ids), table(ids))


def test_onnx_quantize_dynamic_mixed_precision_keeps_the_node_float(fragile_encoder, examples, tmp_path):
    import onnx

    from studio.pipeline import Recipe, execute_steps, plan, save_state

    model = open_checkpoint(fragile_encoder)
    recipe = Recipe.model_validate(
        {
            "model": str(fragile_encoder),
            "steps": [
                {"technique": "export.onnx"},
                {"technique": "onnx.optimize"},
                {"technique": "onnx.quantize_dynamic", "params": {"mixed_precision": 0.995}},
                {"technique": "onnx.quantize_blockwise", "params": {"bits": 8, "block_size": 32}},
            ],
            "evaluate": {"sequence_length": SEQ},
        }
    )
    events: list = []
    state, _ = execute_steps(plan(recipe, model), tmp_path / "work", examples, events.append)
    artifact = tmp_path / "artifact"
    save_state(state, artifact, examples, SEQ)
    graph = onnx.load(str(artifact / "model.onnx")).graph
    ops = {n.name: n.op_type for n in graph.node}
    # kept out of INT8 by mixed precision, then given 8-bit blocks by the next step
    assert ops[FRAGILE_NODE + "_Q8"] == "MatMulNBits"
    assert "DynamicQuantizeLinear" in ops.values() or "MatMulInteger" in ops.values()
    chosen = next(e for e in events if getattr(e, "name", "") == "mixed_precision_fidelity")
    assert chosen.value >= 0.995


def test_onnx_exclusion_list_is_honoured_in_the_saved_graph(fragile_encoder, examples, tmp_path):
    import onnx

    from studio.pipeline import Recipe, execute_steps, plan, save_state

    model = open_checkpoint(fragile_encoder)
    recipe = Recipe.model_validate(
        {
            "model": str(fragile_encoder),
            "steps": [
                {"technique": "export.onnx"},
                {"technique": "onnx.optimize", "params": {"skip_layer_norm": "split"}},
                {"technique": "onnx.quantize_dynamic", "params": {"exclude_nodes": [FRAGILE_NODE]}},
            ],
            "evaluate": {"sequence_length": SEQ},
        }
    )
    state, _ = execute_steps(plan(recipe, model), tmp_path / "work", examples, lambda _e: None)
    artifact = tmp_path / "artifact"
    save_state(state, artifact, examples, SEQ)
    graph = onnx.load(str(artifact / "model.onnx")).graph
    node = next(n for n in graph.node if n.name == FRAGILE_NODE)
    assert node.op_type == "MatMul"
    weight = next(t for t in graph.initializer if t.name == node.input[1])
    assert weight.data_type == onnx.TensorProto.FLOAT
    ops = [n.op_type for n in graph.node]
    assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") == 4


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_sensitivity_json_and_table(fragile_encoder, capsys):
    from studio.cli import main

    code = main(
        [
            "sensitivity",
            str(fragile_encoder),
            "--scheme",
            "torch-int8",
            "--mode",
            "one",
            "--max-examples",
            "8",
            "--sequence-length",
            str(SEQ),
            "--target",
            "0.999",
            "--json",
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers"][0]["layer"] == FRAGILE and data["mode"] == "one"
    assert data["mixed_precision"]["excluded"][0] == FRAGILE

    assert main(["sensitivity", str(fragile_encoder), "--scheme", "int4", "--group-size", "32",
                 "--mode", "one", "--max-examples", "4", "--sequence-length", "16"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    first_row = next(line for line in table.splitlines() if line.strip().startswith("1 "))
    assert FRAGILE in first_row

    assert main(["sensitivity", str(fragile_encoder), "--target", "2"]) == 2
    assert "--target" in capsys.readouterr().err


def _safetensors_dtypes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
