"""The run panel with real worker processes (`python -m studio.worker`) on the real MiniLM.

Runs are kept small: no latency timing, 8 evaluation examples of 32 tokens.
"""

from __future__ import annotations

import math
import os
import signal
import time

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QCoreApplication, QSettings

from studio.gui.document import StudioDocument
from studio.gui.run_panel import RunPanel
from studio.pipeline import Recipe
from studio.variants import Workspace

pytestmark = pytest.mark.gui

SMALL = {
    "model": "builtin:minilm",
    "data": {"evaluation_examples": 8, "calibration_examples": 8},
    "evaluate": {"latency": False, "sequence_length": 32},
}


@pytest.fixture(autouse=True)
def _private_settings(tmp_path):
    QCoreApplication.setOrganizationName("model-studio-tests")
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))


@pytest.fixture
def workspace(tmp_path):
    return Workspace(tmp_path / "ws")


@pytest.fixture
def document(workspace):
    return StudioDocument(workspace=workspace)


@pytest.fixture
def panel(qtbot, document):
    widget = RunPanel(document)
    qtbot.addWidget(widget)
    widget.resize(1280, 760)
    widget.show()
    yield widget
    widget.shutdown()


def load(document, **extra):
    document.load_recipe(Recipe.model_validate({**SMALL, **extra}))


def test_a_crash_is_reported_then_the_empty_pipeline_runs_to_the_end(qtbot, panel, document, workspace):
    load(document)
    assert panel.progress_values() == [0, 0]  # "Load model" and "Evaluate"
    assert panel.run()
    job = workspace.root / "tmp" / panel.job_id
    qtbot.waitUntil(lambda: "loading builtin:minilm" in panel.log_view.toPlainText(), timeout=60_000)
    assert job.is_dir()  # the worker works inside its folder
    with qtbot.waitSignal(panel.failed, timeout=60_000) as blocker:  # a real signal, as the OOM killer sends
        os.killpg(panel.process.processId(), signal.SIGKILL)
    assert "SIGKILL" in blocker.args[0]
    assert "SIGKILL" in panel.error_label.text() and panel.error_banner.isVisibleTo(panel)
    assert not panel.is_running() and panel.run_button.isEnabled()
    assert not job.exists() and list((workspace.root / "tmp").iterdir()) == []

    changed = []
    document.variants_changed.connect(lambda: changed.append(True))
    with qtbot.waitSignal(panel.started):
        assert panel.run()
    assert panel.is_running() and not panel.run_button.isEnabled() and panel.cancel_button.isEnabled()
    with qtbot.waitSignal(panel.finished, timeout=180_000) as blocker:
        pass
    result = blocker.args[0]
    assert changed == [True]
    assert not panel.is_running() and panel.run_button.isEnabled()
    assert not panel.error_banner.isVisibleTo(panel)
    assert panel.progress_values() == [100, 100]
    (variant,) = result["variants"]
    assert variant["id"] in [v["id"] for v in workspace.list()]
    assert variant["metrics"]["quality"]["fidelity_cosine"] == pytest.approx(1.0, abs=1e-3)
    assert variant["id"] in panel.result_label.text() and panel.result_label.isVisibleTo(panel)
    # the Compare tab is offered, not forced (the log stays in view)
    assert panel.compare_button.isVisibleTo(panel)
    with qtbot.waitSignal(panel.compare_requested, timeout=1000):
        panel.compare_button.click()
    assert "loaded builtin:minilm" in panel.log_view.toPlainText()
    assert list((workspace.root / "tmp").iterdir()) == []


def test_loss_curve_while_distilling_then_cancel_leaves_nothing(qtbot, panel, document, workspace):
    load(document, steps=[{"technique": "distill", "params": {"steps": 200, "batch_size": 1}}])
    assert panel.loss_plot.isVisibleTo(panel)
    plot = panel.loss_plot.getPlotItem()
    assert plot.getAxis("bottom").labelText == "iteration" and plot.getAxis("left").labelText == "loss"
    before = workspace.list()
    assert panel.run()
    job = workspace.root / "tmp" / panel.job_id
    qtbot.waitUntil(lambda: len(panel.loss_points().get(0, ([], []))[0]) >= 2, timeout=180_000)
    assert job.exists()  # the worker is inside the run: its work folder exists
    (curve,) = [item for item in panel.loss_plot.getPlotItem().listDataItems()]
    xs, ys = curve.getData()  # what the plot draws
    assert list(xs[:2]) == [0, 1]
    assert all(math.isfinite(y) and y > -1e-4 for y in ys), ys  # 1 - cosine: tiny negative when equal
    # the distill row moves with its steps (its progress event follows each loss point: wait for it)
    qtbot.waitUntil(lambda: panel.progress_values()[1] > 0, timeout=60_000)
    assert panel.progress_values()[1] < 100

    pid = panel.process.processId()
    started = time.perf_counter()
    with qtbot.waitSignal(panel.cancelled, timeout=2000):
        panel.cancel()
    assert time.perf_counter() - started < 2.0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not job.exists() and list((workspace.root / "tmp").iterdir()) == []
    assert workspace.list() == before
    assert not panel.is_running() and panel.run_button.isEnabled()
    assert "Cancelled" in panel.status_label.text()
    # the unfinished rows say they were cancelled instead of staying at their last percentage
    assert panel._rows[1].bar.text().startswith("cancelled") and panel._rows[1].message.text() == "cancelled"
    assert panel._rows[-1].bar.text() == "cancelled"
    assert not panel.compare_button.isVisibleTo(panel)


def test_every_step_row_is_in_view_with_five_steps(qtbot, panel, document):
    steps = [{"technique": t} for t in ("precision.half", "export.onnx", "onnx.optimize", "onnx.half")]
    panel.resize(1280, 600)  # a smaller window than the fixture's: the settings below must give way
    load(document, steps=[*steps, {"technique": "onnx.quantize_dynamic"}])
    assert len(panel._rows) == 7  # load, five steps, evaluate
    evaluate = panel._rows[-1].bar
    viewport = panel.steps_scroll.viewport()

    def bottom() -> int:
        return evaluate.mapTo(viewport, evaluate.rect().bottomLeft()).y()

    qtbot.waitUntil(lambda: 0 < bottom() <= viewport.height(), timeout=5000)  # once the layout settles


def test_an_invalid_pipeline_is_refused_before_starting(qtbot, panel, document):
    load(document, steps=[{"technique": "export.onnx"}, {"technique": "prune.magnitude"}])
    with qtbot.waitSignal(panel.failed, timeout=1000) as blocker:
        assert not panel.run()
    assert "needs a torch model" in blocker.args[0]
    assert not panel.is_running() and panel.process is None
    assert "needs a torch model" in panel.error_label.text()


def test_run_settings_edit_the_recipe(qtbot, panel, document):
    load(document)
    spin = panel.evaluate_form.editor("sequence_length")
    assert spin.value() == 32
    spin.setValue(64)
    assert document.recipe().evaluate.sequence_length == 64
    document.load_recipe(Recipe.model_validate({**SMALL, "evaluate": {"sequence_length": 16}}))
    assert panel.evaluate_form.editor("sequence_length").value() == 16
