"""The Compare tab on real variants of MiniLM (the original, a bfloat16 variant, an ONNX variant) built once
by the worker: the sortable table, the bar charts, the Pareto scatter and its link to the table, A/B
comparison off the GUI thread, exports, and removing a variant."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QItemSelectionModel, Qt, QThreadPool
from PySide6.QtGui import QImage

from studio.gui.compare.ab_panel import metric_title
from studio.gui.compare.table import ID_ROLE, SORT_ROLE, NumericSortProxy, VariantTableModel
from studio.gui.compare.view import EMPTY_MESSAGE, CompareView
from studio.gui.document import StudioDocument
from studio.gui.widgets import export_plot, live_tasks, work_pool
from studio.variants import Workspace

pytestmark = pytest.mark.gui


def _make_view(qtbot, root):
    view = CompareView(StudioDocument(workspace=Workspace(root)))
    qtbot.addWidget(view)
    view.resize(1280, 800)
    view.show()
    return view


@pytest.fixture
def view(qtbot, built, settings):
    view = _make_view(qtbot, built[0])
    yield view
    view.shutdown()
    for pool in (work_pool(), QThreadPool.globalInstance()):
        assert pool.waitForDone(120000), "a background task never ended"


def _table_ids(view: CompareView) -> list[str]:
    return [view.proxy.index(r, 0).data(ID_ROLE) for r in range(view.proxy.rowCount())]


def _column(view: CompareView, title: str) -> int:
    return next(i for i, c in enumerate(view.table_model.columns) if c.title.startswith(title))


def _select_rows(view: CompareView, ids: list[str]) -> None:
    """What a user does with click and Ctrl+click on rows."""
    model = view.table.selectionModel()
    model.clearSelection()
    for vid in ids:
        row = _table_ids(view).index(vid)
        flags = QItemSelectionModel.SelectionFlag.Select | QItemSelectionModel.SelectionFlag.Rows
        model.select(view.proxy.index(row, 0), flags)


def test_generation_metrics_have_titles_with_units():
    assert metric_title("ttft_ms.b1.p50") == "time to first token b1 p50 (ms)"
    assert metric_title("tpot_ms.b4.p50") == "time per output token b4 p50 (ms)"
    assert metric_title("decode_tokens_per_s.b1") == "decode b1 (tokens/s)"
    assert metric_title("kv_cache_mb") == "KV cache (MB)"


def test_empty_workspace_says_what_to_do(qtbot, tmp_path, settings):
    view = _make_view(qtbot, tmp_path / "empty")
    assert view.stack.currentWidget() is view.empty_label
    assert view.empty_label.text() == EMPTY_MESSAGE
    assert not view.csv_button.isEnabled() and not view.remove_button.isEnabled()


def test_table_lists_the_variants_and_sorts_numbers_numerically(view, built):
    _root, ids = built
    assert view.stack.currentWidget() is view.main_split
    assert sorted(_table_ids(view)) == sorted(ids.values())
    titles = [" ".join(c.title.split()) for c in view.table_model.columns]
    for title in ("Size (MB)", "b1 p50 (ms)", "b4 p95 (ms)", "b4 throughput (/s)", "Peak memory (MB)"):
        assert title in titles
    # the trade-off in view without scrolling: size, then quality, then the latencies
    assert titles.index("Quality (fidelity)") == titles.index("Size (MB)") + 1

    view.sort_by("Size")
    order = _table_ids(view)
    assert order.index(ids["bf16"]) < order.index(ids["original"])  # 45 MB before 91 MB
    size = _column(view, "Size")
    sizes = [view.proxy.index(r, size).data(SORT_ROLE) for r in range(3)]
    assert sizes == sorted(sizes) and all(isinstance(s, float) for s in sizes)
    assert view.proxy.index(0, size).data() == f"{sizes[0]:.4g}"

    view.sort_by("Size", Qt.SortOrder.DescendingOrder)
    assert _table_ids(view)[-1] == ids["bf16"]
    # the bars follow the table's order
    assert [r["id"] for r in view._plotted] == _table_ids(view)


def test_sorting_is_numeric_and_missing_rows_are_marked(view):
    # the same real rows with sizes whose text order differs from their numeric order
    rows = [dict(r, metrics=dict(r["metrics"])) for r in view.rows]
    for row, size in zip(rows, (9e6, 100e6, 10e6), strict=True):
        row["metrics"]["size_bytes"] = size
    rows[1]["missing"] = True
    model = VariantTableModel()
    model.set_rows(rows)
    proxy = NumericSortProxy()
    proxy.setSourceModel(model)
    column = next(i for i, c in enumerate(model.columns) if c.title.startswith("Size"))
    proxy.sort(column, Qt.SortOrder.AscendingOrder)
    assert [proxy.index(r, column).data() for r in range(3)] == ["9", "10", "100"]
    missing = model.index(1, 0)
    assert missing.data().startswith("⚠") and "gone" in missing.data(Qt.ItemDataRole.ToolTipRole)


def test_bar_charts_and_pareto_scatter(view, built):
    _root, ids = built
    rows = {r["id"]: r for r in view.rows}
    order = [r["id"] for r in view._plotted]
    assert view.batch() == "1"
    heights = list(view.latency_bars.opts["height"])
    assert len(heights) == 3
    assert heights == pytest.approx([rows[i]["metrics"]["latency_ms"]["1"]["p50"] for i in order])
    p95 = [rows[i]["metrics"]["latency_ms"]["1"]["p95"] for i in order]
    assert list(view.latency_whiskers.opts["top"]) == pytest.approx(
        [a - b for a, b in zip(p95, heights, strict=True)]
    )
    assert len(view.size_bars.opts["height"]) == 3 and len(view.quality_bars.opts["x"]) == 3
    # quality as its loss from 0 (the original's level), not bars of ~0.99 on an axis starting at 0.885
    bf16_q = rows[ids["bf16"]]["metrics"]["quality"]["fidelity_cosine"]
    assert list(view.quality_bars.opts["y0"]) == [0.0, 0.0, 0.0]
    assert list(view.quality_bars.opts["height"])[order.index(ids["bf16"])] == pytest.approx(1 - bf16_q)
    assert view.quality_plot.getPlotItem().getViewBox().viewRange()[1][0] == pytest.approx(0.0, abs=1e-12)
    legend = view.quality_plot.getPlotItem().legend
    assert [label.text for _sample, label in legend.items] == ["selected in the table"]
    ticks = view.size_plot.getPlotItem().getAxis("bottom")._tickLevels[0]
    assert [t[1] for t in ticks][order.index(ids["original"])] == "original\nminilm"  # named after its model
    assert "(MB)" in view.size_plot.getPlotItem().getAxis("left").labelText
    assert "(ms)" in view.latency_plot.getPlotItem().getAxis("left").labelText

    view.batch_combo.setCurrentIndex(view.batch_combo.findData("4"))
    assert list(view.latency_bars.opts["height"]) == pytest.approx(
        [rows[i]["metrics"]["latency_ms"]["4"]["p50"] for i in order]
    )
    points = view.scatter.points()
    assert sorted(p.data() for p in points) == sorted(ids.values())  # one point per variant
    bf16 = next(p for p in points if p.data() == ids["bf16"])
    assert bf16.pos().x() == pytest.approx(rows[ids["bf16"]]["metrics"]["latency_ms"]["4"]["p50"])
    assert bf16.pos().y() == pytest.approx(rows[ids["bf16"]]["metrics"]["quality"]["fidelity_cosine"])
    assert bf16.size() < next(p for p in points if p.data() == ids["original"]).size()  # smaller on disk
    assert len(view.front_line.xData) >= 1
    assert "batch size 4" in view.pareto_plot.getPlotItem().getAxis("bottom").labelText


def test_clicking_a_point_selects_its_row_and_selecting_a_row_rings_its_point(view, built):
    _root, ids = built
    point = next(p for p in view.scatter.points() if p.data() == ids["bf16"])
    view.scatter.sigClicked.emit(view.scatter, [point], None)
    assert view.selected_ids() == [ids["bf16"]]
    assert view.highlighted_ids() == [ids["bf16"]]
    view.table.selectRow(_table_ids(view).index(ids["onnx"]))
    assert view.selected_ids() == [ids["onnx"]] and view.highlighted_ids() == [ids["onnx"]]
    assert view.current_variant_id() == ids["onnx"]


def test_ab_comparison_runs_off_the_gui_thread_and_drops_stale_results(view, built, qtbot):
    _root, ids = built
    view.examples_spin.setValue(8)
    finished: list[tuple[str, str]] = []
    view.compare_finished.connect(lambda a, b: finished.append((a, b)))
    view.set_ab(ids["original"], ids["onnx"])
    view.compare_ab()  # replaced at once by the selection below: its result must never show
    assert view.progress.isVisible()
    failures: list[str] = []
    view.compare_failed.connect(failures.append)
    _select_rows(view, [ids["original"], ids["bf16"]])
    qtbot.waitUntil(lambda: bool(finished or failures), timeout=180000)
    assert not failures, failures
    qtbot.waitUntil(lambda: view.overlay is not None or "Cannot" in view.layer_info.text(), timeout=60000)
    assert view.overlay is not None, view.layer_info.text()
    qtbot.waitUntil(lambda: live_tasks() == 0, timeout=120000)
    assert finished == [(ids["original"], ids["bf16"])] and not failures
    assert not view.progress.isVisible()

    table = view.metrics_table
    rows = {
        table.item(r, 0).text(): [table.item(r, c).text() for c in range(6)] for r in range(table.rowCount())
    }
    assert table.horizontalHeaderItem(1).text() == "A: original minilm"
    size = rows["size (MB)"]
    assert float(size[3].rstrip("×")) == pytest.approx(0.5, abs=0.01) and size[4] == "B"
    assert rows["latency b1 p50 (ms)"][5].startswith(("yes", "no"))
    assert rows["latency b4 p50 (ms)"][3].endswith("×")
    assert "quality: fidelity cosine" in rows
    # every column in view: metric names whole, "Significant?" inside the table's right edge
    header = table.horizontalHeader()
    fm = table.fontMetrics()
    assert header.sectionSize(0) >= max(fm.horizontalAdvance(name) for name in rows)
    assert header.sectionViewportPosition(5) + 40 <= table.viewport().width()
    assert header.sectionViewportPosition(5) >= 0

    # the histogram overlay: two curves of the same layer on the same bins
    overlay = view.overlay
    layer = view.layer_combo.currentData()
    assert overlay.name == layer and layer in {x["name"] for x in view.ab.compare["weights"]["layers"]}
    numel = view.ab.refs_a[layer].numel
    assert view.hist_a.yData.sum() == numel and view.hist_b.yData.sum() == numel
    assert list(view.hist_a.xData) == list(view.hist_b.xData)
    legend = [label.text for _sample, label in view.hist_legend.items]
    assert legend == ["A: original minilm", f"B: {_label(view, ids['bf16'])}"]
    assert "relative L2 change" in view.layer_info.text()

    with qtbot.waitSignal(view.histogram_shown, timeout=60000):
        assert view.select_layer("encoder.layer.0.attention.self.query.weight")
    assert view.hist_a.yData.sum() == 384 * 384

    # the examples where they disagree most: bfloat16 changes the embeddings a little
    dis = view.disagreements_table
    assert dis.rowCount() == 5
    scores = [float(dis.item(r, 1).text()) for r in range(dis.rowCount())]
    assert scores == sorted(scores) and scores[0] < 1.0 and dis.item(0, 2).text()


def _label(view: CompareView, vid: str) -> str:
    from studio.variant_rows import label

    return label(next(r for r in view.rows if r["id"] == vid))


def test_table_csv_and_plot_png_export(view, tmp_path):
    lines = view.export_table_csv(tmp_path / "variants.csv").read_text().splitlines()
    assert lines[0].startswith("Variant,Kind,Size (MB),Quality (fidelity),b1 p50 (ms),b1 p95 (ms)")
    assert len(lines) == 1 + 3
    png = export_plot(view.latency_plot, tmp_path / "latency.png")
    image = QImage(str(png))
    assert not image.isNull() and image.width() >= 800
    svg = export_plot(view.pareto_plot, tmp_path / "pareto.svg").read_text()
    assert "latency p50" in svg


def test_remove_asks_first_then_removes_from_table_and_workspace(view, built):
    root, ids = built
    questions: list[str] = []
    view.confirm = lambda question: questions.append(question) or False
    view.select_variant(ids["onnx"])
    assert view.remove_selected() == []
    assert ids["onnx"] in _table_ids(view)

    view.confirm = lambda question: questions.append(question) or True
    assert view.remove_selected() == [ids["onnx"]]
    assert "cannot be undone" in questions[-1]
    assert ids["onnx"] not in _table_ids(view) and len(_table_ids(view)) == 2
    assert ids["onnx"] not in {r["id"] for r in Workspace(root).list()}
    assert len(view.scatter.points()) == 2 and len(view.size_bars.opts["height"]) == 2
