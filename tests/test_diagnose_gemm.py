"""The GEMM cause of `diagnose`: the linear layers' operations over their profiled time against this
machine's GEMM peak (measured at toy sizes here, so the test stays fast), compute- or memory-bound, with
its evidence, cost and a fix the pipeline accepts; and the roofline verdicts on made-up numbers."""

from __future__ import annotations

import pytest

from studio.checkpoints import open_checkpoint
from studio.diagnose import COMPUTE_BOUND_SHARE, diagnose, gemm_cause, linear_macs
from studio.evaluation.data import load_examples
from studio.evaluation.machine_limits import toy_machine_limits
from studio.inspection.graph import Graph, GraphNode
from studio.techniques.base import get_technique


def test_int8_minilm_names_its_share_of_the_int8_gemm_peak(minilm_onnx):
    limits = toy_machine_limits(threads=1)
    result = diagnose(
        open_checkpoint(minilm_onnx["quantized"]),
        examples=load_examples("builtin:sentences", 2),
        sequence_length=16,
        threads=1,
        gemm_batch=4,
        limits=limits,
    )
    cause = next(c for c in result["causes"] if c["kind"] == "gemm-peak")
    assert {"what", "evidence", "cost", "fix"} <= set(cause)
    evidence = cause["evidence"]
    assert evidence["peak_precision"] == "INT8"  # all but one MatMul multiply in integers
    assert evidence["peak_gops"] == limits["gemm"]["int8_peak_gops"]
    assert 0 < evidence["peak_share"] <= 1
    assert (
        cause["what"].startswith("batch 4 GEMMs reach ") and "of this machine's INT8 peak: " in cause["what"]
    )
    assert f"{evidence['peak_share']:.0%}" in cause["what"]
    # the batch is 4 examples padded to the longest (at most 16 tokens)
    assert 4 <= evidence["tokens"] <= 4 * 16 and evidence["tokens"] % 4 == 0
    assert evidence["linear_nodes"] >= 24  # 6 layers x (QKV, attention output, FFN up and down)
    assert evidence["linear_ms"] > 0 and evidence["linear_gops"] > 0
    assert 0 <= cause["cost"] < 1
    fix = cause["fix"]
    get_technique(fix["technique"]).Params(**fix["params"])  # a pipeline change, as it is


def _linear(name: str, k: int, n: int, precision: str) -> GraphNode:
    weight = {"name": f"{name}.w", "shape": [k, n], "dtype": "int8", "torch": []}
    return GraphNode(name, "MatMulInteger", [], [], weights=[weight], precision=precision)


@pytest.mark.parametrize(
    ("peak_gops", "bandwidth", "verdict"),
    [
        (100.0, 10.0, "compute-bound"),  # 2 * 1000 * 1000 ops/token x 1000 tokens in 40 ms: 50 GOPS = 50 %
        (1000.0, 0.01, "memory-bound"),  # 5 % of the peak, and streaming the bytes takes far longer
        (1000.0, 1e6, "bound by overhead"),  # 5 % of the peak with bandwidth to spare
    ],
)
def test_roofline_verdicts(peak_gops, bandwidth, verdict):
    graph = Graph(kind="onnx", nodes=[_linear("a", 1000, 500, "int8"), _linear("b", 500, 1000, "int8")])
    assert linear_macs(graph.nodes[0]) == 500_000
    shares = {"a": 0.4, "b": 0.4}  # 80 % of a 50 ms run: 40 ms of products
    limits = {"gemm": {"int8_peak_gops": peak_gops, "fp32_peak_gops": 1.0}, "memory_bandwidth": {}}
    limits["memory_bandwidth"]["triad_gb_per_s"] = bandwidth
    cause = gemm_cause(graph, shares, total_ms=50.0, batch=32, tokens=1000, limits=limits)
    assert cause is not None
    share = 50.0 / peak_gops
    assert cause["evidence"]["linear_gops"] == pytest.approx(50.0)
    assert cause["evidence"]["peak_share"] == pytest.approx(share)
    assert verdict in cause["what"] and cause["what"].startswith(f"batch 32 GEMMs reach {share:.0%} ")
    assert (share >= COMPUTE_BOUND_SHARE) == (verdict == "compute-bound")
    assert cause["cost"] == pytest.approx(0.8 * (1 - share))
    get_technique(cause["fix"]["technique"]).Params(**cause["fix"]["params"])


def test_no_gemm_cause_without_timed_linear_layers():
    graph = Graph(kind="onnx", nodes=[_linear("a", 8, 8, "int8")])
    limits = {"gemm": {"int8_peak_gops": 1.0, "fp32_peak_gops": 1.0}}
    assert gemm_cause(graph, {}, total_ms=1.0, batch=1, tokens=8, limits=limits) is None


def test_overhead_fix_is_fusion_unless_the_graph_is_fused_already():
    limits = {"gemm": {"int8_peak_gops": 1000.0, "fp32_peak_gops": 1.0}, "memory_bandwidth": {}}
    limits["memory_bandwidth"]["triad_gb_per_s"] = 1e6  # bound by overhead, as in the table above
    nodes = [_linear("a", 1000, 500, "int8"), _linear("b", 500, 1000, "int8")]
    shares = {"a": 0.4, "b": 0.4}
    plain = gemm_cause(
        Graph(kind="onnx", nodes=nodes), shares, total_ms=50.0, batch=32, tokens=1000, limits=limits
    )
    assert plain is not None and plain["fix"]["technique"] == "onnx.optimize"
    fused = Graph(kind="onnx", nodes=[*nodes, GraphNode("Attention_0", "Attention", [], [])])
    cause = gemm_cause(fused, shares, total_ms=50.0, batch=32, tokens=1000, limits=limits)
    assert cause is not None and cause["fix"]["technique"] == "prune.structured"  # fusing again adds nothing
