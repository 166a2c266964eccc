"""`model-studio bench` at toy sizes: the usual ONNX INT8 recipe and one of the studio's, timed interleaved
against torch FP32 in one process, with speedups as ratios of p50s and the targets marked."""

from __future__ import annotations

import json

import pytest


def test_bench_table_and_json(tmp_path, capsys):
    from studio.bench import target_mark
    from studio.cli import main

    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--only",
            "01-torch-fp32",
            "06-onnx-optimized-int8",
            "minilm-small",
            "--rounds",
            "2",
            "--examples",
            "4",
            "--batch-sizes",
            "1",
            "2",
            "--sequence-length",
            "16",
            "--out",
            str(out),
            "--workspace",
            str(tmp_path / "ws"),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "b2 p50" in table and "x int8 b2" in table  # the columns follow the batch sizes measured
    result = json.loads(out.read_text())
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
