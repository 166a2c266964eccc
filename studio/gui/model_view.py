"""The Model tab: the module tree of the open checkpoint, one tensor's histogram and statistics, and the
whole model's parameters by layer type and bytes by dtype.

The tree and the whole-model breakdown are built from tensor names and shapes only
(`studio.inspection.module_tree`; `LoadedModel.tensors()` reads headers), so they fill without touching
weights; the whole-model charts are `WholeModelPanel`. A tensor's statistics read that tensor alone, on a pool thread; when the
selection moves on before they arrive, the late result is dropped. For a workspace variant with quantized
layers, `QuantErrorPanel` compares each layer with the float checkpoint it came from (an error column in
the tree, and float vs dequantized histograms for the selected layer).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QModelIndex, QSettings, QSortFilterProxyModel, Qt, Signal
from PySide6.QtGui import QFont, QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QToolButton,
    QTreeView,
    QVBoxLayout,
    QWidget,
)

from studio.checkpoints.base import TensorRef
from studio.gui.document import StudioDocument
from studio.gui.quant_error_panel import ERROR_COLUMN, ERROR_TITLE, QuantErrorPanel
from studio.gui.whole_model_panel import WholeModelPanel
from studio.gui.widgets import (
    Banner,
    add_plot_export_action,
    add_table_export_action,
    fill_table,
    fmt,
    histogram_curve,
    human_count,
    make_table,
    plot_colors,
    run_task,
    style_legend,
    style_plot,
)
from studio.inspection.histogram import HistogramResult, compute_histogram
from studio.inspection.module_tree import Node, build_module_tree, whole_model_summary
from studio.inspection.stats import DEFAULT_BINS, OUTLIER_STD, tensor_bytes
from studio.units import human_bytes

TENSOR_ROLE = Qt.ItemDataRole.UserRole + 1  # full tensor name on tensor rows, "" on module rows
PATH_ROLE = Qt.ItemDataRole.UserRole + 2  # full dotted path (what the filter matches)

HINT = (
    "<b>Try this:</b> select a layer in the tree to see its weight histogram and statistics "
    "(tick <i>INT8 grid</i> to see how coarse 8-bit quantization is) · the <b>Heads</b> tab ranks attention "
    "heads (press <i>Compute</i>) and lets you switch heads off · the <b>Pipeline</b> tab has a starter "
    "pipeline to run."
)


# ------------------------------------------------------------------------------------------------ the view


PLACEHOLDER = (
    "Select a weight tensor in the tree to see its histogram and statistics.\n"
    "Large tensors are read in the background; the window stays responsive."
)


class TreeFilter(QSortFilterProxyModel):
    """Keeps rows whose full path contains every space-separated word (case-insensitive), and their parents."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self._words: list[str] = []
        self.setRecursiveFilteringEnabled(True)
        self.setAutoAcceptChildRows(True)

    def set_text(self, text: str) -> None:
        self.beginFilterChange()
        self._words = [w.lower() for w in text.split()]
        self.endFilterChange(QSortFilterProxyModel.Direction.Rows)

    def filterAcceptsRow(self, row: int, parent: QModelIndex) -> bool:
        if not self._words:
            return True
        index = self.sourceModel().index(row, 0, parent)
        path = str(index.data(PATH_ROLE) or "").lower()
        return all(w in path for w in self._words)


