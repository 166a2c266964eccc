"""The A/B session on real MiniLM variants built by the worker: each checkpoint is opened once, and that one
pair gives the metrics, the weight differences, the disagreements and the per-layer histogram overlays the
Compare tab shows, with the same numbers `model-studio compare` reports."""

from __future__ import annotations

import pytest

import studio.ab_session as ab_session
from studio.compare import compare
from studio.events import Done
from studio.variants import Workspace
from studio.worker import WorkerClient

RECIPE = {
    "version": 1,
    "model": "builtin:minilm",
    "data": {"evaluation_examples": 4, "calibration_examples": 4},
    "steps": [{"technique": "precision.half", "params": {"dtype": "bfloat16"}}],
    "evaluate": {"latency": False, "sequence_length": 16},
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab-workspace")
    events = list(WorkerClient(RECIPE, root).events())
    assert isinstance(events[-1], Done), events[-1]
    result = events[-1].result
    return Workspace(root), result["baseline"]["id"], result["variants"][0]["id"]


def test_one_session_opens_each_model_once_and_matches_the_cli(pair, monkeypatch):
    ws, original, half = pair
    opened: list[str] = []
    real_open = ab_session.open_row

    def counting_open(row, **kwargs):
        opened.append(row["id"])
        return real_open(row, **kwargs)

    monkeypatch.setattr(ab_session, "open_row", counting_open)
    steps: list[tuple[float, str]] = []
    session = ab_session.open_session(ws, original, half, 4, lambda f, m: steps.append((f, m)))

    assert sorted(opened) == sorted([original, half])
    assert [f for f, _m in steps] == sorted(f for f, _m in steps) and steps[-1][0] < 1.0
    assert session.a["id"] == original and session.b["id"] == half

    data = session.compare
    assert data["disagreements_data"]["examples"] == 4 and 0 < len(data["disagreements"]) <= 4
    assert all(w["score"] < 1.0 for w in data["disagreements"])  # bfloat16 changes every embedding a bit
    layers = data["weights"]["layers"]
    assert layers and layers[0]["change"] == "values" and layers[0]["relative_l2"] > 0
    cli = compare(ws, original, half, examples=4)
    assert data["metrics"] == cli["metrics"] and data["weights"] == cli["weights"]
    assert [w["index"] for w in data["disagreements"]] == [w["index"] for w in cli["disagreements"]]


def test_the_overlay_of_a_layer_puts_both_on_the_same_bins(pair):
    ws, original, half = pair
    session = ab_session.open_session(ws, original, half, 0, lambda f, m: None)
    assert "disagreements" not in session.compare  # examples = 0: nothing run
    name = "encoder.layer.0.attention.self.query.weight"
    overlay = session.overlay(name, bins=32)
    assert overlay.name == name and len(overlay.edges) == 33
    assert overlay.counts_a.sum() == overlay.counts_b.sum() == 384 * 384
    assert overlay.edges[0] <= min(overlay.stats_a.min, overlay.stats_b.min)
    assert overlay.edges[-1] >= max(overlay.stats_a.max, overlay.stats_b.max)
    assert overlay.stats_b.dtype != overlay.stats_a.dtype  # float32 against bfloat16
    with pytest.raises(KeyError):
        session.overlay("no.such.layer")
