"""The Model tab on the real MiniLM: the module tree, its filter, off-thread histograms and statistics."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import QModelIndex, QThreadPool
from PySide6.QtGui import QImage

from studio.checkpoints import open_checkpoint
from studio.gui.document import StudioDocument
from studio.gui.model_view import PATH_ROLE, TENSOR_ROLE, ModelView
from studio.gui.widgets import export_plot, export_table_csv, live_tasks
from studio.inspection.module_tree import build_module_tree, layer_type
from studio.variants import Workspace

pytestmark = pytest.mark.gui

QUERY = "encoder.layer.0.attention.self.query.weight"
FFN = "encoder.layer.5.intermediate.dense.weight"


@pytest.fixture
def view(qtbot, tmp_path, settings):
    document = StudioDocument(workspace=Workspace(tmp_path / "workspace"))
    view = ModelView(document)
    qtbot.addWidget(view)
    view.resize(1280, 760)
    view.show()
    assert document.open_model("builtin:minilm")
    yield view
    view.shutdown()
    QThreadPool.globalInstance().waitForDone(30000)


def _children(model, parent: QModelIndex) -> list[QModelIndex]:
    return [model.index(r, 0, parent) for r in range(model.rowCount(parent))]


def _find(model, path: str, parent: QModelIndex | None = None) -> QModelIndex | None:
    for index in _children(model, parent or QModelIndex()):
        if index.data(PATH_ROLE) == path:
            return index
        if path.startswith(str(index.data(PATH_ROLE)) + "."):
            found = _find(model, path, index)
            if found is not None:
                return found
    return None


def _visible_tensors(view: ModelView, parent: QModelIndex | None = None) -> list[str]:
    out = []
    for index in _children(view.proxy, parent or QModelIndex()):
        if index.data(TENSOR_ROLE):
            out.append(index.data(TENSOR_ROLE))
        out += _visible_tensors(view, index)
    return out


def test_module_tree_and_layer_types_from_names():
    refs = list(open_checkpoint("builtin:minilm").tensors())
    root = build_module_tree(refs)
    layers = root.children["encoder"]
    assert layers.name == "encoder.layer"  # the single-child chain is merged
    assert list(layers.children) == ["0", "1", "2", "3", "4", "5"]
    assert layers.params == sum(r.numel for r in refs if r.name.startswith("encoder."))
    assert layer_type(QUERY) == "attention.self.query"
    assert layer_type("embeddings.word_embeddings.weight") == "embeddings.word_embeddings"
    assert layer_type("model.layers.11.mlp.gate_proj.weight") == "mlp.gate_proj"


def test_tree_has_the_six_encoder_layers_and_the_filter_narrows_it(view, qtbot):
    model = view.tree_model
    layers = _find(model, "encoder.layer")
    assert layers is not None and layers.data() == "encoder.layer"
    assert [i.data() for i in _children(model, layers)] == ["0", "1", "2", "3", "4", "5"]
    params = model.index(layers.row(), 2, layers.parent()).data()
    assert params == f"{6 * 1_774_464:,}"
    assert len(_visible_tensors(view)) == 104

    qtbot.keyClicks(view.filter_edit, "layer.3 query")
    assert sorted(_visible_tensors(view)) == [
        "encoder.layer.3.attention.self.query.bias",
        "encoder.layer.3.attention.self.query.weight",
    ]
    view.filter_edit.clear()
    assert len(_visible_tensors(view)) == 104


def test_selecting_a_tensor_shows_its_histogram_off_the_gui_thread(view, qtbot):
    with qtbot.waitSignal(view.histogram_shown, timeout=30000) as shown:
        assert view.select_tensor(QUERY)
    assert shown.args == [QUERY]
    counts = view.hist_curve.yData
    assert len(counts) == 128 and int(np.sum(counts)) == 147456  # 384 x 384
    assert len(view.hist_curve.xData) == 129
    rows = {view.stats_table.item(r, 0).text(): view.stats_table.item(r, 1).text() for r in range(13)}
    assert rows["shape"] == "384×384" and rows["parameters"] == "147,456" and rows["dtype"] == "float32"
    assert float(rows["std"]) == pytest.approx(view.current.stats.std, rel=1e-4)
    assert view.mean_line.value() == pytest.approx(view.current.stats.mean)
    assert view.std_lines[1].value() - view.std_lines[0].value() == pytest.approx(2 * view.current.stats.std)

    # bins: a new histogram with that many bars, same total
    with qtbot.waitSignal(view.histogram_shown, timeout=30000):
        view.bins_spin.setValue(32)
    assert len(view.hist_curve.yData) == 32 and int(np.sum(view.hist_curve.yData)) == 147456

    # log count axis
    axis = view.plot.getPlotItem().getAxis("left")
    assert not axis.logMode
    view.log_check.setChecked(True)
    assert axis.logMode and "log" in axis.labelText
    # a decade of headroom above the peak on the log axis: the legend (top right) sits over no data
    peak = float(np.max(view.hist_curve.yData))
    top = view.plot.getPlotItem().getViewBox().viewRange()[1][1]
    assert top >= np.log10(peak) + 0.9

    # INT8 grid: 255 levels at multiples of max|x| / 127, and the shaded clipping range
    view.int8_check.setChecked(True)
    stats = view.current.stats
    absmax = max(abs(stats.min), abs(stats.max))
    assert view.int8_grid.isVisible() and view.int8_band.isVisible()
    assert view.int8_band.getRegion() == pytest.approx((-absmax, absmax))
    xs = np.unique(view.int8_grid.xData)
    assert len(xs) == 255 and xs[1] - xs[0] == pytest.approx(absmax / 127)
    assert 0 < view.current.int8_rmse < absmax / 127  # rounding error is below one step
    view.int8_check.setChecked(False)
    assert not view.int8_grid.isVisible()


def test_a_late_result_for_an_old_selection_is_dropped(view, qtbot):
    shown: list[str] = []
    view.histogram_shown.connect(shown.append)
    view.select_tensor("embeddings.word_embeddings.weight")  # 11.7 M values: the slow one
    with qtbot.waitSignal(view.histogram_shown, timeout=30000):
        view.select_tensor(FFN)
    qtbot.waitUntil(lambda: live_tasks() == 0, timeout=30000)  # every task ran and was released
    assert shown == [FFN]
    assert view.current.stats.name == FFN and int(np.sum(view.hist_curve.yData)) == 1536 * 384


def test_selecting_a_module_summarises_it_and_the_whole_model_panel(view, qtbot):
    index = view.proxy.mapFromSource(_find(view.tree_model, "encoder.layer.0"))
    view.tree.setCurrentIndex(index)
    rows = {view.stats_table.item(r, 0).text(): view.stats_table.item(r, 1).text() for r in range(5)}
    assert (
        rows["module"] == "encoder.layer.0" and rows["parameters"] == "1,774,464" and rows["tensors"] == "16"
    )
    assert view.plot_stack.currentWidget() is view.placeholder

    types = {
        view.type_table.item(r, 0).text(): view.type_table.item(r, 1).text()
        for r in range(view.type_table.rowCount())
    }
    assert types["attention.self.query"] == f"{6 * (384 * 384 + 384):,}"
    dtypes = {view.dtype_table.item(r, 0).text(): view.dtype_table.item(r, 2).text() for r in range(2)}
    assert dtypes["int64"] == "512"  # position_ids


def test_plot_and_table_export(view, qtbot, tmp_path):
    with qtbot.waitSignal(view.histogram_shown, timeout=30000):
        view.select_tensor(QUERY)
    png = export_plot(view.plot, tmp_path / "hist.png")
    svg = export_plot(view.plot, tmp_path / "hist.svg")
    image = QImage(str(png))
    assert image.width() >= 800 and "weight value" in svg.read_text()
    csv_text = export_table_csv(view.stats_table, tmp_path / "stats.csv").read_text()
    assert csv_text.splitlines()[0] == "Statistic,Value" and "147,456" in csv_text
