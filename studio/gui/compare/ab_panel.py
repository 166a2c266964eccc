"""The Compare tab's A/B panel: pick two variants (or select two rows), and see their metrics side by side
with ratios and latency significance, a histogram overlay of one layer in A and B, and the examples where
they disagree most.

A comparison loads both models and runs them (`studio.ab_session`), so it runs on a pool thread and only the
newest comparison's result is shown; a layer's histogram is read on demand, the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import QSettings, Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from studio.ab_session import ABSession, Overlay, open_session
from studio.gui.document import StudioDocument
from studio.gui.widgets import (
    add_plot_export_action,
    add_table_export_action,
    fill_table,
    fmt,
    make_table,
    plot_colors,
    run_task,
    style_legend,
    style_plot,
    work_pool,
)


def _elide(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def metric_title(name: str) -> str:
    """'latency_ms.b1.p50' -> 'latency b1 p50 (ms)'; the dotted names come from studio.compare."""
    if name == "size_mb":
        return "size (MB)"
    if name == "peak_memory_mb":
        return "peak memory (MB)"
    parts = name.split(".")
    if parts[0] == "latency_ms" and len(parts) == 3:
        return f"latency {parts[1]} {parts[2]} (ms)"
    if parts[0] == "throughput_per_s" and len(parts) == 2:
        return f"throughput {parts[1]} (/s)"
    if parts[0] == "quality":
        return "quality: " + ".".join(parts[1:]).replace("_", " ")
    if name == "kv_cache_mb":
        return "KV cache (MB)"
    generation = {"ttft_ms": "time to first token", "tpot_ms": "time per output token"}
    if parts[0] in generation and len(parts) == 3:
        return f"{generation[parts[0]]} {parts[1]} {parts[2]} (ms)"
    if parts[0] == "decode_tokens_per_s" and len(parts) == 2:
        return f"decode {parts[1]} (tokens/s)"
    return name


def significance_text(sig: dict[str, Any]) -> str:
    speedup = sig.get("speedup_b_over_a")
    p = sig.get("permutation_p")
    p_text = f" (p={p:.2g})" if isinstance(p, float) else ""
    if not sig.get("significant"):
        why = "CIs overlap" if sig.get("ci_overlap") else "permutation test"
        return f"no — {why}{p_text}"
    if speedup is None:
        return f"yes{p_text}"
    faster = f"B {speedup:.3g}× faster" if speedup >= 1 else f"B {1 / speedup:.3g}× slower"
    return f"yes — {faster}{p_text}"


class ABPanel(QWidget):
    """A and B pickers, the metrics table, the layer histogram overlay and the disagreements table."""

    compare_started = Signal(str, str)
    compare_finished = Signal(str, str)  # A, B ids, once their comparison is on screen
    compare_failed = Signal(str)
    histogram_shown = Signal(str)  # layer name

    def __init__(
        self,
        document: StudioDocument,
        label_of: Callable[[dict[str, Any]], str],
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.document = document
        self.label_of = label_of  # a row's name, as the table shows it
        self.rows: list[dict[str, Any]] = []
        self.ab: ABSession | None = None
        self.overlay: Overlay | None = None
        self._compare_task: Any = None
        self._hist_task: Any = None
        self._build()

    def _build(self) -> None:
        self.a_combo = QComboBox()
        self.b_combo = QComboBox()
        for combo, which in ((self.a_combo, "A"), (self.b_combo, "B")):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
            combo.setMinimumContentsLength(14)
            combo.setToolTip(f"Variant {which} (or select two rows in the table)")
        self.swap_button = QToolButton()
        self.swap_button.setText("⇄")
        self.swap_button.setToolTip("Swap A and B")
        self.swap_button.clicked.connect(self._swap)
        self.examples_spin = QSpinBox()
        self.examples_spin.setRange(0, 1024)
        self.examples_spin.setValue(32)
        self.examples_spin.setPrefix("examples: ")
        self.examples_spin.setToolTip(
            "How many evaluation examples A and B both run on to find where they disagree (0: skip)"
        )
        self.compare_button = QPushButton("Compare")
        self.compare_button.setToolTip("Load A and B, compare their metrics, weights and outputs")
        self.compare_button.clicked.connect(self.compare_ab)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setMaximumWidth(160)
        self.progress.setTextVisible(False)
        self.progress.hide()
        self.ab_status = QLabel("Select two rows in the table, or pick A and B here and press Compare.")
        self.ab_status.setWordWrap(True)
        top = QHBoxLayout()
        top.addWidget(QLabel("A:"))
        top.addWidget(self.a_combo)
        top.addWidget(self.swap_button)
        top.addWidget(QLabel("B:"))
        top.addWidget(self.b_combo)
        top.addWidget(self.examples_spin)
        top.addWidget(self.compare_button)
        top.addWidget(self.cancel_button)
        top.addWidget(self.progress)
        top.addStretch(1)
        # the status gets a full-width line of its own (beside the controls it wrapped into a narrow column)
        self.ab_status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.metrics_table = make_table(["Metric", "A", "B", "B / A", "Better", "Significant?"])
        header = self.metrics_table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        # "Significant?" takes the space that is left (its text elided, whole in the tooltip), so it is in
        # view instead of past the right edge
        header.setSectionResizeMode(5, QHeaderView.ResizeMode.Stretch)
        header.setStretchLastSection(True)
        self.metrics_table.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.metrics_table.horizontalHeaderItem(3).setToolTip("Ratio of B's value to A's")
        self.metrics_table.horizontalHeaderItem(4).setToolTip(
            "Which one is better on this metric (lower latency, size and memory; higher quality); = when equal"
        )
        self.metrics_table.horizontalHeaderItem(5).setToolTip(
            "Latency medians: non-overlapping 95% bootstrap CIs, confirmed by a permutation test"
        )
        add_table_export_action(self.metrics_table, "ab-metrics")

        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip(
            "Layers present in both, most changed first (relative L2 change of B against A)"
        )
        self.layer_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.layer_combo.setMinimumContentsLength(20)
        self.layer_combo.currentIndexChanged.connect(lambda _i: self._request_histogram())
        self.hist_export_button = QToolButton()
        self.hist_export_button.setText("Export…")
        self.hist_export_button.setToolTip("Save the histogram overlay as PNG or SVG")
        self.hist_plot = pg.PlotWidget()
        self._setup_hist()
        # while a layer is read there is nothing to plot: say so instead of an empty -0.4..0.4 count axis
        self.hist_placeholder = QLabel("Compare two variants to see their weights side by side.")
        self.hist_placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.hist_placeholder.setWordWrap(True)
        self.hist_stack = QStackedWidget()
        self.hist_stack.addWidget(self.hist_placeholder)
        self.hist_stack.addWidget(self.hist_plot)
        hist_action = add_plot_export_action(self.hist_plot, self.hist_plot, "ab-histogram")
        self.hist_export_button.clicked.connect(hist_action.trigger)
        self.layer_info = QLabel("")
        self.layer_info.setWordWrap(True)
        hist_bar = QHBoxLayout()
        hist_bar.addWidget(QLabel("Layer:"))
        hist_bar.addWidget(self.layer_combo, 1)
        hist_bar.addWidget(self.hist_export_button)
        hist_box = QWidget()
        hv = QVBoxLayout(hist_box)
        hv.setContentsMargins(0, 0, 0, 0)
        hv.addLayout(hist_bar)
        hv.addWidget(self.hist_stack, 1)
        hv.addWidget(self.layer_info)

        self.disagreements_table = make_table(["#", "Agreement", "Example", "Detail"])
        self.disagreements_table.horizontalHeaderItem(1).setToolTip(
            "How much A and B agree on this example (cosine of outputs, or agreement); lowest first"
        )
        self.disagreements_table.horizontalHeader().setSectionResizeMode(
            0, QHeaderView.ResizeMode.ResizeToContents
        )
        self.disagreements_table.horizontalHeader().setSectionResizeMode(
            1, QHeaderView.ResizeMode.ResizeToContents
        )
        self.disagreements_table.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.disagreements_table.horizontalHeader().setSectionResizeMode(
            3, QHeaderView.ResizeMode.ResizeToContents
        )
        self.disagreements_table.horizontalHeader().setStretchLastSection(False)
        self.disagreements_table.setTextElideMode(Qt.TextElideMode.ElideRight)
        add_table_export_action(self.disagreements_table, "ab-disagreements")
        dis_box = QWidget()
        dv = QVBoxLayout(dis_box)
        dv.setContentsMargins(0, 0, 0, 0)
        self.disagreements_label = QLabel("Examples where A and B disagree most")
        dv.addWidget(self.disagreements_label)
        dv.addWidget(self.disagreements_table, 1)

        self.ab_right = QSplitter(Qt.Orientation.Vertical)
        self.ab_right.addWidget(hist_box)
        self.ab_right.addWidget(dis_box)
        self.ab_right.setSizes([300, 190])
        self.ab_split = QSplitter(Qt.Orientation.Horizontal)
        self.ab_split.addWidget(self.metrics_table)
        self.ab_split.addWidget(self.ab_right)
        self.ab_split.setSizes([720, 540])

        v = QVBoxLayout(self)
        v.setContentsMargins(4, 4, 4, 4)
        v.addLayout(top)
        v.addWidget(self.ab_status)
        v.addWidget(self.ab_split, 1)

    def _setup_hist(self) -> None:
        colors = plot_colors()
        item = self.hist_plot.getPlotItem()
        item.setTitle("Weights of A and B")
        item.setLabel("bottom", "weight value")
        item.setLabel("left", "count (values per bin)")
        item.showGrid(x=True, y=True, alpha=0.15)
        for name in ("left", "bottom"):
            item.getAxis(name).enableAutoSIPrefix(False)
        # below the plot, outside the data: the pane is narrow, and inside the plot the two variant names
        # (each as long as its steps) covered the top of the histograms
        self.hist_legend = pg.LegendItem(labelTextSize="9pt", colCount=1)
        item.layout.addItem(self.hist_legend, 4, 1)  # the row under the bottom axis, the plot's column
        a_fill, b_fill = QColor(colors["bars"]), QColor(colors["mean"])
        a_fill.setAlpha(70)
        b_fill.setAlpha(70)
        self.hist_a = pg.PlotDataItem(
            [0.0, 1.0],
            [0],
            stepMode="center",
            fillLevel=0,
            pen=pg.mkPen(colors["bars"], width=1.5),
            brush=a_fill,
            name="A",
        )
        self.hist_b = pg.PlotDataItem(
            [0.0, 1.0],
            [0],
            stepMode="center",
            fillLevel=0,
            pen=pg.mkPen(colors["mean"], width=1.5),
            brush=b_fill,
            name="B",
        )
        item.addItem(self.hist_a)
        item.addItem(self.hist_b)
        style_legend(self.hist_legend)

    def apply_theme(self) -> None:
        colors = plot_colors()
        style_plot(self.hist_plot)
        self.hist_a.setPen(pg.mkPen(colors["bars"], width=1.5))
        self.hist_b.setPen(pg.mkPen(colors["mean"], width=1.5))

    def set_rows(self, rows: list[dict[str, Any]]) -> None:
        """The workspace's rows, re-read: refill the pickers, and clear a comparison whose variant is gone."""
        self.rows = rows
        self._fill_combos()
        if self.ab is not None and not {self.ab.a["id"], self.ab.b["id"]} <= {r["id"] for r in rows}:
            self._clear_ab("A variant of the comparison was removed.")

    def _fill_combos(self) -> None:
        for combo in (self.a_combo, self.b_combo):
            current = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            for row in self.rows:
                combo.addItem(self.label_of(row), row["id"])
                combo.setItemData(combo.count() - 1, row["id"], Qt.ItemDataRole.ToolTipRole)
            index = combo.findData(current)
            combo.setCurrentIndex(index if index >= 0 else -1)
            combo.blockSignals(False)
        if self.a_combo.currentIndex() < 0 and len(self.rows) >= 2:
            self.a_combo.setCurrentIndex(0)
            self.b_combo.setCurrentIndex(len(self.rows) - 1)
        self.compare_button.setEnabled(len(self.rows) >= 2)

    def set_ab(self, a: str, b: str) -> None:
        for combo, vid in ((self.a_combo, a), (self.b_combo, b)):
            index = combo.findData(vid)
            if index >= 0:
                combo.setCurrentIndex(index)

    def _swap(self) -> None:
        a, b = self.a_combo.currentData(), self.b_combo.currentData()
        if a and b:
            self.set_ab(b, a)

    def compare_ab(self) -> None:
        """Compare the A and B picked, off the GUI thread; a newer comparison replaces an older one."""
        a, b = self.a_combo.currentData(), self.b_combo.currentData()
        if not a or not b:
            self.ab_status.setText("Pick two variants (A and B).")
            return
        if a == b:
            self.ab_status.setText("A and B are the same variant: pick two different ones.")
            return
        self._cancel_compare()
        workspace, examples = self.document.workspace, self.examples_spin.value()
        self.progress.setValue(0)
        self.progress.show()
        self.cancel_button.setEnabled(True)
        self.ab_status.setText("Comparing…")
        self._compare_task = run_task(
            lambda progress: open_session(workspace, a, b, examples, progress),
            on_done=self._on_compared,
            on_error=self._on_compare_error,
            on_progress=self._on_compare_progress,
            pool=work_pool(),
        )
        self.compare_started.emit(a, b)

    def _on_compare_progress(self, token: int, fraction: float, message: str) -> None:
        if self._compare_task is None or token != self._compare_task.token:
            return
        self.progress.setValue(int(fraction * 1000))
        self.ab_status.setText(message)

    def _on_compared(self, token: int, result: ABSession) -> None:
        if self._compare_task is None or token != self._compare_task.token:
            return  # a newer comparison was started, or this one was cancelled
        self._compare_task = None
        self._end_compare()
        self.ab = result
        self._show_ab(result)
        self.compare_finished.emit(result.a["id"], result.b["id"])

    def _on_compare_error(self, token: int, message: str) -> None:
        if self._compare_task is None or token != self._compare_task.token:
            return
        self._compare_task = None
        self._end_compare()
        self.ab_status.setText(f"The comparison failed: {message}")
        self.compare_failed.emit(message)

    def _end_compare(self) -> None:
        self.progress.hide()
        self.cancel_button.setEnabled(False)

    def _cancel_compare(self) -> None:
        if self._compare_task is not None:
            self._compare_task.cancel()
            self._compare_task = None
        self._end_compare()

    def cancel(self) -> None:
        """Esc: stop waiting for the comparison and the histogram (late results are ignored)."""
        running = self._compare_task is not None
        self._cancel_compare()
        if self._hist_task is not None:
            self._hist_task.cancel()
            self._hist_task = None
        if running:
            self.ab_status.setText("Cancelled.")

    def _clear_ab(self, message: str) -> None:
        self.ab = None
        self.overlay = None
        self.metrics_table.setRowCount(0)
        self.disagreements_table.setRowCount(0)
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.blockSignals(False)
        self.hist_a.setData([0.0, 1.0], [0])
        self.hist_b.setData([0.0, 1.0], [0])
        self.hist_placeholder.setText("Compare two variants to see their weights side by side.")
        self.hist_stack.setCurrentWidget(self.hist_placeholder)
        self.layer_info.setText("")
        self.ab_status.setText(message)

    def _show_ab(self, result: ABSession) -> None:
        data = result.compare
        la, lb = self.label_of(result.a), self.label_of(result.b)
        sig = data.get("latency_significance", {})
        rows = []
        for m in data.get("metrics", []):
            name = m["metric"]
            significance = ""
            parts = name.split(".")
            if parts[0] == "latency_ms" and len(parts) == 3 and parts[2] == "p50":
                s = sig.get(parts[1].lstrip("b"))
                significance = significance_text(s) if s else ""
            ratio = m.get("ratio_b_over_a")
            better = m.get("better") or "="  # the headers name A and B
            if m.get("a") is None or m.get("b") is None:
                better = ""
            rows.append(
                (
                    metric_title(name),
                    fmt(m.get("a"), ".6g"),
                    fmt(m.get("b"), ".6g"),
                    f"{ratio:.4g}×" if isinstance(ratio, float) else "—",
                    better,
                    significance,
                )
            )
        fill_table(self.metrics_table, rows)
        for r, m in enumerate(data.get("metrics", [])):
            item = self.metrics_table.item(r, 5)
            parts = m["metric"].split(".")
            s = sig.get(parts[1].lstrip("b")) if parts[0] == "latency_ms" and len(parts) == 3 else None
            if item is not None and s:
                item.setToolTip(f"{item.text()}\n{s.get('method', '')}")  # the column may elide the text
        # long variant names are cut in the headers (whole in the tooltip and the combos above), so the
        # ratio and significance columns stay in view
        self.metrics_table.setHorizontalHeaderLabels(
            ["Metric", f"A: {_elide(la, 16)}", f"B: {_elide(lb, 16)}", "B / A", "Better", "Significant?"]
        )
        for column, full in ((1, la), (2, lb)):
            self.metrics_table.horizontalHeaderItem(column).setToolTip(full)

        worst = data.get("disagreements") or []
        fill_table(
            self.disagreements_table,
            [
                (w.get("index", ""), fmt(w.get("score"), ".6g"), w.get("text", ""), w.get("detail", ""))
                for w in worst
            ],
            align_right_from=0,
        )
        for r in range(self.disagreements_table.rowCount()):
            for c in (2, 3):
                item = self.disagreements_table.item(r, c)
                if item is not None:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
        ran = data.get("disagreements_data") or {}
        self.disagreements_label.setText(
            f"Examples where A and B disagree most ({ran.get('examples')} of {ran.get('data')} run)"
            if ran
            else "Examples where A and B disagree most (none run: examples = 0)"
        )

        weights = data.get("weights") or {}
        layers = weights.get("layers") or []
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        for layer in layers:
            if layer.get("change") == "shape":
                text = f"{layer['name']}  (shape {layer['shape_a']} → {layer['shape_b']})"
            else:
                text = f"{layer['name']}  (rel. L2 {fmt(layer.get('relative_l2'), '.3g')})"
            self.layer_combo.addItem(text, layer["name"])
        self.layer_combo.blockSignals(False)
        only = len(weights.get("only_a") or []) + len(weights.get("only_b") or [])
        self.ab_status.setText(
            f"A: {la} · B: {lb} · {weights.get('matched', 0)} tensors matched by name"
            + (f", {only} in one only" if only else "")
        )
        self.hist_legend.clear()
        self.hist_legend.addItem(self.hist_a, f"A: {la}")
        self.hist_legend.addItem(self.hist_b, f"B: {lb}")
        style_legend(self.hist_legend)
        if layers:
            first = next((i for i, x in enumerate(layers) if x.get("change") == "values"), 0)
            if self.layer_combo.currentIndex() != first:
                self.layer_combo.setCurrentIndex(first)
            else:
                self._request_histogram()
        else:
            self.layer_info.setText("No layer is present in both (by name): nothing to overlay.")

    def select_layer(self, name: str) -> bool:
        index = self.layer_combo.findData(name)
        if index < 0:
            return False
        if index == self.layer_combo.currentIndex():
            self._request_histogram()
        else:
            self.layer_combo.setCurrentIndex(index)
        return True

    def _request_histogram(self) -> None:
        if self._hist_task is not None:
            self._hist_task.cancel()
            self._hist_task = None
        ab, name = self.ab, self.layer_combo.currentData()
        if ab is None or not name:
            return
        ref_a, ref_b = ab.refs_a.get(name), ab.refs_b.get(name)
        if ref_a is None or ref_b is None:
            self.layer_info.setText(f"{name} cannot be read from both artifacts.")
            return
        self.layer_info.setText(f"reading {name}…")
        self.hist_placeholder.setText(f"Reading {name} from A and B…")
        self.hist_stack.setCurrentWidget(self.hist_placeholder)
        self._hist_task = run_task(
            lambda: ab.overlay(name),
            on_done=self._on_histogram,
            on_error=self._on_histogram_error,
            pool=work_pool(),
        )

    def _on_histogram(self, token: int, overlay: Overlay) -> None:
        if self._hist_task is None or token != self._hist_task.token:
            return
        self._hist_task = None
        self.overlay = overlay
        self.hist_stack.setCurrentWidget(self.hist_plot)
        self.hist_a.setData(overlay.edges, overlay.counts_a.astype(float))
        self.hist_b.setData(overlay.edges, overlay.counts_b.astype(float))
        item = self.hist_plot.getPlotItem()
        item.setTitle(overlay.name)
        peak = float(max(overlay.counts_a.max(initial=0), overlay.counts_b.max(initial=0)) or 1)
        item.getViewBox().setRange(
            xRange=(float(overlay.edges[0]), float(overlay.edges[-1])), yRange=(0, peak * 1.08), padding=0.02
        )
        layer = (
            next(
                (
                    x
                    for x in (self.ab.compare.get("weights") or {}).get("layers", [])
                    if x["name"] == overlay.name
                ),
                {},
            )
            if self.ab is not None
            else {}
        )
        sa, sb = overlay.stats_a, overlay.stats_b
        parts = []
        if layer.get("relative_l2") is not None:
            parts.append(f"relative L2 change {layer['relative_l2']:.3g}")
            parts.append(f"max |B − A| {fmt(layer.get('max_abs'), '.3g')}")
            parts.append(f"{100 * layer.get('changed_share', 0):.3g} % of values changed")
        parts.append(f"zeros A {100 * sa.sparsity:.3g} % → B {100 * sb.sparsity:.3g} %")
        parts.append(f"dtype {sa.dtype} → {sb.dtype}")
        self.layer_info.setText(" · ".join(parts))
        self.histogram_shown.emit(overlay.name)

    def _on_histogram_error(self, token: int, message: str) -> None:
        if self._hist_task is None or token != self._hist_task.token:
            return
        self._hist_task = None
        self.layer_info.setText(f"Cannot read the layer: {message}")
        self.hist_placeholder.setText(f"Cannot read the layer: {message}")

    def save_state(self, settings: QSettings) -> None:
        settings.setValue("compare_view/ab_split", self.ab_split.saveState())
        settings.setValue("compare_view/examples", self.examples_spin.value())

    def restore_state(self, settings: QSettings) -> None:
        value = settings.value("compare_view/ab_split")
        if value is not None:
            self.ab_split.restoreState(value)
        examples = settings.value("compare_view/examples")
        if examples is not None:
            self.examples_spin.setValue(int(examples))
