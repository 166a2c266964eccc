"""The views of LLM quantization on real variants of builtin:tinylm built by the worker: the Model tab's
per-layer quantization error of a round-to-nearest INT4 variant (an error column in the tree, and float vs
dequantized histograms on the same bins for the selected layer), and the Compare tab's KV-cache bits vs
quality vs memory plot of a 2-bit quanto KV-cache variant and the original."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PySide6.QtCore import QThreadPool

from studio.events import Done
from studio.gui.compare.view import CompareView
from studio.gui.document import StudioDocument
from studio.gui.model_view import ModelView
from studio.gui.quant_error_panel import ERROR_COLUMN
from studio.gui.widgets import work_pool
from studio.units import human_bytes
from studio.variants import Workspace
from studio.worker import WorkerClient

pytestmark = pytest.mark.gui

LAYER = "model.layers.0.mlp.down_proj"
BASE = {
    "version": 1,
    "model": "builtin:tinylm",
    "data": {"evaluation_examples": 4, "calibration_examples": 4},
    "evaluate": {"batch_sizes": [1], "sequence_length": 16, "latency": False},
}
RTN = {**BASE, "steps": [{"technique": "quantize.weight_only", "params": {"bits": 4, "group_size": 32}}]}
KV2 = {
    **BASE,
    "steps": [
        {
            "technique": "kv_cache.quantize",
            "params": {"method": "quanto", "bits": 2, "residual_length": 0, "group_size": 4},
        }
    ],
    "evaluate": {
        **BASE["evaluate"],
        "generation": {"prompt_tokens": 8, "new_tokens": 4, "batch_sizes": [1]},
    },
}


def build(root, recipe):
    events = list(WorkerClient(recipe, root).events())
    assert isinstance(events[-1], Done), events[-1]
    (variant,) = events[-1].result["variants"]
    return events[-1].result["baseline"]["id"], variant["id"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-quant")
    _baseline, rtn = build(root, RTN)
    baseline, kv2 = build(root, KV2)
    return root, {"rtn": rtn, "kv2": kv2, "original": baseline}


def wait_pools():
    for pool in (work_pool(), QThreadPool.globalInstance()):
        assert pool.waitForDone(120000), "a background task never ended"


@pytest.fixture
def model_view(qtbot, workspace, settings):
    root, ids = workspace
    document = StudioDocument(workspace=Workspace(root))
    view = ModelView(document)
    qtbot.addWidget(view)
    view.resize(1280, 760)
    view.show()
    with qtbot.waitSignal(view.quant.errors_shown, timeout=180000):
        assert document.open_model(str(root / "variants" / ids["rtn"]))
    yield view
    view.shutdown()
    wait_pools()


def test_the_tree_has_each_quantized_layers_error(model_view):
    view = model_view
    quant = view.quant
    assert not view.tree.isColumnHidden(ERROR_COLUMN)
    assert view.tree_model.horizontalHeaderItem(ERROR_COLUMN).text() == "Quant. error"
    assert len(quant.errors) == 28  # the seven Linear layers of each of the four decoder blocks
    cell = view.error_cells[LAYER]
    value = quant.errors[LAYER]
    assert cell.text() == f"{100 * value:.3g} %" and 0.03 < value < 0.3
    assert "int4 symmetric, groups of 32 columns" in cell.toolTip()
    assert view.error_cells["model.layers.0.input_layernorm"].text() == ""  # a float layer: no error


def test_selecting_a_layer_shows_float_against_dequantized(model_view, qtbot):
    view = model_view
    quant = view.quant
    with qtbot.waitSignal(quant.layer_shown, timeout=60000):
        assert view.select_path(LAYER)
    assert view.plot_stack.currentWidget() is quant.plot
    result = quant.current
    assert result is not None and result.layer.name == LAYER
    fx, fy = quant.float_curve.getData()
    dx, dy = quant.dq_curve.getData()
    assert np.array_equal(fx, dx) and len(fx) == view.bins_spin.value() + 1  # one set of bins for both
    assert fy.sum() == dy.sum() == 192 * 512
    assert not np.array_equal(fy, dy)
    legend = [label.text for _sample, label in quant.legend.items]
    assert legend == ["float (builtin:tinylm)", "dequantized int4 (WeightOnlyLinear)"]
    title = quant.plot.getPlotItem().titleLabel.text
    assert f"{100 * result.relative_l2:.3g} %" in title and "float vs dequantized" in title
    rows = {
        view.stats_table.item(r, 0).text(): view.stats_table.item(r, 1).text()
        for r in range(view.stats_table.rowCount())
    }
    assert rows["bits"] == "4" and rows["group size (columns per scale)"] == "32 columns"
    assert rows["relative L2 error ‖Ŵ − W‖ / ‖W‖"] == view.error_cells[LAYER].text()
    assert rows["compared with"] == f"{LAYER}.weight of builtin:tinylm"
    # the codes tensor stands for the layer too; its scales keep their own histogram
    # (a 4-bit causal LM's folder is compressed-tensors': its codes are `weight_packed`, scales `weight_scale`)
    with qtbot.waitSignal(quant.layer_shown, timeout=60000):
        assert view.select_tensor(f"{LAYER}.weight_packed")
    with qtbot.waitSignal(view.histogram_shown, timeout=60000):
        assert view.select_tensor(f"{LAYER}.weight_scale")
    assert view.plot_stack.currentWidget() is view.plot
    # more bins redraw the comparison with them
    with qtbot.waitSignal(quant.layer_shown, timeout=60000):
        assert view.select_path(LAYER)
    with qtbot.waitSignal(quant.layer_shown, timeout=60000):
        view.bins_spin.setValue(32)
    assert len(quant.float_curve.getData()[0]) == 33


def test_an_original_checkpoint_has_no_error_column(qtbot, tmp_path, settings):
    document = StudioDocument(workspace=Workspace(tmp_path / "ws"))
    view = ModelView(document)
    qtbot.addWidget(view)
    assert document.open_model("builtin:tinylm")
    assert view.tree.isColumnHidden(ERROR_COLUMN) and view.quant.report is None
    view.shutdown()
    wait_pools()


@pytest.fixture
def compare(qtbot, workspace, settings):
    view = CompareView(StudioDocument(workspace=Workspace(workspace[0])))
    qtbot.addWidget(view)
    view.resize(1280, 800)
    view.show()
    yield view
    view.shutdown()
    wait_pools()


def test_kv_bits_against_quality_and_memory(compare, workspace, qtbot):
    _root, ids = workspace
    kv = compare.generation.kv_bits
    tabs = {compare.tabs.tabText(i): i for i in range(compare.tabs.count())}
    assert compare.tabs.isTabVisible(tabs["KV bits vs quality"])
    rows = {r["id"]: r for r in compare.rows}
    assert set(kv.points) == {ids["original"], ids["kv2"]}  # the RTN variant has no generation metrics
    assert kv.quality_key == "perplexity"
    bits, ppl, size = kv.points[ids["kv2"]]
    assert bits == 2 and ppl == rows[ids["kv2"]]["metrics"]["quality"]["perplexity"]
    assert size == rows[ids["kv2"]]["metrics"]["generation"]["kv_cache_bytes"]
    float_bits, _ppl, float_size = kv.points[ids["original"]]
    assert float_bits == 32 and float_size > size
    assert kv.sizes[ids["original"]] > kv.sizes[ids["kv2"]]  # a larger cache, a larger point
    scatters = {m: s for m, s in kv._scatters.items() if len(s.data)}
    assert set(scatters) == {"float", "quanto"}
    assert list(scatters["quanto"].getData()[0]) == [math.log2(2)]
    item = kv.plot.getPlotItem()
    assert "bits" in item.getAxis("bottom").labelText and "log scale" in item.getAxis("bottom").labelText
    assert "perplexity" in item.getAxis("left").labelText
    assert "point area: KV-cache bytes" in item.titleLabel.text
    assert [label.text for _s, label in kv.legend.items] == ["float cache", "quanto cache"]
    compare.tabs.setCurrentIndex(tabs["KV bits vs quality"])
    qtbot.waitExposed(kv.plot)
    box = item.getViewBox().sceneBoundingRect()
    legend = kv.legend.sceneBoundingRect()
    assert legend.width() > 0 and not legend.intersects(box) and legend.top() >= box.bottom()
    assert legend.right() <= kv.plot.width() + 1
    # every point and its label lie inside the visible range
    (x0, x1), (y0, y1) = item.getViewBox().viewRange()
    for b, q, _s in kv.points.values():
        assert x0 < math.log2(b) < x1 and y0 < q < y1
    texts = [t for t in kv._labels if t.isVisible()]
    assert len(texts) == 2 and all("-bit · KV " in t.textItem.toPlainText() for t in texts)
    assert any(t.textItem.toPlainText().endswith(f"quanto 2-bit · KV {human_bytes(size)}") for t in texts)
    # the labels are placed (in pixels) once the plot is painted: then each lies inside the plot
    qtbot.waitUntil(lambda: all(box.contains(t.sceneBoundingRect()) for t in texts), timeout=10000)
