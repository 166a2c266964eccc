"""Diagnosis of a variant's run time: the dynamic-INT8 MiniLM graph with one MatMul kept float names that
MatMul and its share, Q/DQ glue is costed, causes rank by cost, and each fix is a pipeline change whose
technique exists; BF16 on a CPU without BF16 units is named, and threads left idle are."""

from __future__ import annotations

import json

import pytest

from studio.checkpoints import open_checkpoint
from studio.cli import main
from studio.diagnose import BF16_FLAGS, MIN_COST, bf16_cause, cpu_flags, diagnose, qdq_cause, threads_cause
from studio.evaluation.data import load_examples
from studio.inspection.graph import onnx_graph, torch_graph
from studio.techniques.base import get_technique
from tests.conftest import MINILM_EXCLUDED


@pytest.fixture(scope="module")
def examples():
    return load_examples("builtin:sentences", 2)


def test_dynamic_int8_with_an_excluded_layer_names_that_layer(minilm_onnx, examples):
    result = diagnose(
        open_checkpoint(minilm_onnx["quantized"]), examples=examples, sequence_length=16, threads=1
    )
    causes = result["causes"]
    assert [c["cost"] for c in causes] == sorted((c["cost"] for c in causes), reverse=True)
    floats = next(c for c in causes if c["kind"] == "float-matmuls")
    names = [n["name"] for n in floats["evidence"]["nodes"]]
    assert names == [MINILM_EXCLUDED]
    assert (
        floats["cost"] == pytest.approx(floats["evidence"]["nodes"][0]["time_share"]) and floats["cost"] > 0
    )
    assert "stayed unquantized" in floats["what"]
    assert floats["fix"] == {
        "technique": "onnx.quantize_dynamic",
        "params": {"per_channel": True, "exclude_nodes": []},
    }
    assert all(c["cost"] >= MIN_COST for c in causes)  # ORT fuses most Q/DQ nodes: often under 1%, left out
    graph = onnx_graph(minilm_onnx["quantized"])
    qdq = qdq_cause(graph, {n.name: 1.0 / len(graph.nodes) for n in graph.nodes})
    assert qdq is not None and qdq["what"].startswith("Q/DQ pairs around ")
    assert 0 < qdq["cost"] < 1 and qdq["evidence"]["nodes"] > 0
    causes = [*causes, qdq]
    for c in causes:
        assert {"what", "evidence", "cost", "fix"} <= set(c)
        if "technique" in c["fix"]:
            cls = get_technique(c["fix"]["technique"])
            cls.Params(**c["fix"]["params"])  # a change the pipeline accepts as it is


def test_an_unquantized_graph_is_told_to_quantize(minilm_onnx, examples):
    result = diagnose(
        open_checkpoint(minilm_onnx["optimized"]), examples=examples, sequence_length=16, threads=1
    )
    floats = result["causes"][0]
    assert floats["kind"] == "float-matmuls" and len(floats["evidence"]["nodes"]) == 24  # 6 x (3 + Attention)
    assert floats["fix"]["technique"] == "onnx.quantize_dynamic"
    assert not any(c["kind"] == "qdq" for c in result["causes"])


def test_bf16_without_hardware_support_is_named_and_with_it_is_not(bert_classifier):
    import torch

    model = open_checkpoint(bert_classifier)
    model.module.to(torch.bfloat16)
    graph = torch_graph(model)
    shares = {n.name: 1.0 / len(graph.nodes) for n in graph.nodes}
    cause = bf16_cause(graph, shares, flags={"avx2", "avx512f"})
    assert cause is not None and cause["what"] == "BF16 without hardware support on this CPU: emulated"
    assert cause["fix"]["technique"] == "quantize.dynamic_int8"
    assert bf16_cause(graph, shares, flags={BF16_FLAGS[0]}) is None


def test_threads_left_idle_are_a_cause_with_the_evaluate_fix():
    cause = threads_cause(1, 2)
    assert cause["what"] == "threads: 1 of 2 cores used" and cause["cost"] == 0.5
    assert cause["fix"] == {"evaluate": {"threads": 2}}
    assert threads_cause(2, 2) is None


def test_cpu_flags_read_from_a_cpuinfo_file(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_against_the_original_names_the_layer_where_the_error_jumps(minilm_onnx, tmp_path, examples):
    import shutil

    import onnx
    from onnx import numpy_helper

    folder = tmp_path / "graph"
    shutil.copytree(minilm_onnx["exported"].parent, folder)
    path = folder / minilm_onnx["exported"].name
    proto = onnx.load(str(path))
    weight = "/model/encoder/layer.3/output/dense/MatMul"
    node = next(n for n in proto.graph.node if n.name == weight)
    init = next(i for i in proto.graph.initializer if i.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 5.0, init.name))
    onnx.save(proto, str(path))
    original = open_checkpoint(minilm_onnx["exported"])
    result = diagnose(
        open_checkpoint(path), against=original, examples=examples, sequence_length=16, threads=1
    )
    assert result["first_jump"] == "encoder.layer.3.output.dense"
    jump = next(c for c in result["causes"] if c["kind"] == "error-jump")
    assert jump["fix"]["params"]["exclude_nodes"] == [weight]
    get_technique("onnx.quantize_dynamic").Params(**jump["fix"]["params"])


def test_diagnose_verb_against_a_fused_original_keeps_the_time_causes(minilm_onnx, capsys):
    argv = ["diagnose", str(minilm_onnx["quantized"]), "--against", str(minilm_onnx["exported"]), "--json"]
    assert main([*argv, "--examples", "2", "--sequence-length", "16", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["variant"] == str(minilm_onnx["quantized"])
    assert any(c["kind"] == "float-matmuls" for c in out["causes"])
    assert "no layer in common" in out["against_error"]