class ModelView(QWidget):
    """Layer tree + histogram + statistics + whole-model breakdown of `document.model`."""

    histogram_shown = Signal(str)  # tensor name, once its histogram is on screen
    selection_changed = Signal(str)  # tensor or module path

    def __init__(self, document: StudioDocument, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self._refs: dict[str, TensorRef] = {}
        self.error_cells: dict[str, QStandardItem] = {}  # module path -> its cell in the error column
        self._task = None
        self._cache: OrderedDict[tuple[str, int], HistogramResult] = OrderedDict()
        self.current: HistogramResult | None = None
        self.current_name = ""
        self._grid_in_legend = False
        self._summary_text = "No model open"
        self._build()
        self.whole.show_summary(whole_model_summary([]))
        document.model_changed.connect(self.on_model_changed)
        if document.model is not None:
            self.on_model_changed()

    # ---------------------------------------------------------------------------- layout

    def _build(self) -> None:
        self.hint = Banner("info")
        self.hint.label.setText(HINT)
        self.hint.label.setTextFormat(Qt.TextFormat.RichText)
        self.hint.closed.connect(lambda: QSettings().setValue("hint_dismissed", True))
        if not QSettings().value("hint_dismissed", False, type=bool):
            self.hint.show()

        # left: filter + tree
        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText('Filter layers (e.g. "layer.0 query")')
        self.filter_edit.setClearButtonEnabled(True)
        self.tree_model = QStandardItemModel(0, 5, self)
        self.tree_model.setHorizontalHeaderLabels(
            ["Layer / tensor", "Shape", "Parameters", "DType", ERROR_TITLE]
        )
        self.proxy = TreeFilter(self)
        self.proxy.setSourceModel(self.tree_model)
        self.tree = QTreeView()
        self.tree.setModel(self.proxy)
        self.tree.setUniformRowHeights(True)
        self.tree.setAlternatingRowColors(True)
        self.tree.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.tree.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = self.tree.header()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for col in (1, 2, 3, ERROR_COLUMN):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(False)
        self.tree.selectionModel().currentChanged.connect(self._on_current_changed)
        self.filter_edit.textChanged.connect(self._on_filter)
        self.tree_summary = QLabel("No model open")
        self.tree_summary.setWordWrap(True)
        left = QWidget()
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        lv.addWidget(self.filter_edit)
        lv.addWidget(self.tree, 1)
        lv.addWidget(self.tree_summary)

        # right top: histogram controls + plot
        self.bins_spin = QSpinBox()
        self.bins_spin.setRange(8, 2048)
        self.bins_spin.setValue(DEFAULT_BINS)
        self.bins_spin.setSuffix(" bins")
        self.bins_spin.setToolTip("Number of histogram bins between the tensor's min and max")
        self.bins_spin.setKeyboardTracking(False)
        self.log_check = QCheckBox("Log count axis")
        self.log_check.setToolTip("Show counts on a log scale: rare values (outliers) become visible")
        self.int8_check = QCheckBox("INT8 grid")
        self.int8_check.setToolTip(
            "Overlay symmetric per-tensor INT8 quantization: scale = max|x| / 127; the 255 levels are drawn "
            "as lines and the representable (clipping) range is shaded"
        )
        self.export_button = QToolButton()
        self.export_button.setText("Export…")
        self.export_button.setToolTip("Save the histogram as PNG or SVG")
        self.busy_label = QLabel("")
        controls = QHBoxLayout()
        controls.addWidget(self.bins_spin)
        controls.addWidget(self.log_check)
        controls.addWidget(self.int8_check)
        controls.addStretch(1)
        controls.addWidget(self.busy_label)
        controls.addWidget(self.export_button)

        self.plot = pg.PlotWidget()
        self._setup_histogram()
        self.export_action = add_plot_export_action(self.plot, self.plot, "histogram")
        self.export_button.clicked.connect(self.export_action.trigger)
        self.placeholder = QLabel(PLACEHOLDER)
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setWordWrap(True)
        font = QFont(self.placeholder.font())
        font.setPointSizeF(font.pointSizeF() * 1.15)
        self.placeholder.setFont(font)
        self.plot_stack = QStackedWidget()
        self.plot_stack.addWidget(self.placeholder)
        self.plot_stack.addWidget(self.plot)
        self.quant = QuantErrorPanel(self)
        self.plot_stack.addWidget(self.quant.plot)
        self.tree.setColumnHidden(ERROR_COLUMN, True)
        top = QWidget()
        tv = QVBoxLayout(top)
        tv.setContentsMargins(0, 0, 0, 0)
        tv.addLayout(controls)
        tv.addWidget(self.plot_stack, 1)

        # right bottom: stats table | whole-model panel
        self.stats_table = make_table(["Statistic", "Value"])
        self.stats_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.stats_table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        add_table_export_action(self.stats_table, "tensor-stats")
        self.whole = WholeModelPanel()
        self.type_table, self.dtype_table = self.whole.type_table, self.whole.dtype_table

        self.bottom_split = QSplitter(Qt.Orientation.Horizontal)
        self.bottom_split.addWidget(self.stats_table)
        self.bottom_split.addWidget(self.whole)
        self.bottom_split.setSizes([380, 450])
        self.right_split = QSplitter(Qt.Orientation.Vertical)
        self.right_split.addWidget(top)
        self.right_split.addWidget(self.bottom_split)
        self.right_split.setSizes([350, 320])
        self.main_split = QSplitter(Qt.Orientation.Horizontal)
        self.main_split.addWidget(left)
        self.main_split.addWidget(self.right_split)
        self.main_split.setSizes([520, 760])  # room for layer names beside four columns
        self.main_split.setStretchFactor(1, 1)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self.hint)
        layout.addWidget(self.main_split, 1)

        self.bins_spin.valueChanged.connect(lambda _v: self._on_bins())
        self.log_check.toggled.connect(self._on_log)
        self.int8_check.toggled.connect(lambda _on: self._draw_int8())

    def _setup_histogram(self) -> None:
        colors = plot_colors()
        item = self.plot.getPlotItem()
        item.setLabel("bottom", "weight value")
        item.setLabel("left", "count (values per bin)")
        item.getAxis("bottom").enableAutoSIPrefix(False)
        item.getAxis("left").enableAutoSIPrefix(False)
        item.showGrid(x=True, y=True, alpha=0.15)
        item.setTitle("Histogram")
        self.legend = item.addLegend(offset=(-10, 10), labelTextSize="9pt")
        style_legend(self.legend)
        self.hist_curve = histogram_curve(colors, "values per bin")
        item.addItem(self.hist_curve)
        mean_pen = pg.mkPen(colors["mean"], width=2)
        std_pen = pg.mkPen(colors["std"], width=1.5, style=Qt.PenStyle.DashLine)
        self.mean_line = pg.InfiniteLine(angle=90, movable=False, pen=mean_pen)
        self.std_lines = [pg.InfiniteLine(angle=90, movable=False, pen=std_pen) for _ in range(2)]
        for line in (self.mean_line, *self.std_lines):
            item.addItem(line, ignoreBounds=True)
        self.int8_band = pg.LinearRegionItem(
            values=(-1, 1), movable=False, brush=colors["band"], pen=pg.mkPen(colors["mask"], width=1)
        )
        self.int8_band.setZValue(-10)
        self.int8_grid = pg.PlotDataItem([], [], connect="pairs", pen=pg.mkPen(colors["grid"], width=1))
        item.addItem(self.int8_band, ignoreBounds=True)
        item.addItem(self.int8_grid, ignoreBounds=True)
        self.int8_band.hide()
        self.int8_grid.hide()
        # legend entries for the lines (InfiniteLine has no legend sample of its own)
        self._legend_mean = pg.PlotDataItem([], [], pen=mean_pen)
        self._legend_std = pg.PlotDataItem([], [], pen=std_pen)
        self._legend_grid = pg.PlotDataItem([], [], pen=pg.mkPen(colors["mask"], width=2))
        self.legend.addItem(self._legend_mean, "mean")
        self.legend.addItem(self._legend_std, "mean ± std")

    def apply_theme(self) -> None:
        colors = plot_colors()
        style_plot(self.plot)
        self.whole.apply_theme()
        self.hist_curve.setPen(pg.mkPen(colors["bars"], width=1))
        self.hist_curve.setBrush(colors["bars_fill"])
        self.quant.apply_theme()
        self.hint.restyle()

    # ---------------------------------------------------------------------------- model

    def on_model_changed(self) -> None:
        model = self.document.model
        self._cancel()
        self._cache.clear()
        self.current, self.current_name = None, ""
        self.tree_model.removeRows(0, self.tree_model.rowCount())
        self._refs = {}
        self.error_cells = {}
        self.placeholder.setText(PLACEHOLDER)  # not the old model's module any more
        self.plot_stack.setCurrentWidget(self.placeholder)
        self.stats_table.setRowCount(0)
        self.filter_edit.blockSignals(True)
        self.filter_edit.clear()  # a filter typed for the old model's names would hide the new tree
        self.filter_edit.blockSignals(False)
        if model is None:
            self.quant.model_changed()
            self.whole.show_summary(whole_model_summary([]))
            self._summary_text = "No model open"
            self.tree_summary.setText(self._summary_text)
            return
        refs = list(model.tensors())
        self._refs = {r.name: r for r in refs}
        root = build_module_tree(refs)
        for child in root.children.values():
            self._add_node(self.tree_model.invisibleRootItem(), child)
        self.tree.expandToDepth(0)
        self._on_filter(self.filter_edit.text())
        summary = whole_model_summary(refs)
        self.whole.show_summary(summary)
        dtypes = ", ".join(d for d, _ in summary["by_dtype"])
        self._summary_text = (
            f"{model.source}: {human_count(summary['params'])} parameters in {summary['tensors']} tensors · "
            f"{human_bytes(summary['bytes'])} ({dtypes}) · {model.family}, {model.format}"
        )
        self.tree_summary.setText(self._summary_text)
        self.quant.model_changed()

    def show_opening(self, source: str | None) -> None:
        """Say that `source` is being opened below the tree; None puts the open model's summary back."""
        self.tree_summary.setText(f"Opening {source}…" if source else self._summary_text)

    def _add_node(self, parent: QStandardItem, node: Node) -> None:
        name = QStandardItem(node.name)
        name.setData(node.ref.name if node.ref is not None else "", TENSOR_ROLE)
        name.setData(node.path, PATH_ROLE)
        name.setToolTip(node.path)
        shape = QStandardItem("×".join(str(s) for s in node.ref.shape) if node.ref is not None else "")
        params = QStandardItem(f"{node.params:,}")
        params.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        dtypes = node.dtypes
        dtype = QStandardItem(next(iter(dtypes)) if len(dtypes) == 1 else "mixed")
        if node.ref is None:
            bold = QFont(name.font())
            bold.setBold(True)
            name.setFont(bold)
        error = QStandardItem("")
        error.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.error_cells[node.path] = error
        parent.appendRow([name, shape, params, dtype, error])
        for child in node.children.values():
            self._add_node(name, child)

    # ---------------------------------------------------------------------------- selection

    def _on_filter(self, text: str) -> None:
        self.proxy.set_text(text)
        if text.strip():
            self.tree.expandAll()
        if text.strip() and self.proxy.rowCount() == 0 and self.tree_model.rowCount() > 0:
            self.tree_summary.setText(
                f"No layer or tensor matches “{text.strip()}”: clear the filter to see all."
            )
        else:
            self.tree_summary.setText(self._summary_text)

    def _on_current_changed(self, current: QModelIndex, _previous: QModelIndex) -> None:
        index = self.proxy.mapToSource(current.siblingAtColumn(0))
        if not index.isValid():
            return
        tensor = str(index.data(TENSOR_ROLE) or "")
        path = str(index.data(PATH_ROLE) or "")
        self.selection_changed.emit(tensor or path)
        self._cancel()
        if self.quant.show(tensor or path):  # a quantized layer of a variant: float vs dequantized
            self.current, self.current_name = None, ""
        elif tensor:
            self.current_name = tensor
            self._request()
        else:
            self._show_module(index)

    def select_tensor(self, name: str) -> bool:
        """Select `name` in the tree (clearing a filter that hides it); False when there is no such tensor."""
        return name in self._refs and self.select_path(name, tensor=True)

    def select_path(self, path: str, *, tensor: bool = False) -> bool:
        """Select the module or tensor row `path` (only a tensor's row with `tensor`), clearing a filter
        that hides it; False when the tree has no such row."""
        source = self._find(path, tensor)
        if source is None:
            return False
        proxy = self.proxy.mapFromSource(source)
        if not proxy.isValid():
            self.filter_edit.clear()
            proxy = self.proxy.mapFromSource(source)
        self.tree.scrollTo(proxy)
        self.tree.setCurrentIndex(proxy)
        return True

    def _find(self, name: str, tensor: bool = True) -> QModelIndex | None:
        stack = [self.tree_model.index(r, 0) for r in range(self.tree_model.rowCount())]
        while stack:
            index = stack.pop()
            if index.data(TENSOR_ROLE) == name or (not tensor and index.data(PATH_ROLE) == name):
                return index
            if name.startswith(str(index.data(PATH_ROLE)) + "."):
                stack.extend(
                    self.tree_model.index(r, 0, index) for r in range(self.tree_model.rowCount(index))
                )
        return None

    def selected_path(self) -> str:
        """The tensor (or module) selected in the tree; "" when nothing is."""
        index = self.proxy.mapToSource(self.tree.currentIndex().siblingAtColumn(0))
        if not index.isValid():
            return ""
        return str(index.data(TENSOR_ROLE) or "") or str(index.data(PATH_ROLE) or "")

    def show_page(self, widget: QWidget) -> None:
        self.plot_stack.setCurrentWidget(widget)

    def show_message(self, text: str) -> None:
        self.placeholder.setText(text)
        self.plot_stack.setCurrentWidget(self.placeholder)

    def _show_module(self, index: QModelIndex) -> None:
        self._cancel()
        self.current, self.current_name = None, ""
        path = str(index.data(PATH_ROLE))
        refs = [r for n, r in self._refs.items() if n == path or n.startswith(path + ".")]
        params = sum(r.numel for r in refs)
        dtypes = sorted({r.dtype for r in refs})
        fill_table(
            self.stats_table,
            [
                ("module", path),
                ("tensors", len(refs)),
                ("parameters", f"{params:,}"),
                ("bytes", human_bytes(sum(tensor_bytes(r) for r in refs))),
                ("dtype", ", ".join(dtypes)),
            ],
        )
        self.placeholder.setText(
            f"{path}: a module with {len(refs)} tensors ({human_count(params)} parameters).\n"
            "Select one of its tensors (the leaves) to see a histogram."
        )
        self.plot_stack.setCurrentWidget(self.placeholder)

    # ---------------------------------------------------------------------------- statistics (off-thread)

    def cancel(self) -> None:
        """Esc: stop waiting for the histogram being read (its result will be ignored)."""
        self._cancel()

    def _cancel(self) -> None:
        self.quant.cancel()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.busy_label.setText("")

    def _request(self) -> None:
        name = self.current_name
        if not name or name not in self._refs:
            return
        self._cancel()
        bins = self.bins_spin.value()
        cached = self._cache.get((name, bins))
        if cached is not None:
            self._show(cached)
            return
        ref = self._refs[name]
        self.busy_label.setText(f"reading {ref.name} ({human_count(ref.numel)} values)…")
        self._task = run_task(
            lambda: compute_histogram(ref, bins), on_done=self._on_stats, on_error=self._on_stats_error
        )

    def _on_stats(self, token: int, result: HistogramResult) -> None:
        if self._task is None or token != self._task.token:
            return  # the selection or the bins changed while this was computed
        self._task = None
        self.busy_label.setText("")
        key = (result.stats.name, len(result.stats.counts))
        self._cache[key] = result
        while len(self._cache) > 64:
            self._cache.popitem(last=False)
        self._show(result)

    def _on_stats_error(self, token: int, message: str) -> None:
        if self._task is None or token != self._task.token:
            return
        self._task = None
        self.busy_label.setText("")
        self.placeholder.setText(f"Cannot read {self.current_name}:\n{message}")
        self.plot_stack.setCurrentWidget(self.placeholder)
        self.document.status.emit(f"cannot read {self.current_name}: {message}")

    def _show(self, result: HistogramResult) -> None:
        self.current = result
        s = result.stats
        item = self.plot.getPlotItem()
        if not s.counts:
            self.placeholder.setText(f"{s.name} has no finite values to plot.")
            self.plot_stack.setCurrentWidget(self.placeholder)
        else:
            self.plot_stack.setCurrentWidget(self.plot)
            self.hist_curve.setData(np.asarray(s.edges), np.asarray(s.counts, dtype=float))
            self.hist_curve.setFillLevel(-0.3 if self.log_check.isChecked() else 0)
            self.mean_line.setValue(s.mean)
            self.std_lines[0].setValue(s.mean - s.std)
            self.std_lines[1].setValue(s.mean + s.std)
            item.setTitle(f"{s.name}: {s.params:,} values in {len(s.counts)} bins")
            self._fit_range()
            self._draw_int8()
        shape = "×".join(str(d) for d in s.shape) or "scalar"
        rows = [
            ("tensor", s.name),
            ("shape", shape),
            ("dtype", s.dtype),
            ("parameters", f"{s.params:,}"),
            ("min", fmt(s.min)),
            ("max", fmt(s.max)),
            ("mean", fmt(s.mean)),
            ("std", fmt(s.std)),
            ("sparsity (exact zeros)", f"{100 * s.sparsity:.3g} %"),
            (f"outliers (|x − mean| > {OUTLIER_STD:g} std)", f"{100 * s.outliers:.3g} %"),
        ]
        if s.nonfinite:
            rows.append(("non-finite values", f"{s.nonfinite:,}"))
        if result.int8_scale is not None:
            rows += [
                ("INT8 scale (max|x| / 127)", fmt(result.int8_scale)),
                ("INT8 levels used", f"{result.int8_levels_used} of 255"),
                ("INT8 round-trip RMS error", fmt(result.int8_rmse)),
            ]
        fill_table(self.stats_table, rows)
        self.histogram_shown.emit(s.name)

    def _on_bins(self) -> None:
        if self.plot_stack.currentWidget() is self.quant.plot and self.quant.current_layer:
            self.quant.show(self.quant.current_layer)
        else:
            self._request()

    def _on_log(self, on: bool) -> None:
        item = self.plot.getPlotItem()
        item.setLogMode(x=False, y=on)
        item.setLabel("left", "count (values per bin, log scale)" if on else "count (values per bin)")
        self.hist_curve.setFillLevel(-0.3 if on else 0)
        self._draw_int8()
        self._fit_range()
        self.quant.redraw()

    def _fit_range(self) -> None:
        """The whole histogram with headroom above its peak, where the legend (top right) sits; on a log
        axis the tails reach up the plot, so the headroom is a decade there."""
        item = self.plot.getPlotItem()
        result = self.current
        if result is None or not result.stats.counts:
            item.enableAutoRange()
            return
        edges, peak = result.stats.edges, max(result.stats.counts) or 1
        if self.log_check.isChecked():
            y_range = (math.log10(0.5), math.log10(peak) + 1.0)
        else:
            y_range = (0.0, peak * 1.4)
        item.getViewBox().setRange(xRange=(float(edges[0]), float(edges[-1])), yRange=y_range, padding=0.02)

    def _draw_int8(self) -> None:
        result = self.current
        on = self.int8_check.isChecked() and result is not None and result.int8_scale is not None
        self.int8_band.setVisible(on)
        self.int8_grid.setVisible(on)
        if self._grid_in_legend:
            self.legend.removeItem(self._legend_grid)
            self._grid_in_legend = False
        if not on or result is None or result.int8_scale is None:
            return
        scale = result.int8_scale
        self.int8_band.setRegion((-127 * scale, 127 * scale))
        top = max(result.stats.counts) * 1.05
        bottom = 0.5 if self.log_check.isChecked() else 0.0
        levels = np.arange(-127, 128) * scale
        xs = np.repeat(levels, 2)
        ys = np.tile([bottom, top], len(levels))
        self.int8_grid.setData(xs, ys)
        self.legend.addItem(self._legend_grid, f"INT8 levels (step {scale:.3g}) and range")
        self._grid_in_legend = True

    # ---------------------------------------------------------------------------- state

    def save_state(self, settings: QSettings) -> None:
        settings.setValue("model_view/main_split", self.main_split.saveState())
        settings.setValue("model_view/right_split", self.right_split.saveState())
        settings.setValue("model_view/bottom_split", self.bottom_split.saveState())
        settings.setValue("model_view/bins", self.bins_spin.value())
        settings.setValue("model_view/log", self.log_check.isChecked())

    def restore_state(self, settings: QSettings) -> None:
        for key, split in (
            ("main_split", self.main_split),
            ("right_split", self.right_split),
            ("bottom_split", self.bottom_split),
        ):
            value = settings.value(f"model_view/{key}")
            if value is not None:
                split.restoreState(value)
        bins = settings.value("model_view/bins")
        if bins is not None:
            self.bins_spin.setValue(int(bins))
        self.log_check.setChecked(settings.value("model_view/log", False, type=bool))

    def shutdown(self) -> None:
        self._cancel()
        self.quant.shutdown()
