"""The Search tab on real searches: the plot and table drawn from the study a real search left, a click on a
point selecting its trial, and a search started from the view, stopped, and its finished trials kept."""

from __future__ import annotations

import shutil

import pytest
from PySide6.QtCore import QPoint, QPointF, Qt

from studio.gui.document import StudioDocument
from studio.gui.search_plot import axis_label, front_steps
from studio.gui.search_view import CURRENT_PIPELINE, SearchView, search_command
from studio.pipeline import load_recipe
from studio.search import study_name
from studio.search_progress import COMPLETE, FAILED, INFEASIBLE, RUNNING, STOPPED_ERROR, load_progress
from studio.variants import Workspace


@pytest.fixture
def finished_view(tiny_search, qtbot, settings, tmp_path):
    path, ws, result = tiny_search
    root = tmp_path / "ws"
    shutil.copytree(ws, root)  # the view's tests may add to the workspace
    view = SearchView(StudioDocument(workspace=Workspace(root)))
    qtbot.addWidget(view)
    view.resize(1000, 700)
    view.show()
    assert view.set_recipe(path), view.status_label.text()
    return view, path, root, result


def test_axis_labels_carry_units_and_the_front_is_a_staircase():
    assert axis_label("latency_ms.b1.p50") == "latency b1 p50 (ms)"
    assert axis_label("size_mb", "minimize") == "size (MB), lower is better"
    assert axis_label("quality.output_cosine", "maximize") == "output cosine, higher is better"
    xs, ys = front_steps([(5.0, 0.9), (1.0, 0.5), (3.0, 0.8)], ("minimize", "maximize"))
    assert list(zip(xs, ys, strict=True)) == [(1, 0.5), (3, 0.5), (3, 0.8), (5, 0.8), (5, 0.9)]


def test_plot_and_table_come_from_the_study(finished_view):
    view, path, root, result = finished_view
    progress = load_progress(root, study_name(load_recipe(path), path), ["size_mb", "quality.output_cosine"])
    finished = [t for t in progress.trials if t.values is not None]
    assert finished and len(progress.trials) == len(result["trials"]) == 3
    assert view.plot.point_count() == len(finished)
    assert view.plot.front_numbers() and sorted(view.plot.front_numbers()) == sorted(progress.pareto)
    assert [t.variant for t in progress.front] == result["pareto"]
    item = view.plot.plot.getPlotItem()
    assert item.getAxis("bottom").labelText == "size (MB), lower is better"
    assert item.getAxis("left").labelText == "output cosine, higher is better"
    assert view.table.rowCount() == 3
    headers = [view.table.horizontalHeaderItem(c).text() for c in range(view.table.columnCount())]
    assert headers[:2] == ["trial", "state"] and headers[-1] == "variant"
    assert {"2.keep", "3.per_channel"} <= set(headers)
    variants = [view.table.item(r, len(headers) - 1).text() for r in range(3)]
    assert variants == [t["variant"] or "-" for t in result["trials"]]
    text = view.status_label.text()
    assert text.startswith(f"3 trials, {len(progress.pareto)} on the front")
    assert view.trials_spin.value() == 3


def _click_point(qtbot, view, x: float, y: float) -> None:
    plot = view.plot.plot
    scene_pos = plot.getPlotItem().getViewBox().mapViewToScene(QPointF(x, y))
    pos = plot.mapFromScene(scene_pos)
    qtbot.mouseClick(plot.viewport(), Qt.MouseButton.LeftButton, pos=QPoint(pos.x(), pos.y()))


def test_clicking_a_point_selects_its_row_and_names_its_variant(finished_view, qtbot):
    view, _path, _root, result = finished_view
    qtbot.waitExposed(view)
    last = max((t for t in view.progress.trials if t.values is not None), key=lambda t: t.number)
    chosen: list[str] = []
    view.variant_selected.connect(chosen.append)
    with qtbot.waitSignal(view.trial_selected, timeout=5000) as signal:
        _click_point(qtbot, view, *last.values)
    assert signal.args == [last.number]
    assert view.selected_trial() == last.number
    assert view.table.selectionModel().selectedRows()[0].row() == view._rows.index(last.number)
    assert chosen == [last.variant] and last.variant in {t["variant"] for t in result["trials"]}
    ringed = view.plot.highlight.data
    assert len(ringed) == 1 and (ringed[0]["x"], ringed[0]["y"]) == last.values


def test_a_pipeline_with_a_search_section_is_offered(tiny_search, qtbot, settings, tmp_path):
    path, _ws, _result = tiny_search
    document = StudioDocument(workspace=Workspace(tmp_path / "ws"))
    view = SearchView(document)
    qtbot.addWidget(view)
    assert view.recipe_combo.findData(CURRENT_PIPELINE) < 0  # the starter pipeline has no search section
    document.load_recipe(load_recipe(path), path)
    qtbot.waitUntil(lambda: view.recipe_combo.findData(CURRENT_PIPELINE) == 0)
    view.recipe_combo.setCurrentIndex(0)
    assert view.recipe is not None and view.recipe_path == tmp_path / "ws" / "searches" / "tiny-search.yaml"
    assert "no trials yet" in view.status_label.text()
    command = search_command(view.recipe_path, tmp_path / "ws", 3)
    assert command[-6:] == [
        "search",
        str(view.recipe_path),
        "--workspace",
        str(tmp_path / "ws"),
        "--trials",
        "3",
    ]


def test_search_from_the_view_then_stop_keeps_the_finished_trials(
    tiny_search_recipe, qtbot, settings, tmp_path
):
    path = tiny_search_recipe(tmp_path / "recipe", trials=6)
    root = tmp_path / "ws"
    view = SearchView(StudioDocument(workspace=Workspace(root)))
    qtbot.addWidget(view)
    assert view.set_recipe(path)
    try:
        seen = _search_then_stop(qtbot, view)
    finally:
        view.shutdown()  # a failed wait must not leave the search running

    kept = load_progress(root, study_name(load_recipe(path), path))
    done = {t.number: t.variant for t in kept.trials if t.state in (COMPLETE, INFEASIBLE)}
    assert seen.items() <= done.items()  # every trial seen finished is still there, with its variant
    assert len(done) < 6  # it was stopped before the end
    assert not [t for t in kept.trials if t.state == RUNNING]
    # the trial running at Stop (the next one starts the moment one finishes) is recorded as stopped
    assert kept.trials[-1].state == FAILED and kept.trials[-1].error == STOPPED_ERROR
    variants = {r["id"] for r in Workspace(root).list()}
    assert set(done.values()) <= variants
    assert not [p for p in (root / "tmp").iterdir() if p.is_dir()]  # no half trial left behind


def _search_then_stop(qtbot, view) -> dict[int, str | None]:
    assert view.start() and view.running and view.stop_button.isEnabled()
    qtbot.waitUntil(
        lambda: view.progress is not None and view.progress.count(COMPLETE, INFEASIBLE) >= 1, timeout=300_000
    )
    seen = {t.number: t.variant for t in view.progress.trials if t.state in (COMPLETE, INFEASIBLE)}
    with qtbot.waitSignal(view.ended, timeout=60_000) as ended:
        view.stop()
    assert ended.args == ["stopped"] and not view.running
    assert view.search_button.isEnabled() and not view.stop_button.isEnabled()
    assert "stopped" in view.status_label.text()
    return seen
