"""Naming a row's model and quality metric, and Pareto fronts that stay within one model and metric."""

from __future__ import annotations

from studio.variant_rows import (
    batch_sizes,
    label,
    latency,
    model_names,
    pareto_front,
    pareto_fronts,
    quality_metric,
    quality_score,
    row_label,
    size_mb,
    steps_text,
    throughput,
)


def row(vid, model, kind="torch", quality=None, steps=("precision.half",)):
    return {
        "id": vid,
        "model": model,
        "kind": kind,
        "metrics": {"quality": quality or {}},
        "recipe": {"steps": [{"technique": s} for s in steps]},
    }


def test_model_names_are_short_and_distinct():
    names = model_names(["builtin:minilm", "/data/a/gpt2", "/data/b/gpt2", "/m/cnn.onnx", "/data/a/gpt2"])
    assert names == {
        "builtin:minilm": "minilm",
        "/data/a/gpt2": "a/gpt2",
        "/data/b/gpt2": "b/gpt2",
        "/m/cnn.onnx": "cnn.onnx",
    }


def test_the_original_is_named_after_its_model():
    base = row("b1", "/models/gpt2", kind="baseline")
    assert row_label(base) == "original gpt2"
    assert row_label(base, {"/models/gpt2": "x/gpt2"}) == "original x/gpt2"
    assert row_label(row("v00000abcdef", "/models/gpt2")) == "abcdef half"


def test_fronts_never_mix_models_or_metrics():
    rows = [
        row("m0", "builtin:minilm", kind="baseline"),
        row("m1", "builtin:minilm", quality={"fidelity_cosine": 0.99}),
        row("g0", "/m/gpt2", kind="baseline"),
        row("g1", "/m/gpt2", quality={"top1_agreement": 0.9}),
        row("g2", "/m/gpt2", quality={"top1_agreement": 0.5}),
    ]
    assert quality_metric(rows[0], rows) == "fidelity_cosine"  # the original joins its variants' group
    assert quality_metric(rows[2], rows) == "top1_agreement"
    # GPT-2's variants are faster than every MiniLM row: one shared front would drop MiniLM entirely
    points = [(10.0, 1.0), (5.0, 0.99), (3.0, 1.0), (1.0, 0.9), (2.0, 0.5)]
    fronts = pareto_fronts(rows, points)
    assert fronts == {("builtin:minilm", "fidelity_cosine"): [1, 0], ("/m/gpt2", "top1_agreement"): [3, 2]}
    # a row without a point is left out, a row without quality has no group to rank in
    rows.append(row("x", "/m/gpt2"))
    assert pareto_fronts(rows, [*points[:4], None, None])[("/m/gpt2", "top1_agreement")] == [3, 2]


def test_a_rows_numbers_mean_the_same_everywhere():
    timed = row("v00000abcdef", "builtin:minilm", quality={"fidelity_cosine": 0.98})
    timed["metrics"].update(
        {
            "size_bytes": 45_000_000,
            "latency_ms": {"4": {"p50": 8.0, "p95": 9.5, "throughput_per_s": 500.0}, "16": {"p50": 30}},
            "throughput_per_s": {"16": 533.0},
        }
    )
    assert size_mb(timed) == 45.0 and size_mb(row("x", "m")) is None
    assert latency(timed, "4") == 8.0 and latency(timed, "4", "p95") == 9.5 and latency(timed, "1") is None
    # older rows kept the throughput beside the percentiles; newer ones in their own table
    assert throughput(timed, "4") == 500.0 and throughput(timed, "16") == 533.0
    assert batch_sizes([timed, row("y", "m")]) == ["4", "16"]  # numerically, not as text
    assert (
        steps_text(timed) == "precision.half" and steps_text(row("b", "m", kind="baseline", steps=())) == ""
    )
    assert label(timed) == "abcdef half" and label(row("b", "m", kind="baseline")) == "original"
    assert quality_score(timed, [timed]) == ("fidelity_cosine", 0.98)
    assert quality_score(row("b", "m", kind="baseline"), []) == ("reference", 1.0)
    assert quality_score(row("n", "m"), []) == ("-", None)
    assert pareto_front([(3.0, 0.9), (1.0, 0.5), (2.0, 0.95), (4.0, 0.99), (5.0, 0.8)]) == [1, 2, 3]
