"""Layer-wise error (Polygraphy-style): MiniLM's ONNX graph against itself, against its torch original,
and against a copy with one layer's weights scaled, which must first jump at that layer; a small torch
BERT the same way through forward hooks; clear errors for unrelated models and unknown ids."""

from __future__ import annotations

import json
import shutil

import pytest

from studio.checkpoints import open_checkpoint
from studio.cli import main
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.inspection.layer_diff import compare_layers, layer_diff, onnx_layer_tensors

BROKEN = "encoder.layer.2.intermediate.dense"


@pytest.fixture(scope="module")
def examples():
    return load_examples("builtin:sentences", 3)


@pytest.fixture(scope="module")
def broken_onnx(minilm_onnx, tmp_path_factory):
    """The exported graph with BROKEN's weight scaled by 3 (its folder copied, tokenizer files and all)."""
    import onnx
    from onnx import numpy_helper

    from studio.checkpoints.onnx_graph import metadata_of

    folder = tmp_path_factory.mktemp("broken") / "graph"
    shutil.copytree(minilm_onnx["exported"].parent, folder)
    path = folder / minilm_onnx["exported"].name
    proto = onnx.load(str(path))
    names = json.loads(metadata_of(proto)["studio.weight_names"])
    target = next(k for k, v in names.items() if isinstance(v, list) and v[0] == BROKEN + ".weight")
    init = next(i for i in proto.graph.initializer if i.name == target)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3.0, init.name))
    onnx.save(proto, str(path))
    return path


def test_a_graph_against_itself_is_zero_everywhere(minilm_onnx, examples):
    model = open_checkpoint(minilm_onnx["exported"])
    result = layer_diff(model, model, examples=examples, sequence_length=16)
    assert len(result["layers"]) > 40  # embeddings, every Linear and LayerNorm of six layers
    assert all(x["relative_error"] == 0.0 and x["cosine"] == 1.0 for x in result["layers"])
    assert result["first_jump"] is None


def test_a_graph_against_its_torch_original_matches_by_torch_name(minilm_onnx, examples):
    torch_model = open_checkpoint("builtin:minilm")
    graph = open_checkpoint(minilm_onnx["exported"])
    result = layer_diff(torch_model, graph, examples=examples, sequence_length=16)
    names = [x["name"] for x in result["layers"]]
    assert "encoder.layer.0.attention.self.query" in names and "encoder.layer.5.output.LayerNorm" in names
    assert max(x["relative_error"] for x in result["layers"]) < 1e-4
    assert result["first_jump"] is None


def test_a_broken_layer_is_the_first_jump(minilm_onnx, broken_onnx, examples):
    result = layer_diff(
        open_checkpoint(minilm_onnx["exported"]),
        open_checkpoint(broken_onnx),
        examples=examples,
        sequence_length=16,
    )
    assert result["first_jump"] == BROKEN
    names = [x["name"] for x in result["layers"]]
    before = result["layers"][: names.index(BROKEN)]
    assert before and all(x["relative_error"] == 0.0 for x in before)
    broken = result["layers"][names.index(BROKEN)]
    # three times the weight, the same bias: the output about twice its size off
    assert broken["relative_error"] == pytest.approx(2.0, rel=0.1)


def test_a_torch_model_with_a_scaled_layer_first_jumps_there(bert_classifier, examples):
    import torch

    a, b = open_checkpoint(bert_classifier), open_checkpoint(bert_classifier)
    layer = b.module.bert.encoder.layer[1].output.dense
    with torch.no_grad():
        layer.weight.mul_(4.0)
    same = layer_diff(a, a, examples=examples, sequence_length=16)
    assert same["first_jump"] is None and all(x["relative_error"] == 0.0 for x in same["layers"])
    result = layer_diff(a, b, examples=examples, sequence_length=16)
    assert result["first_jump"] == "bert.encoder.layer.1.output.dense"


def test_first_jump_needs_a_jump_not_a_slow_drift():
    import numpy as np

    base = np.ones(8)
    drift = [(f"l{i}", base * (1 + 1e-4 * i)) for i in range(5)]
    assert compare_layers([(f"l{i}", base) for i in range(5)], drift)["first_jump"] is None
    jumped = [*drift[:3], ("l3", base * 2), ("l4", base * 2.1)]
    assert compare_layers([(f"l{i}", base) for i in range(5)], jumped)["first_jump"] == "l3"


def test_fused_nodes_are_no_module_output(minilm_onnx):
    """BiasGelu adds the bias and the activation: the intermediate dense layer has no output of its own."""
    fused = onnx_layer_tensors(minilm_onnx["optimized"])
    assert BROKEN not in fused
    assert BROKEN in onnx_layer_tensors(minilm_onnx["exported"])


def test_unrelated_models_and_unknown_ids_are_bad_input(bert_classifier, gpt2, tmp_path, capsys, examples):
    with pytest.raises(BadInput, match="no layer in common"):
        layer_diff(
            open_checkpoint(bert_classifier), open_checkpoint(gpt2), examples=examples, sequence_length=16
        )
    assert main(["diff", "nope-a", "nope-b", "--workspace", str(tmp_path / "ws"), "--json"]) == 2
    assert "nope-a" in capsys.readouterr().err


def test_diff_verb_json_gives_layers_and_first_jump(minilm_onnx, broken_onnx, capsys):
    argv = ["diff", str(minilm_onnx["exported"]), str(broken_onnx), "--json", "--examples", "2"]
    assert main([*argv, "--sequence-length", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["first_jump"] == BROKEN
    assert {"name", "cosine", "relative_error"} <= set(out["layers"][0])
    assert out["structure"]["added"] == [] and out["structure"]["removed"] == []
