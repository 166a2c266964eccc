"""The original's latency is timed again in every run, in turns with the variant, not read from the cache
(a cached time was taken under other conditions); a median with a wide confidence interval is flagged."""

from __future__ import annotations

import pytest

from studio.checkpoints import open_checkpoint
from studio.evaluation.latency import TimingPolicy, summarise
from studio.evaluation.measure import WIDE_CI, flag_wide_ci, time_interleaved
from studio.events import Log
from studio.pipeline import Recipe, plan, run_plan
from studio.variants import Workspace


def test_time_interleaved_takes_turns_and_rotates_the_order():
    import numpy as np

    order: list[str] = []
    x = np.ones((64, 64))

    def call(label):
        def run():
            order.append(label)
            x @ x

        return run

    policy = TimingPolicy(warmup_runs=2, warmup_seconds=0.0, min_runs=6, min_seconds=0.0, max_runs=50)
    samples = time_interleaved({"a": call("a"), "b": call("b"), "c": call("c")}, policy)
    assert {k: len(v) for k, v in samples.items()} == {"a": 6, "b": 6, "c": 6}
    assert all(t > 0 for v in samples.values() for t in v)  # every call timed, none left at zero
    assert order[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up of each first
    rounds = [order[6 + 3 * r : 9 + 3 * r] for r in range(6)]
    assert rounds[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]  # every round, each once


def test_a_wide_confidence_interval_is_flagged():
    steady = flag_wide_ci(summarise([10.0, 10.01, 9.99, 10.0, 10.02, 9.98] * 3, 1))
    assert steady["ci_wide"] is False and steady["ci_rel_width"] < WIDE_CI
    noisy = flag_wide_ci(summarise([5.0, 30.0, 8.0, 22.0, 11.0, 40.0, 6.0, 15.0], 1))
    assert noisy["ci_wide"] is True and noisy["ci_rel_width"] > WIDE_CI


@pytest.mark.slow
def test_each_run_times_the_original_with_its_variant(bert_classifier, tmp_path):
    model = open_checkpoint(bert_classifier)
    recipe = Recipe.model_validate(
        {
            "model": str(bert_classifier),
            "data": {"calibration_examples": 4, "evaluation_examples": 8},
            "steps": [{"technique": "prune.magnitude", "params": {"sparsity": 0.3}}],
            "evaluate": {"batch_sizes": [1, 2], "sequence_length": 16},
        }
    )
    workspace = Workspace(tmp_path / "ws")
    runs = []
    for _ in range(2):
        events: list = []
        result = run_plan(plan(recipe, model), workspace, events.append)
        runs.append((result, [e.message for e in events if isinstance(e, Log)]))
    (first, _), (second, second_logs) = runs
    assert first["baseline"]["id"] == second["baseline"]["id"]  # one cached baseline record
    assert second["baseline"]["created"] == first["baseline"]["created"]  # still listed first
    assert workspace.list()[0]["kind"] == "baseline"
    assert any("timed again, in turns with the variant" in m for m in second_logs)
    for result, logs in runs:
        (variant,) = result["variants"]
        m = variant["metrics"]
        assert set(m["baseline_latency_ms"]) == set(m["latency_ms"]) == {"1", "2"}
        for b, lat in m["latency_ms"].items():
            base = m["baseline_latency_ms"][b]
            assert lat["runs"] == base["runs"]  # timed in turns: one call each per round
            assert isinstance(lat["ci_wide"], bool) and "ci_rel_width" in base
        assert any(m.startswith("original: batch 2 p50") and "interleaved" in m for m in logs)
        # the baseline record carries the latency timed in this run, with this variant
        assert result["baseline"]["metrics"]["latency_ms"] == m["baseline_latency_ms"]
        assert result["baseline"]["metrics"]["size_bytes"] > 0
    first_b = first["variants"][0]["metrics"]["baseline_latency_ms"]["1"]["samples"]
    second_b = second["variants"][0]["metrics"]["baseline_latency_ms"]["1"]["samples"]
    assert first_b != second_b  # timed again, not the cached samples
    assert workspace.get(second["baseline"]["id"])["metrics"]["latency_ms"]["1"]["samples"] == second_b
    # comparing the baseline with the first variant uses the original's time from the first run
    from studio.compare import compare

    out = compare(workspace, second["baseline"]["id"], first["variants"][0]["id"], weights=False, examples=0)
    first_m = first["variants"][0]["metrics"]
    expected = first_m["baseline_latency_ms"]["1"]["p50"] / first_m["latency_ms"]["1"]["p50"]
    assert out["latency_significance"]["1"]["speedup_b_over_a"] == pytest.approx(expected)
