"""Naming a row's model and quality metric, and Pareto fronts that stay within one model and metric."""

from __future__ import annotations

from studio.variant_rows import model_names, pareto_fronts, quality_metric, row_label


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
