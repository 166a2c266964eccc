"""The Compare tab on a workspace holding variants of two models (MiniLM and a small GPT-2), built by the
worker: each original is named after its model, the table says which model a row belongs to, a filter
shows one model at a time, and no Pareto front ever spans two models or two quality metrics."""

from __future__ import annotations

import shutil

import pytest
from PySide6.QtCore import QThreadPool

from studio.events import Done
from studio.gui.compare.table import ID_ROLE
from studio.gui.compare.view import CompareView
from studio.gui.document import StudioDocument
from studio.gui.widgets import work_pool
from studio.variants import Workspace
from studio.worker import WorkerClient

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def two_models(demo_variants, gpt2, tmp_path_factory):
    """The MiniLM demo workspace plus the original and a bfloat16 variant of the small GPT-2."""
    source, ids = demo_variants
    root = tmp_path_factory.mktemp("two-models")
    shutil.copytree(source, root, dirs_exist_ok=True)
    recipe = {
        "version": 1,
        "model": str(gpt2),
        "data": {"evaluation_examples": 8, "calibration_examples": 8},
        "evaluate": {"batch_sizes": [1, 4], "sequence_length": 32},
        "steps": [{"technique": "precision.half", "params": {"dtype": "bfloat16"}}],
    }
    events = list(WorkerClient(recipe, root).events())
    assert isinstance(events[-1], Done), events[-1]
    ids = dict(ids)
    ids["gpt2"] = events[-1].result["variants"][0]["id"]
    ids["gpt2 original"] = events[-1].result["baseline"]["id"]
    return root, ids


@pytest.fixture
def view(qtbot, two_models, settings):
    view = CompareView(StudioDocument(workspace=Workspace(two_models[0])))
    qtbot.addWidget(view)
    view.resize(1280, 800)
    view.show()
    yield view
    view.shutdown()
    for pool in (work_pool(), QThreadPool.globalInstance()):
        assert pool.waitForDone(120000), "a background task never ended"


def shown_ids(view: CompareView) -> list[str]:
    return [view.proxy.index(r, 0).data(ID_ROLE) for r in range(view.proxy.rowCount())]


def column_texts(view: CompareView, title: str) -> dict[str, str]:
    column = next(i for i, c in enumerate(view.table_model.columns) if c.title.startswith(title))
    return {
        view.proxy.index(r, 0).data(ID_ROLE): view.proxy.index(r, column).data()
        for r in range(view.proxy.rowCount())
    }


def test_two_models_are_told_apart_and_never_share_a_front(view, two_models, gpt2):
    _root, ids = two_models
    model_of = {r["id"]: r["model"] for r in view.rows}
    assert set(model_of.values()) == {"builtin:minilm", str(gpt2)}

    # the newest model's variants first (no model open): only GPT-2 rows, their original named after it
    assert view.model_combo.isVisible() and view.model_combo.currentText() == gpt2.name
    assert sorted(shown_ids(view)) == sorted([ids["gpt2"], ids["gpt2 original"]])
    assert column_texts(view, "Variant")[ids["gpt2 original"]] == f"original {gpt2.name}"
    assert len(view.fronts) == 1 and set(next(iter(view.fronts.values()))) <= set(shown_ids(view))

    # every model: a Model column, two distinct originals, quality numbers saying their metric
    view.set_model_filter(None)
    assert len(shown_ids(view)) == 5
    models = column_texts(view, "Model")
    assert models[ids["original"]] == "minilm" and models[ids["gpt2"]] == gpt2.name
    names = column_texts(view, "Variant")
    assert (
        names[ids["original"]] == "original minilm" and names[ids["gpt2 original"]] == f"original {gpt2.name}"
    )
    quality = column_texts(view, "Quality")
    assert quality[ids["bf16"]].endswith("(cosine)") and quality[ids["gpt2"]].endswith("(top-1 agreement)")

    # one front per model and metric, each made only of its own model's rows
    assert {key[0] for key in view.fronts} == {"builtin:minilm", str(gpt2)}
    assert {key[1] for key in view.fronts} == {"fidelity_cosine", "top1_agreement"}
    for (source, _metric), front in view.fronts.items():
        assert front and all(model_of[vid] == source for vid in front)
    drawn = [line for line in view.front_lines if line.xData is not None and len(line.xData)]
    assert len(drawn) == len(view.fronts)
    legend = [label.text for _sample, label in view.pareto_legend.items]
    assert (
        "Pareto front, minilm (cosine)" in legend and f"Pareto front, {gpt2.name} (top-1 agreement)" in legend
    )

    # MiniLM alone: its three rows, one front, no GPT-2 point in the scatter
    view.set_model_filter("builtin:minilm")
    assert sorted(shown_ids(view)) == sorted([ids["original"], ids["bf16"], ids["onnx"]])
    assert {p.data() for p in view.scatter.points()} <= set(shown_ids(view))
    assert list(view.fronts) == [("builtin:minilm", "fidelity_cosine")]
