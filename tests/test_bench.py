"""`model-studio bench` at toy sizes: the usual ONNX INT8 recipe and one of the studio's, timed interleaved
against torch FP32 in one process, with speedups as ratios of p50s, shares of the GEMM peak and the targets
marked."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[str, dict]:
    """(the table, the JSON result) of one toy bench of torch FP32, the usual ONNX INT8 and minilm-small:
    built and timed once for this module's tests (each reads what it checks from the same run)."""
    import contextlib
    import io

    from studio.cli import main

    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    args = ["bench", "--only", "01-torch-fp32", "06-onnx-optimized-int8", "minilm-small", "--rounds", "2"]
    args += ["--examples", "4", "--batch-sizes", "1", "2", "--sequence-length", "16", "--toy"]
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        code = main([*args, "--json", str(out), "--workspace", str(tmp / "ws")])
    assert code == 0
    # --json FILE writes the JSON there and still prints the table (tests/test_bench_search.py uses --out)
    assert f"results: {out}" in table.getvalue()
    return table.getvalue(), json.loads(out.read_text())


def test_bench_table_and_json(bench):
    from studio.bench import target_mark

    table, result = bench
    assert "b2 p50" in table and "x int8 b2" in table  # the columns follow the batch sizes measured
    assert result["batch_sizes"] == [1, 2] and result["threads"] >= 1
    rows = result["variants"]
    assert list(rows) == ["01-torch-fp32", "06-onnx-optimized-int8", "minilm-small"]
    for name, row in rows.items():
        assert "error" not in row, (name, row.get("error"))
        for b in ("1", "2"):
            lat = row["latency_ms"][b]
            assert lat["runs"] == len(lat["samples"]) > 0 and lat["ci95"][0] <= lat["p50"] <= lat["ci95"][1]
            assert row["speedup_vs_fp32"][b] == pytest.approx(
                rows["01-torch-fp32"]["latency_ms"][b]["p50"] / lat["p50"]
            )
    assert rows["01-torch-fp32"]["speedup_vs_fp32"] == {"1": 1.0, "2": 1.0}
    assert rows["06-onnx-optimized-int8"]["speedup_vs_usual_int8"] == {"1": 1.0, "2": 1.0}
    assert rows["06-onnx-optimized-int8"]["size_bytes"] < 0.3 * rows["01-torch-fp32"]["size_bytes"]
    # whether the 20% target is met depends on the CPU (mixed precision keeps other layers float where INT8
    # arithmetic differs), so the bench reports it rather than this test asserting it: the share is the
    # sizes' ratio, `met` follows the rule, and the table says MET or MISSED with what was measured
    small = rows["minilm-small"]["targets"]
    share = rows["minilm-small"]["size_bytes"] / rows["01-torch-fp32"]["size_bytes"]
    assert small["target"] == "small" and small["size_share"] == pytest.approx(share) and share < 0.5
    assert small["met"] == (small["cosine_ok"] and share <= 0.2)
    assert target_mark(small) in table and f"size {share * 100:.1f}%" in table
    assert rows["01-torch-fp32"]["targets"] == {}  # the usual recipes have no target


def test_bench_machine_limits_peak_shares_and_issue18_targets(bench):
    table, result = bench
    limits = result["machine_limits"]
    assert limits["memory_bandwidth"]["triad_gb_per_s"] > 0 and limits["gemm"]["int8_peak_gops"] > 0
    assert "machine limits: memory" in table and "issue 18 targets:" in table
    # MiniLM: 6 layers of q, k, v, attention output (384 x 384) and the FFN (384 x 1536 twice), a pooler
    per_layer = 4 * 384 * 384 + 2 * 384 * 1536
    assert 6 * per_layer <= result["linear_macs_per_token"] <= 6 * per_layer + 384 * 384
    rows = result["variants"]
    assert [rows[n]["peer"] for n in rows] == [True, True, False]
    assert [rows[n]["precision"] for n in rows] == ["fp32", "int8", "int8"]
    for row in rows.values():
        peak = limits["gemm"][f"{row['precision']}_peak_gops"]
        for b in ("1", "2"):
            ops = 2.0 * result["linear_macs_per_token"] * 16 * int(b)
            gops = ops / (row["latency_ms"][b]["p50"] / 1000.0) / 1e9
            assert row["linear_gops"][b] == pytest.approx(gops)
            assert row["gemm_peak_share"][b] == pytest.approx(gops / peak)
    targets = {t["target"]: t for t in result["issue18_targets"]}
    assert list(targets) == ["speed b1", "speed b2", "size", "GEMM peak"]
    small, fp32 = rows["minilm-small"], rows["01-torch-fp32"]
    cosine = small["quality"]["fidelity_cosine"]
    for b in ("1", "2"):
        t = targets[f"speed b{b}"]
        if cosine >= 0.995:  # the one studio variant against the faster of the two peers
            fastest = min(
                fp32["latency_ms"][b]["p50"], rows["06-onnx-optimized-int8"]["latency_ms"][b]["p50"]
            )
            assert t["ratio"] == pytest.approx(fastest / small["latency_ms"][b]["p50"])
            assert t["met"] == (t["ratio"] >= 1.3)
        else:
            assert t["ratio"] is None and t["met"] is False
    if cosine >= 0.99:
        assert targets["size"]["ratio"] == pytest.approx(small["size_bytes"] / fp32["size_bytes"])
    gemm = targets["GEMM peak"]
    assert gemm["ratio"] == pytest.approx(small["linear_gops"]["2"] / limits["gemm"]["int8_peak_gops"])
    for t in targets.values():
        assert f"  {t['target']}: {'MET' if t['met'] else 'MISSED'} (need {t['need']}" in table
