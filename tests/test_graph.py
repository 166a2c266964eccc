"""The graph model of a variant: MiniLM's exported, fused and INT8 ONNX graphs, and a small torch BERT
traced by hooks; repeated blocks, precision per node, the structural diff, the per-node time shares and
the `graph` verb's JSON."""

from __future__ import annotations

import json

import pytest

from studio.checkpoints import open_checkpoint
from studio.cli import main
from studio.evaluation.data import load_examples
from studio.evaluation.node_profile import profile_model
from studio.inspection.graph import block_of, onnx_graph, torch_graph
from studio.inspection.graph_diff import graph_diff
from tests.conftest import MINILM_EXCLUDED


def test_block_of_puts_onnx_names_and_torch_paths_in_one_block():
    assert block_of("/model/encoder/layer.3/attention/self/query/MatMul") == "encoder.layer.3"
    assert block_of("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert block_of("/model/model/layers.12/self_attn/q_proj/MatMul") == "model.layers.12"
    assert block_of("model.layers.12.self_attn.q_proj") == "model.layers.12"
    assert block_of("/model/embeddings/Gather") is None


def test_exported_graph_has_shapes_weights_and_collapses_to_its_six_layers(minilm_onnx):
    graph = onnx_graph(minilm_onnx["exported"])
    query = graph.node("/model/encoder/layer.3/attention/self/query/MatMul")
    assert query.op == "MatMul" and query.group == "encoder.layer.3"
    assert query.torch_weights() == ["encoder.layer.3.attention.self.query.weight"]
    assert query.weights[0]["shape"] == [384, 384] and query.precision == "float32"
    assert graph.shapes[query.outputs[0]][-1] == 384  # from shape inference
    assert list(graph.groups()) == [f"encoder.layer.{i}" for i in range(6)]
    view = graph.collapsed()
    boxes = [item for item in view["items"] if item["kind"] == "group"]
    assert [b["id"] for b in boxes] == list(graph.groups())
    assert sum(b["nodes"] for b in boxes) == sum(len(v) for v in graph.groups().values())
    assert ["encoder.layer.0", "encoder.layer.1"] in view["edges"]
    opened = graph.collapsed(expanded=["encoder.layer.1"])
    assert any(item["id"] == query.name.replace("layer.3", "layer.1") for item in opened["items"])
    assert len(opened["items"]) > len(view["items"])


def test_diff_of_export_and_fusion_marks_fused_nodes_changed_and_the_rest_removed(minilm_onnx):
    before, after = onnx_graph(minilm_onnx["exported"]), onnx_graph(minilm_onnx["optimized"])
    diff = graph_diff(before, after)
    changed = {c["b"]: c for c in diff["changed"]}
    attention = changed["Attention_0"]  # unnamed by the fusion: called by its op and index
    assert attention["op_b"] == "Attention" and attention["change"] == "fused"
    layer0 = "/model/encoder/layer.0/attention/self"
    assert {f"{layer0}/{p}/MatMul" for p in ("query", "key", "value")} <= set(attention["a"])
    assert f"{layer0}/Softmax" in diff["removed"]
    assert "/model/encoder/layer.0/intermediate/intermediate_act_fn/Erf" in diff["removed"]
    # a MatMul the fusion kept reads the same weight: matched, not added or removed
    kept = "/model/encoder/layer.0/intermediate/dense/MatMul"
    assert kept not in diff["removed"] and kept not in diff["added"]
    assert not any(name.endswith("MatMul") for name in diff["added"])
    assert len(diff["removed"]) > len(after.nodes)  # hundreds of shape ops gone


def test_precision_of_dynamic_int8_graph_shows_the_excluded_matmul_as_float(minilm_onnx):
    graph = onnx_graph(minilm_onnx["quantized"])
    assert graph.node(MINILM_EXCLUDED).precision == "float (excluded)"
    int8 = [n for n in graph.nodes if n.op in ("MatMulInteger", "QAttention")]
    assert int8 and all(n.precision == "int8" for n in int8)
    diff = graph_diff(onnx_graph(minilm_onnx["optimized"]), graph)
    assert any(c["change"] == "quantized" for c in diff["changed"])


def test_onnx_time_shares_sum_to_one_and_name_graph_nodes(minilm_onnx):
    model = open_checkpoint(minilm_onnx["quantized"])
    profile = profile_model(
        model, load_examples("builtin:sentences", 2), sequence_length=16, runs=2, threads=1
    )
    assert sum(profile.shares.values()) == pytest.approx(1.0, abs=1e-6)
    names = {n.name for n in onnx_graph(minilm_onnx["quantized"]).nodes}
    assert set(profile.shares) <= names
    assert profile.shares[MINILM_EXCLUDED] > 0 and profile.total_ms > 0


def test_torch_graph_and_time_shares_of_a_small_bert(bert_classifier):
    model = open_checkpoint(bert_classifier)
    graph = torch_graph(model)
    query = graph.node("bert.encoder.layer.1.attention.self.query")
    assert query.op == "Linear" and query.group == "encoder.layer.1" and query.precision == "float32"
    assert list(graph.groups()) == ["encoder.layer.0", "encoder.layer.1"]
    edges = graph.edges()
    assert any(b == query.name for _, b in edges)  # it reads a tensor another module made
    profile = profile_model(
        model, load_examples("builtin:sentences", 2), sequence_length=16, runs=2, threads=1
    )
    assert sum(profile.shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert query.name in profile.shares


def test_graph_verb_json_lists_nodes_with_time_share_and_precision(minilm_onnx, capsys):
    assert (
        main(["graph", str(minilm_onnx["quantized"]), "--json", "--examples", "2", "--sequence-length", "16"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    nodes = {n["name"]: n for n in out["nodes"]}
    assert {"name", "op", "time_share", "precision", "error"} <= set(nodes[MINILM_EXCLUDED])
    assert nodes[MINILM_EXCLUDED]["precision"] == "float (excluded)"
    assert sum(n["time_share"] for n in out["nodes"]) == pytest.approx(1.0, abs=1e-6)
    assert all(n["error"] is None for n in out["nodes"])  # no --against


def test_graph_verb_refuses_unknown_ids_and_unreadable_files(tmp_path, capsys):
    assert main(["graph", "no-such-variant", "--workspace", str(tmp_path / "ws"), "--json"]) == 2
    assert "no-such-variant" in capsys.readouterr().err
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    assert main(["graph", str(broken), "--json"]) == 2
    assert "model-studio: error:" in capsys.readouterr().err
