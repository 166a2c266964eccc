"""The Heads tab on the real MiniLM: importance heatmap, masking heads by clicking, live fidelity,
turning the masked heads into a prune.heads step, cancel, and a model without attention."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QCoreApplication, QPoint, Qt

from studio.gui.document import StudioDocument
from studio.gui.heads_view import HeadsView
from studio.pipeline import load_recipe
from studio.resources import resource
from studio.variants import Workspace

pytestmark = pytest.mark.gui


@pytest.fixture
def document(tmp_path, settings):
    return StudioDocument(workspace=Workspace(tmp_path / "workspace"))


@pytest.fixture
def view(qtbot, document):
    view = HeadsView(document)
    qtbot.addWidget(view)
    view.resize(1280, 740)
    view.show()
    yield view
    view.shutdown()


def _compute(view: HeadsView, qtbot, method: str = "gradient", examples: int = 8, seq: int = 32) -> None:
    view.method_combo.setCurrentText(method)
    view.examples_spin.setValue(examples)
    view.seq_spin.setValue(seq)
    with qtbot.waitSignal(view.computed, timeout=120000):
        qtbot.mouseClick(view.compute_button, Qt.MouseButton.LeftButton)
        assert view.progress.maximum() == 0  # busy while the model loads, not an empty bar


def test_heatmap_masking_fidelity_and_prune_step(view, document, qtbot):
    assert document.open_model("builtin:minilm")
    assert view.stack.currentWidget() is view.placeholder and "Compute" in view.placeholder.text()
    _compute(view, qtbot)
    assert view.image.image.shape == (6, 12)
    assert view.stack.currentWidget() is view.plot
    assert view.importance.method == "gradient" and view.importance.examples == 8
    assert view.progress.value() == 1000 and view.progress.maximum() == 1000
    # the time the user waited, loading included, next to the time spent ranking
    assert (
        view.progress_label.text().startswith("done in ") and "s ranking heads)" in view.progress_label.text()
    )
    left = view.plot.getPlotItem().getAxis("left")
    assert (
        left.labelText == "layer (attention block)"
        and view.plot.getPlotItem().getAxis("bottom").labelText == "head"
    )

    # hover a cell: its layer, head and value are read out
    target = view.cell_center(2, 7)
    qtbot.mouseMove(view.plot.viewport(), target)
    qtbot.waitUntil(lambda: "layer 2" in view.hover_label.text(), timeout=5000)
    assert "head 7" in view.hover_label.text()

    # a real click on the heatmap switches the head off; fidelity drops below 1
    with qtbot.waitSignal(view.fidelity_changed, timeout=60000) as changed:
        qtbot.mouseClick(view.plot.viewport(), Qt.MouseButton.LeftButton, pos=target)
    assert view.masked == {(2, 7)}
    assert 0.5 < changed.args[0] < 1.0
    assert view.fidelity_label.text() == f"fidelity with 1 head off: {changed.args[0]:.4f}"
    assert list(view.mask_marks.data["x"]) == [7.5] and list(view.mask_marks.data["y"]) == [2.5]

    # more heads off: lower fidelity
    with qtbot.waitSignal(view.fidelity_changed, timeout=60000) as more:
        view.mask_least_important(12)
    assert len(view.masked) == 12 and more.args[0] < 1.0
    assert view.masked_list.count() == 12

    # everything back on: exactly 1
    with qtbot.waitSignal(view.fidelity_changed, timeout=60000) as back:
        qtbot.mouseClick(view.clear_button, Qt.MouseButton.LeftButton)
    assert back.args[0] == 1.0 and view.masked == set()
    assert view.fidelity_label.text() == "fidelity with 0 heads off: 1.0000"
    assert not view.prune_button.isEnabled()

    # prune these heads -> an explicit prune.heads step; undo removes it
    view.toggle_head(0, 3)
    view.toggle_head(4, 1)
    view.toggle_head(0, 11)
    qtbot.mouseClick(view.prune_button, Qt.MouseButton.LeftButton)
    assert len(document.pipeline) == 1
    step = document.pipeline.step(0)
    assert step.technique == "prune.heads" and step.params == {"heads": {0: [3, 11], 4: [1]}}
    document.undo_stack.undo()
    assert len(document.pipeline) == 0
    qtbot.waitUntil(lambda: view.fidelity is not None and view.fidelity < 1.0, timeout=60000)

    # on the starter pipeline (export, optimize, quantize) the torch step goes before the export: it runs
    document.pipeline.load(load_recipe(resource("recipes", "starter", "onnx-int8.yaml")))
    assert document.pipeline.problems(document.start_kind(), document.model) == {}
    qtbot.mouseClick(view.prune_button, Qt.MouseButton.LeftButton)
    steps = [s.technique for s in document.pipeline.steps()]
    assert steps == ["prune.heads", "export.onnx", "onnx.optimize", "onnx.quantize_dynamic"]
    assert document.pipeline.problems(document.start_kind(), document.model) == {}


def test_cancel_stops_a_computation(view, document, qtbot):
    assert document.open_model("builtin:minilm")
    view.method_combo.setCurrentText("ablation")  # one forward pass per head: long enough to cancel
    view.examples_spin.setValue(16)
    with qtbot.waitSignal(view.progress.valueChanged, timeout=60000):
        view.compute()
    assert view.computing and view.cancel_button.isEnabled()
    qtbot.mouseClick(view.cancel_button, Qt.MouseButton.LeftButton)
    assert not view.computing and view.compute_button.isEnabled()
    assert view.progress_label.text() == "cancelled"
    view.pool.waitForDone(60000)
    QCoreApplication.processEvents()
    assert view.importance is None  # the cancelled run's result never lands


def test_a_model_without_attention_says_so(view, document, qtbot, cnn_torchscript):
    assert document.open_model(str(cnn_torchscript))
    with qtbot.waitSignal(view.compute_failed, timeout=60000) as failed:
        view.compute()
    assert "no attention heads" in failed.args[0]
    assert view.stack.currentWidget() is view.placeholder
    assert "no attention heads" in view.placeholder.text()
    assert not view.prune_button.isEnabled() and view.compute_button.isEnabled()
    # clicking the (empty) plot area does nothing
    qtbot.mouseClick(view.plot.viewport(), Qt.MouseButton.LeftButton, pos=QPoint(50, 50))
    assert view.masked == set()
