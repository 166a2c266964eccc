"""The Compare tab: every variant of the workspace in one sortable table, bar charts of latency, size and
quality, a latency / quality Pareto scatter, and an A/B comparison of two variants.

The table and the plots are views of the same list (`Workspace.list()`), re-read when the document says
the workspace changed. Selection is shared: a row selected in the table is ringed in the scatter and
its bars are tinted; a point clicked in the scatter selects its row. Two selected rows (or the A and B
pickers) start an A/B comparison, which loads both models and runs them, so it runs on a pool thread and
only the newest comparison's result is shown.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import (
    QAbstractTableModel,
    QItemSelection,
    QItemSelectionModel,
    QModelIndex,
    QPersistentModelIndex,
    QSettings,
    QSortFilterProxyModel,
    Qt,
    Signal,
)
from PySide6.QtGui import QAction, QBrush, QColor, QFont
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QTableView,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from studio.gui.document import StudioDocument
from studio.gui.widgets import (
    Banner,
    add_plot_export_action,
    add_table_export_action,
    export_plot,
    fill_table,
    fmt,
    make_table,
    plot_colors,
    run_task,
    style_legend,
    style_plot,
    work_pool,
)
from studio.variant_rows import (
    label,
    metric_name,
    model_names,
    model_of,
    pareto_fronts,
    quality_metric,
    quality_score,
    row_label,
)

EMPTY_MESSAGE = "No variants yet — build a pipeline in the Pipeline tab and press Run"
SORT_ROLE = Qt.ItemDataRole.UserRole + 1  # number (or casefolded text) the proxy sorts by
ID_ROLE = Qt.ItemDataRole.UserRole + 2  # the variant id of the row
CSV_ROLE = Qt.ItemDataRole.UserRole + 3  # full-precision value written to CSV
HIST_BINS = 96


# ------------------------------------------------------------------------------------------------ rows


def _latency(row: dict[str, Any], batch: str, key: str = "p50") -> float | None:
    value = (row["metrics"].get("latency_ms") or {}).get(str(batch), {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _throughput(row: dict[str, Any], batch: str) -> float | None:
    value = (row["metrics"].get("throughput_per_s") or {}).get(str(batch))
    if value is None:
        value = (row["metrics"].get("latency_ms") or {}).get(str(batch), {}).get("throughput_per_s")
    return float(value) if isinstance(value, (int, float)) else None


def _size_mb(row: dict[str, Any]) -> float | None:
    value = row["metrics"].get("size_bytes")
    return value / 1e6 if isinstance(value, (int, float)) else None


def _quality(row: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[str, float | None]:
    return quality_score(row, rows)


def _steps(row: dict[str, Any]) -> list[dict[str, Any]]:
    return list((row.get("recipe") or {}).get("steps") or [])


def steps_text(row: dict[str, Any]) -> str:
    if row["kind"] == "baseline":
        return "—"
    return " → ".join(s["technique"] for s in _steps(row)) or "(no steps)"


def batch_sizes(rows: Sequence[dict[str, Any]]) -> list[str]:
    found = {str(b) for r in rows for b in (r["metrics"].get("latency_ms") or {})}
    return sorted(found, key=lambda b: int(b) if b.isdigit() else 1 << 30)


def tick_label(row: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """Two short lines for a bar's x-axis tick: the id's tail, then the steps ("original", its model)."""
    text = row_label(row, names)
    if row["kind"] == "baseline":
        return text.replace(" ", "\n", 1)
    head, _, tail = text.partition(" ")
    if len(tail) > 18:
        tail = tail[:17] + "…"
    return f"{head}\n{tail}" if tail else head


def quality_axis_label(keys: Sequence[str]) -> str:
    names = " / ".join(k.replace("_", " ") for k in keys) or "fidelity cosine"
    return f"quality ({names}; 1 = same as the original)"


ALL_MODELS = "All models"


@dataclass
class Column:
    title: str
    tooltip: str
    text: Callable[[dict[str, Any]], str]
    value: Callable[[dict[str, Any]], Any]  # sort / CSV value: float, str or None
    numeric: bool = True


class VariantTableModel(QAbstractTableModel):
    """The workspace's variants, one row each; columns follow the batch sizes the variants were timed at."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[Column] = []
        self.names: dict[str, str] = {}  # model source -> short name

    def set_rows(self, rows: list[dict[str, Any]]) -> None:
        self.beginResetModel()
        self.rows = list(rows)
        self.names = model_names(model_of(r) for r in self.rows)
        self.columns = self._columns(self.rows)
        self.endResetModel()

    def label(self, row: dict[str, Any]) -> str:
        return row_label(row, self.names)

    def _columns(self, rows: list[dict[str, Any]]) -> list[Column]:
        def number(value: Callable[[dict[str, Any]], float | None], spec: str) -> Callable[..., str]:
            return lambda r: fmt(value(r), spec)

        metrics = {quality_metric(r, rows) for r in rows} - {None}

        def quality_text(r: dict[str, Any]) -> str:
            key, q = _quality(r, rows)
            if q is None:
                return "—"
            if key == "reference":
                return f"{q:.6g} (reference)"
            # the number alone only when every row is measured the same way
            return f"{q:.6g} ({metric_name(key)})" if len(metrics) > 1 else f"{q:.6g}"

        cols = [
            Column(
                "Variant",
                "Short id and the steps that made it ('original …' is the model the pipelines started from)",
                lambda r: ("⚠ " if r.get("missing") else "") + self.label(r),
                lambda r: self.label(r).casefold(),
                numeric=False,
            ),
        ]
        if len(self.names) > 1:
            cols.append(
                Column(
                    "Model",
                    "The model the variant was made from; quality compares only within one model",
                    lambda r: self.names.get(model_of(r), model_of(r)),
                    lambda r: self.names.get(model_of(r), model_of(r)).casefold(),
                    numeric=False,
                )
            )
        cols += [
            Column(
                "Kind",
                "Stage of the artifact: torch, onnx, tensorrt, or the original",
                lambda r: "original" if r["kind"] == "baseline" else r["kind"],
                lambda r: r["kind"],
                numeric=False,
            ),
            Column(
                "Size\n(MB)",
                "Size of the artifact on disk, in megabytes (10⁶ bytes)",
                number(_size_mb, ".4g"),
                _size_mb,
            ),
            Column(
                "Quality\n(fidelity)",
                "Agreement with the variant's own original model: mean cosine of the outputs (embeddings) "
                "or top-1 agreement (classifiers, language models); 1 = identical. Numbers of different "
                "models or metrics are not comparable",
                quality_text,
                lambda r: _quality(r, rows)[1],
            ),
        ]
        for b in batch_sizes(rows):
            cols += [
                Column(
                    f"b{b} p50\n(ms)",
                    f"Median latency of one batch of {b}, in milliseconds",
                    number(lambda r, b=b: _latency(r, b), ".4g"),
                    lambda r, b=b: _latency(r, b),
                ),
                Column(
                    f"b{b} p95\n(ms)",
                    f"95th percentile latency of one batch of {b}, in milliseconds",
                    number(lambda r, b=b: _latency(r, b, "p95"), ".4g"),
                    lambda r, b=b: _latency(r, b, "p95"),
                ),
                Column(
                    f"b{b} throughput\n(/s)",
                    f"Examples per second at batch size {b} (batch size / median latency)",
                    number(lambda r, b=b: _throughput(r, b), ".4g"),
                    lambda r, b=b: _throughput(r, b),
                ),
            ]
        cols += [
            Column(
                "Peak memory\n(MB)",
                "Peak memory while running, in megabytes",
                number(lambda r: r["metrics"].get("peak_memory_mb"), ".4g"),
                lambda r: r["metrics"].get("peak_memory_mb"),
            ),
            Column(
                "Steps", "The pipeline steps that made the variant", steps_text, steps_text, numeric=False
            ),
            Column(
                "Created",
                "When the variant was saved",
                lambda r: time.strftime("%Y-%m-%d %H:%M", time.localtime(float(r.get("created") or 0))),
                lambda r: float(r.get("created") or 0),
            ),
        ]
        return cols

    # -- Qt model API

    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.columns)

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if orientation != Qt.Orientation.Horizontal or not 0 <= section < len(self.columns):
            return None
        column = self.columns[section]
        if role == Qt.ItemDataRole.DisplayRole:
            return column.title
        if role == Qt.ItemDataRole.ToolTipRole:
            return column.tooltip
        return None

    def data(
        self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if not index.isValid():
            return None
        row, column = self.rows[index.row()], self.columns[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return column.text(row)
        if role == SORT_ROLE:
            return column.value(row)
        if role == CSV_ROLE:
            value = column.value(row)
            return "" if value is None else value if column.numeric else column.text(row)
        if role == ID_ROLE:
            return row["id"]
        if role == Qt.ItemDataRole.TextAlignmentRole and column.numeric:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole and row.get("missing"):
            return QBrush(QColor(200, 60, 60))
        if role == Qt.ItemDataRole.ToolTipRole:
            if row.get("missing"):
                return f"The files of {row['id']} are gone from the workspace ({row['artifact']})"
            if index.column() == 0:
                return (
                    f"{row['id']}\nparent: {row.get('parent') or '—'}\n{row.get('artifact') or row['model']}"
                )
            if column.title.startswith("Steps"):
                return json.dumps(_steps(row), indent=1) if _steps(row) else column.text(row)
            if column.title.startswith("Quality"):
                key, _q = _quality(row, self.rows)
                return f"{key}: {column.text(row)}"
            return column.text(row)
        return None

    def row_of(self, vid: str) -> int:
        return next((i for i, r in enumerate(self.rows) if r["id"] == vid), -1)


class NumericSortProxy(QSortFilterProxyModel):
    """Sorts by SORT_ROLE: numbers numerically, text case-insensitively, empty cells last; shows the rows
    of one model (`model_filter`, a model source) or of all (None)."""

    model_filter: str | None = None

    def set_model_filter(self, source: str | None) -> None:
        self.beginFilterChange()  # Qt 6.10+: invalidateFilter() is deprecated
        self.model_filter = source
        self.endFilterChange(QSortFilterProxyModel.Direction.Rows)

    def filterAcceptsRow(self, source_row: int, source_parent: QModelIndex | QPersistentModelIndex) -> bool:
        model = self.sourceModel()
        if self.model_filter is None or not isinstance(model, VariantTableModel):
            return True
        return 0 <= source_row < len(model.rows) and model_of(model.rows[source_row]) == self.model_filter

    def lessThan(
        self, left: QModelIndex | QPersistentModelIndex, right: QModelIndex | QPersistentModelIndex
    ) -> bool:
        a, b = left.data(SORT_ROLE), right.data(SORT_ROLE)
        a_missing = a is None or (isinstance(a, float) and math.isnan(a))
        b_missing = b is None or (isinstance(b, float) and math.isnan(b))
        if a_missing or b_missing:
            # ascending puts empty cells last; Qt reverses lessThan for descending, so keep them last there too
            descending = self.sortOrder() == Qt.SortOrder.DescendingOrder
            return (not a_missing and b_missing) != descending and a_missing != b_missing
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return a < b
        return str(a) < str(b)


def export_view_csv(view: QTableView, path: str | Path) -> Path:
    """Write a table view as CSV in its displayed (sorted) order; numbers at full precision."""
    path = Path(path)
    model = view.model()
    columns = range(model.columnCount())
    rows = [[" ".join(str(model.headerData(c, Qt.Orientation.Horizontal)).split()) for c in columns]]
    for r in range(model.rowCount()):
        cells = []
        for c in columns:
            index = model.index(r, c)
            value = index.data(CSV_ROLE)
            cells.append(index.data() if value is None else value)
        rows.append(cells)
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------ A/B work


@dataclass
class ABResult:
    a: dict[str, Any]  # workspace rows
    b: dict[str, Any]
    compare: dict[str, Any]  # studio.compare.compare(...)
    refs_a: dict[str, Any]  # canonical tensor name -> TensorRef
    refs_b: dict[str, Any]


@dataclass
class Overlay:
    name: str
    edges: np.ndarray
    counts_a: np.ndarray
    counts_b: np.ndarray
    stats_a: Any
    stats_b: Any


def run_ab(workspace: Any, a: str, b: str, examples: int, progress: Callable[[float, str], None]) -> ABResult:
    """Metrics, weight differences and disagreements of A and B, with progress between the slow parts."""
    from studio.compare import canonical_name, compare, open_row

    progress(0.02, "loading both models and comparing their weights…")
    result = compare(workspace, a, b, weights=True, examples=0)
    if examples:
        progress(0.5, f"running A and B on {examples} examples…")
        ran = compare(workspace, a, b, weights=False, examples=examples)
        result["disagreements"] = ran.get("disagreements", [])
        result["disagreements_data"] = ran.get("disagreements_data")
    progress(0.95, "listing tensors…")
    ra, rb = workspace.get(a), workspace.get(b)
    refs_a = {canonical_name(r.name): r for r in open_row(ra).tensors()}
    refs_b = {canonical_name(r.name): r for r in open_row(rb).tensors()}
    return ABResult(ra, rb, result, refs_a, refs_b)


def _dense_numpy(chunk: Any) -> np.ndarray:
    """Finite values of a chunk as float numpy (chunks are numpy arrays or torch tensors, maybe quantized)."""
    if not isinstance(chunk, np.ndarray):
        import torch

        if getattr(chunk, "is_quantized", False):
            chunk = chunk.dequantize()
        if chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.to(torch.float32)
        chunk = chunk.numpy()
    x = chunk if chunk.dtype in (np.float32, np.float64) else chunk.astype(np.float32)
    return x[np.isfinite(x)]


def overlay_histograms(name: str, ref_a: Any, ref_b: Any, bins: int = HIST_BINS) -> Overlay:
    """Histograms of the same layer in A and B on one set of bin edges (the union of both ranges), so the
    two curves can be read against each other."""
    from studio.inspection.stats import tensor_stats

    sa, sb = tensor_stats(ref_a, bins), tensor_stats(ref_b, bins)
    lows = [v for v in (sa.min, sb.min) if v is not None]
    highs = [v for v in (sa.max, sb.max) if v is not None]
    lo, hi = (min(lows), max(highs)) if lows and highs else (-1.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = []
    for ref in (ref_a, ref_b):
        c = np.zeros(bins, dtype=np.int64)
        for chunk in ref.chunks():
            c += np.histogram(_dense_numpy(chunk), bins=edges)[0]
        counts.append(c)
    return Overlay(name, edges, counts[0], counts[1], sa, sb)


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


# ------------------------------------------------------------------------------------------------ the view


class CompareView(QWidget):
    """Variants table + bar charts + Pareto scatter + A/B comparison of `document.workspace`."""

    refreshed = Signal()
    selection_changed = Signal(list)  # selected variant ids, in table order
    compare_started = Signal(str, str)
    compare_finished = Signal(str, str)  # A, B ids, once their comparison is on screen
    compare_failed = Signal(str)
    histogram_shown = Signal(str)  # layer name

    def __init__(self, document: StudioDocument, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.rows: list[dict[str, Any]] = []
        self.ab: ABResult | None = None
        self.overlay: Overlay | None = None
        self._compare_task: Any = None
        self._hist_task: Any = None
        self._plotted: list[dict[str, Any]] = []  # rows in the bar charts, in x order
        self._pareto_rows: list[dict[str, Any]] = []
        self._front: list[int] = []
        self._refreshing = False
        self._build()
        document.variants_changed.connect(self.refresh)
        document.model_changed.connect(self._on_open_model_changed)
        self.refresh()

    def _on_open_model_changed(self) -> None:
        """Another model is open: show its variants (when the workspace has any)."""
        if self.document.source in self.table_model.names:
            self.set_model_filter(self.document.source if len(self.table_model.names) > 1 else None)

    # ---------------------------------------------------------------------------- layout

    def _build(self) -> None:
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setToolTip("Re-read the variants of the workspace")
        self.batch_combo = QComboBox()
        self.batch_combo.setToolTip("Batch size shown in the latency chart and the Pareto scatter")
        self.batch_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip(
            "Show the variants of one model (quality and the Pareto front compare only within a model)"
        )
        self.model_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.model_label = QLabel("Model:")
        self._model_choice: str | None = None  # what the user picked ("" = all models), kept across refreshes
        self.remove_button = QPushButton("Remove…")
        self.remove_button.setToolTip("Delete the selected variants and their files from the workspace")
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip(
            "Export the selected variant (ONNX, TensorRT, transformers folder) or write a report"
        )
        self.csv_button = QPushButton("Table as CSV…")
        self.csv_button.setToolTip("Save the variants table as CSV")
        self.summary_label = QLabel("")
        self.summary_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        bar = QHBoxLayout()
        bar.addWidget(self.refresh_button)
        bar.addSpacing(8)
        bar.addWidget(self.model_label)
        bar.addWidget(self.model_combo)
        bar.addWidget(QLabel("Batch size:"))
        bar.addWidget(self.batch_combo)
        bar.addSpacing(8)
        bar.addWidget(self.remove_button)
        bar.addWidget(self.export_button)
        bar.addWidget(self.csv_button)
        bar.addStretch(1)
        bar.addWidget(self.summary_label)

        self.error_banner = Banner("error")

        # the variants table
        self.table_model = VariantTableModel(self)
        self.proxy = NumericSortProxy(self)
        self.proxy.setSourceModel(self.table_model)
        self.proxy.setSortRole(SORT_ROLE)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self._sort_title, self._sort_order = "Created", Qt.SortOrder.AscendingOrder
        self.table.horizontalHeader().sortIndicatorChanged.connect(self._on_sort_changed)
        self.proxy.layoutChanged.connect(self._on_layout_changed)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(self.table.fontMetrics().height() + 8)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.horizontalHeader().setHighlightSections(False)
        self.table.selectionModel().selectionChanged.connect(self._on_selection_changed)
        self.table.doubleClicked.connect(lambda _i: self.export_selected())
        self.table_csv_action = QAction("Export table as CSV…", self.table)
        self.table_csv_action.triggered.connect(self._export_csv_dialog)
        self.remove_action = QAction("Remove…", self.table)
        self.remove_action.triggered.connect(self.remove_selected)
        self.export_action = QAction("Export…", self.table)
        self.export_action.triggered.connect(self.export_selected)
        self.compare_action = QAction("Compare the two selected (A/B)", self.table)
        self.compare_action.triggered.connect(self._compare_selection)
        for action in (self.compare_action, self.export_action, self.remove_action, self.table_csv_action):
            self.table.addAction(action)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)

        # plots
        self.pareto_plot = pg.PlotWidget()
        self._setup_pareto()
        self.latency_plot = pg.PlotWidget()
        self.size_plot = pg.PlotWidget()
        self.quality_plot = pg.PlotWidget()
        self._setup_bars()
        for plot, name in (
            (self.pareto_plot, "pareto"),
            (self.latency_plot, "latency"),
            (self.size_plot, "size"),
            (self.quality_plot, "quality"),
        ):
            add_plot_export_action(plot, plot, name)

        self.tabs = QTabWidget()
        self.tabs.addTab(self.pareto_plot, "Latency vs quality")
        self.tabs.addTab(self.latency_plot, "Latency")
        self.tabs.addTab(self.size_plot, "Size")
        self.tabs.addTab(self.quality_plot, "Quality")
        self.tabs.addTab(self._build_ab(), "A/B comparison")
        self.plot_export_button = QToolButton()
        self.plot_export_button.setText("Export plot…")
        self.plot_export_button.setToolTip("Save the plot shown in this tab as PNG or SVG")
        self.plot_export_button.clicked.connect(self._export_current_plot)
        self.tabs.setCornerWidget(self.plot_export_button, Qt.Corner.TopRightCorner)
        self.tabs.currentChanged.connect(
            lambda _i: self.plot_export_button.setVisible(self.tabs.currentWidget() is not self.ab_panel)
        )

        self.main_split = QSplitter(Qt.Orientation.Vertical)
        self.main_split.addWidget(self.table)
        self.main_split.addWidget(self.tabs)
        self.main_split.setStretchFactor(0, 0)
        self.main_split.setStretchFactor(1, 1)
        self.main_split.setSizes([200, 560])

        self.empty_label = QLabel(EMPTY_MESSAGE)
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_label.setWordWrap(True)
        font = QFont(self.empty_label.font())
        font.setPointSizeF(font.pointSizeF() * 1.3)
        self.empty_label.setFont(font)
        self.stack = QStackedWidget()
        self.stack.addWidget(self.empty_label)
        self.stack.addWidget(self.main_split)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addLayout(bar)
        layout.addWidget(self.error_banner)
        layout.addWidget(self.stack, 1)

        self.refresh_button.clicked.connect(self.refresh)
        self.batch_combo.currentIndexChanged.connect(lambda _i: self._update_plots())
        self.model_combo.activated.connect(self._on_model_picked)
        self.remove_button.clicked.connect(self.remove_selected)
        self.export_button.clicked.connect(self.export_selected)
        self.csv_button.clicked.connect(self._export_csv_dialog)

    def _build_ab(self) -> QWidget:
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

        self.ab_panel = QWidget()
        v = QVBoxLayout(self.ab_panel)
        v.setContentsMargins(4, 4, 4, 4)
        v.addLayout(top)
        v.addWidget(self.ab_status)
        v.addWidget(self.ab_split, 1)
        return self.ab_panel

    def _axis_font(self) -> QFont:
        font = QFont(self.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.9))
        return font

    def _bar_plot(self, plot: pg.PlotWidget, title: str, ylabel: str) -> pg.BarGraphItem:
        colors = plot_colors()
        item = plot.getPlotItem()
        item.setTitle(title)
        item.setLabel("left", ylabel)
        item.setLabel("bottom", "variant")
        item.setMouseEnabled(x=False, y=False)
        item.hideButtons()
        item.showGrid(y=True, alpha=0.15)
        item.getAxis("left").enableAutoSIPrefix(False)
        bottom = item.getAxis("bottom")
        bottom.setStyle(tickFont=self._axis_font(), tickTextOffset=4)
        bottom.setHeight(2 * self.fontMetrics().height() + 30)
        bars = pg.BarGraphItem(
            x=[], height=[], width=0.6, brush=colors["bars_fill"], pen=pg.mkPen(colors["bars"])
        )
        item.addItem(bars)
        return bars

    def _setup_bars(self) -> None:
        colors = plot_colors()
        self.latency_bars = self._bar_plot(self.latency_plot, "Latency", "latency per batch (ms)")
        self.latency_whiskers = pg.ErrorBarItem(
            x=np.zeros(0),
            y=np.zeros(0),
            top=np.zeros(0),
            beam=0.18,
            pen=pg.mkPen(colors["foreground"], width=1.5),
        )
        self.latency_plot.getPlotItem().addItem(self.latency_whiskers)
        self.latency_legend = self.latency_plot.getPlotItem().addLegend(offset=(-10, 10), labelTextSize="9pt")
        self.latency_legend.addItem(self.latency_bars, "p50 (median)")
        self.latency_legend.addItem(self.latency_whiskers, "p95")
        style_legend(self.latency_legend)
        self.size_bars = self._bar_plot(self.size_plot, "Size on disk", "size on disk (MB)")
        self.quality_bars = self._bar_plot(
            self.quality_plot,
            "Quality loss against the original (1 − quality; lower is better)",
            "1 − quality (0 = same as the original)",
        )
        self._value_labels: dict[int, list[pg.TextItem]] = {}
        # what the orange bars are: a legend entry on every bar chart (the latency one has its own legend)
        selected = QColor(colors["mean"])
        selected.setAlpha(160)
        self._selected_samples = []
        for plot, legend in (
            (self.latency_plot, self.latency_legend),
            (self.size_plot, None),
            (self.quality_plot, None),
        ):
            if legend is None:
                legend = plot.getPlotItem().addLegend(offset=(-10, 10), labelTextSize="9pt")
            sample = pg.BarGraphItem(x=[], height=[], width=0.6, brush=selected, pen=pg.mkPen(colors["mean"]))
            legend.addItem(sample, "selected in the table")
            style_legend(legend)
            self._selected_samples.append(sample)

    def _setup_pareto(self) -> None:
        colors = plot_colors()
        item = self.pareto_plot.getPlotItem()
        item.setTitle("Latency vs quality (point area ∝ size on disk)")
        item.setLabel("bottom", "latency p50 (ms)")
        item.setLabel("left", "quality")
        item.showGrid(x=True, y=True, alpha=0.15)
        for name in ("left", "bottom"):
            item.getAxis(name).enableAutoSIPrefix(False)
        self.pareto_legend = item.addLegend(offset=(-10, -10), labelTextSize="9pt", colCount=3)
        # one front per (model, quality metric): a front across models or metrics would rank numbers that
        # do not compare. The first line always exists (tests and the theme reach it as front_line).
        self.front_lines: list[pg.PlotDataItem] = []
        self.front_line = self._front_line(0)
        self.fronts: dict[tuple[str, str | None], list[str]] = {}  # group -> variant ids on its front
        self.scatter = pg.ScatterPlotItem(
            size=14,
            pen=pg.mkPen(colors["bars"], width=1.2),
            brush=colors["bars_fill"],
            hoverable=True,
            name="variant (area ∝ size)",
            tip=self._point_tip,
        )
        item.addItem(self.scatter)
        self.highlight = pg.ScatterPlotItem(
            size=22, pen=pg.mkPen(colors["mean"], width=3), brush=None, name="selected", pxMode=True
        )
        self.highlight.setZValue(5)
        item.addItem(self.highlight)
        self.scatter.sigClicked.connect(self._on_point_clicked)
        self._point_labels: list[pg.TextItem] = []
        self._label_points: list[tuple[float, float, float]] = []  # x, y, radius in pixels
        item.getViewBox().sigResized.connect(lambda *_a: self._place_point_labels())
        item.getViewBox().sigRangeChanged.connect(lambda *_a: self._place_point_labels())
        style_legend(self.pareto_legend)

    FRONT_STYLES = (Qt.PenStyle.DashLine, Qt.PenStyle.DotLine, Qt.PenStyle.DashDotLine)

    def _front_line(self, i: int) -> pg.PlotDataItem:
        """The i-th Pareto front line, made on first use; fronts of other models get other dashes/colours."""
        while len(self.front_lines) <= i:
            n = len(self.front_lines)
            line = pg.PlotDataItem([], [], symbol="d", symbolSize=7, symbolPen=None, name="Pareto front")
            self.pareto_plot.getPlotItem().addItem(line)
            self.front_lines.append(line)
            self._style_front(line, n)
        return self.front_lines[i]

    def _style_front(self, line: pg.PlotDataItem, i: int) -> None:
        colors = plot_colors()
        color = colors["foreground"] if i == 0 else colors["mean"] if i == 1 else colors["bars"]
        style = self.FRONT_STYLES[i % len(self.FRONT_STYLES)]
        line.setPen(pg.mkPen(color, width=1.5, style=style))
        line.setSymbolBrush(color)

    def _setup_hist(self) -> None:
        colors = plot_colors()
        item = self.hist_plot.getPlotItem()
        item.setTitle("Weights of A and B")
        item.setLabel("bottom", "weight value")
        item.setLabel("left", "count (values per bin)")
        item.showGrid(x=True, y=True, alpha=0.15)
        for name in ("left", "bottom"):
            item.getAxis(name).enableAutoSIPrefix(False)
        self.hist_legend = item.addLegend(offset=(-10, 10), labelTextSize="9pt", colCount=2)
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
        for plot in (self.pareto_plot, self.latency_plot, self.size_plot, self.quality_plot, self.hist_plot):
            style_plot(plot)
        self.latency_whiskers.setData(pen=pg.mkPen(colors["foreground"], width=1.5))
        for i, line in enumerate(self.front_lines):
            self._style_front(line, i)
        self.highlight.setPen(pg.mkPen(colors["mean"], width=3))
        self.hist_a.setPen(pg.mkPen(colors["bars"], width=1.5))
        self.hist_b.setPen(pg.mkPen(colors["mean"], width=1.5))
        self.error_banner.restyle()
        self._update_plots()

    # ---------------------------------------------------------------------------- data

    def _created_column(self) -> int:
        return max(0, self.table_model.columnCount() - 1)

    def refresh(self) -> None:
        """Re-read the workspace; keeps the selection and the sort order."""
        selected = self.selected_ids()
        try:
            rows = self.document.workspace.list()
        except Exception as exc:  # a broken workspace must not take the tab down
            self.error_banner.show_message(f"Cannot read the workspace: {exc}")
            rows = []
        self._refreshing = True
        try:
            self.rows = rows
            self.table_model.set_rows(rows)
            self._fill_models()
            titles = [c.title for c in self.table_model.columns]
            if self._sort_title in titles:
                self.table.sortByColumn(titles.index(self._sort_title), self._sort_order)
            else:
                self.table.sortByColumn(self._created_column(), Qt.SortOrder.AscendingOrder)
            self._fit_columns()
            self._fill_batches()
            self._fill_ab_combos()
            self._select_ids([i for i in selected if self.table_model.row_of(i) >= 0])
        finally:
            self._refreshing = False
        self.stack.setCurrentWidget(self.main_split if rows else self.empty_label)
        n_missing = sum(1 for r in rows if r.get("missing"))
        variants = sum(1 for r in rows if r["kind"] != "baseline")
        text = f"{variants} variant{'s' if variants != 1 else ''}"
        if len(rows) != variants:
            text += f" + {len(rows) - variants} original"
        if n_missing:
            text += f" · {n_missing} with missing files (⚠)"
        self.summary_label.setText(text + f" · {self.document.workspace.root}")
        if self.ab is not None and not {self.ab.a["id"], self.ab.b["id"]} <= {r["id"] for r in rows}:
            self._clear_ab("A variant of the comparison was removed.")
        self._update_plots()
        self._update_actions()
        self.refreshed.emit()

    def _on_sort_changed(self, section: int, order: Qt.SortOrder) -> None:
        if self._refreshing or not 0 <= section < len(self.table_model.columns):
            return
        self._sort_title, self._sort_order = self.table_model.columns[section].title, order

    def _on_layout_changed(self, *_args: Any) -> None:
        if not self._refreshing:
            self._update_plots()  # the bars follow the table's order

    def sort_by(self, title: str, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        """Sort the table by the column whose header starts with `title` (what a header click does)."""
        titles = [c.title for c in self.table_model.columns]
        column = next(i for i, t in enumerate(titles) if t.startswith(title))
        self.table.sortByColumn(column, order)

    def _fit_columns(self) -> None:
        header = self.table.horizontalHeader()
        self.table.resizeColumnsToContents()
        for c in range(self.table_model.columnCount()):
            header.resizeSection(c, min(header.sectionSize(c), 260))

    def _fill_models(self) -> None:
        """One entry per model in the workspace (and "All models"); shown only when there are several.

        The open model's variants are shown first; what the user picked stays picked across refreshes.
        """
        names = self.table_model.names
        sources = list(names)
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for source in sources:
            self.model_combo.addItem(names[source], source)
            self.model_combo.setItemData(self.model_combo.count() - 1, source, Qt.ItemDataRole.ToolTipRole)
        self.model_combo.addItem(ALL_MODELS, "")
        choice = self._model_choice
        if choice is None or (choice and choice not in sources):
            open_model = self.document.source
            newest = max(self.rows, key=lambda r: float(r.get("created") or 0), default=None)
            choice = open_model if open_model in sources else model_of(newest) if newest is not None else ""
        self.model_combo.setCurrentIndex(max(0, self.model_combo.findData(choice)))
        self.model_combo.blockSignals(False)
        several = len(sources) > 1
        self.model_combo.setVisible(several)
        self.model_label.setVisible(several)
        self.proxy.set_model_filter(self.model_combo.currentData() or None if several else None)

    def _on_model_picked(self, _index: int) -> None:
        self._model_choice = self.model_combo.currentData()
        self.set_model_filter(self._model_choice or None)

    def set_model_filter(self, source: str | None) -> None:
        """Show the variants of one model (a source as in the rows), or of every model (None)."""
        index = self.model_combo.findData(source or "")
        if index >= 0:
            self.model_combo.setCurrentIndex(index)
        self._model_choice = source or ""
        self.proxy.set_model_filter(source or None)
        self._update_plots()
        self._update_actions()

    def _fill_batches(self) -> None:
        current = self.batch_combo.currentData()
        batches = batch_sizes(self.rows)
        self.batch_combo.blockSignals(True)
        self.batch_combo.clear()
        for b in batches:
            self.batch_combo.addItem(b, b)
        if current in batches:
            self.batch_combo.setCurrentIndex(batches.index(current))
        self.batch_combo.setEnabled(bool(batches))
        self.batch_combo.blockSignals(False)

    def _fill_ab_combos(self) -> None:
        for combo in (self.a_combo, self.b_combo):
            current = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            for row in self.rows:
                combo.addItem(self.table_model.label(row), row["id"])
                combo.setItemData(combo.count() - 1, row["id"], Qt.ItemDataRole.ToolTipRole)
            index = combo.findData(current)
            combo.setCurrentIndex(index if index >= 0 else -1)
            combo.blockSignals(False)
        if self.a_combo.currentIndex() < 0 and len(self.rows) >= 2:
            self.a_combo.setCurrentIndex(0)
            self.b_combo.setCurrentIndex(len(self.rows) - 1)
        self.compare_button.setEnabled(len(self.rows) >= 2)

    def batch(self) -> str | None:
        return self.batch_combo.currentData()

    def plotted_rows(self) -> list[dict[str, Any]]:
        """Rows in the bar charts, in the table's current order."""
        order = [self.proxy.index(r, 0).data(ID_ROLE) for r in range(self.proxy.rowCount())]
        by_id = {r["id"]: r for r in self.rows}
        return [by_id[i] for i in order if i in by_id]

    # ---------------------------------------------------------------------------- plots

    def _update_plots(self) -> None:
        rows = self.plotted_rows()
        self._plotted = rows
        selected = set(self.selected_ids())
        colors = plot_colors()
        sel_fill = QColor(colors["mean"])
        sel_fill.setAlpha(160)
        brushes = [pg.mkBrush(sel_fill if r["id"] in selected else colors["bars_fill"]) for r in rows]
        xs = np.arange(len(rows), dtype=float)
        ticks = [[(i, tick_label(r, self.table_model.names)) for i, r in enumerate(rows)]]
        batch = self.batch()

        # latency: p50 bars with p95 whiskers
        p50 = np.array([_latency(r, batch) if batch else None for r in rows], dtype=float)
        p95 = np.array([_latency(r, batch, "p95") if batch else None for r in rows], dtype=float)
        ok = np.isfinite(p50)
        self.latency_bars.setOpts(
            x=xs[ok], height=p50[ok], brushes=[b for b, k in zip(brushes, ok, strict=True) if k]
        )
        top = np.where(np.isfinite(p95[ok]), np.maximum(p95[ok] - p50[ok], 0), 0)
        self.latency_whiskers.setData(x=xs[ok], y=p50[ok], top=top, bottom=None)
        self.latency_plot.getPlotItem().setTitle(
            f"Latency at batch size {batch}: p50 bars, p95 whiskers"
            if batch
            else "Latency (no timings recorded)"
        )
        self.latency_plot.getPlotItem().setLabel(
            "left", f"latency per batch of {batch} (ms)" if batch else "latency (ms)"
        )
        ymax = np.nanmax(np.concatenate([p95[ok], p50[ok]])) if ok.any() else 1.0
        self._finish_bars(self.latency_plot, ticks, len(rows), 0.0, float(ymax) * 1.15 or 1.0)
        self._value_texts(
            self.latency_plot, [(x, v, f"{v:.3g}") for x, v in zip(xs[ok], p50[ok], strict=True)]
        )

        # size
        size = np.array([_size_mb(r) for r in rows], dtype=float)
        ok = np.isfinite(size)
        self.size_bars.setOpts(
            x=xs[ok], height=size[ok], brushes=[b for b, k in zip(brushes, ok, strict=True) if k]
        )
        ymax = float(np.nanmax(size)) if ok.any() else 1.0
        self._finish_bars(self.size_plot, ticks, len(rows), 0.0, ymax * 1.15 or 1.0)
        self._value_texts(self.size_plot, [(x, v, f"{v:.3g}") for x, v in zip(xs[ok], size[ok], strict=True)])

        # quality: the loss (1 - quality) from 0, the original's level. A zoomed quality axis (0.885 ..)
        # made a difference of 0.01 look like a collapse; from 0 the bars compare honestly.
        scored = [_quality(r, self.rows) for r in rows]
        quality = np.array([q for _k, q in scored], dtype=float)
        ok = np.isfinite(quality)
        loss = np.maximum(1.0 - quality, 0.0)
        keys = sorted({k for k, q in scored if q is not None and k not in ("reference", "-")})
        top = float(np.nanmax(loss[ok])) if ok.any() else 0.0
        self.quality_bars.setOpts(
            x=xs[ok],
            y0=np.zeros(int(ok.sum())),
            height=loss[ok],
            brushes=[b for b, k in zip(brushes, ok, strict=True) if k],
        )
        names = " / ".join(metric_name(k) for k in keys) or "quality"
        self.quality_plot.getPlotItem().setLabel("left", f"1 − {names} (0 = same as the original)")
        self._finish_bars(self.quality_plot, ticks, len(rows), 0.0, top * 1.2 if top > 0 else 1e-3)
        self._value_texts(
            self.quality_plot,
            [
                (x, d, f"{v:.6g}" if d > 0 else f"{v:.6g} (same)")
                for x, d, v in zip(xs[ok], loss[ok], quality[ok], strict=True)
            ],
        )

        self._update_pareto(rows, scored)

    def _finish_bars(
        self, plot: pg.PlotWidget, ticks: list[list[tuple[int, str]]], n: int, y0: float, y1: float
    ) -> None:
        item = plot.getPlotItem()
        item.getAxis("bottom").setTicks(ticks)
        item.getAxis("bottom").setStyle(showValues=n > 0)
        item.getViewBox().setRange(xRange=(-0.6, max(n, 1) - 0.4), yRange=(y0, y1), padding=0)

    def _value_texts(self, plot: pg.PlotWidget, values: list[tuple[float, float, str]]) -> None:
        """Numbers above the bars, from a pool of text items reused across updates."""
        pool = self._value_labels.setdefault(id(plot), [])
        color = plot_colors()["foreground"]
        while len(pool) < len(values):
            text = pg.TextItem("", anchor=(-0.08, 1.0))  # just right of the bar's centre (and whisker)
            text.setFont(self._axis_font())
            plot.getPlotItem().addItem(text, ignoreBounds=True)
            pool.append(text)
        for i, text in enumerate(pool):
            if i < len(values):
                x, y, s = values[i]
                text.setText(s, color=color)
                text.setPos(x, y)
                text.show()
            else:
                text.hide()

    def _update_pareto(self, rows: list[dict[str, Any]], scored: list[tuple[str, float | None]]) -> None:
        batch = self.batch()
        colors = plot_colors()
        pts, kept = [], []
        for r, (_k, q) in zip(rows, scored, strict=True):
            lat = _latency(r, batch) if batch else None
            if lat is not None and q is not None:
                pts.append((lat, q))
                kept.append(r)
        self._pareto_rows = kept
        sizes = [_size_mb(r) or 0.0 for r in kept]
        biggest = max(sizes, default=1.0) or 1.0
        px = [10 + 26 * math.sqrt(s / biggest) for s in sizes]
        self.scatter.setData(
            x=[p[0] for p in pts],
            y=[p[1] for p in pts],
            size=px,
            data=[r["id"] for r in kept],
            brush=colors["bars_fill"],
            pen=pg.mkPen(colors["bars"], width=1.2),
        )
        fronts = pareto_fronts(kept, pts)
        self.fronts = {key: [kept[i]["id"] for i in front] for key, front in fronts.items()}
        self._front = next(iter(fronts.values()), [])
        several = len(fronts) > 1
        item = self.pareto_plot.getPlotItem()
        for line in self.front_lines:
            line.setData([], [])
            self.pareto_legend.removeItem(line)
        for i, ((source, metric), front) in enumerate(fronts.items()):
            line = self._front_line(i)
            line.setData([pts[j][0] for j in front], [pts[j][1] for j in front])
            name = self.table_model.names.get(source, source)
            title = f"Pareto front, {name} ({metric_name(metric)})" if several else "Pareto front"
            line.opts["name"] = title
            self.pareto_legend.addItem(line, title)
        item.setLabel("bottom", f"latency p50 at batch size {batch} (ms)" if batch else "latency p50 (ms)")
        keys = sorted({k for k, q in scored if q is not None and k not in ("reference", "-")})
        item.setLabel("left", quality_axis_label(keys))
        several_models = len({model_of(r) for r in kept}) > 1
        while len(self._point_labels) < len(kept):
            text = pg.TextItem("", anchor=(0.0, 0.5))
            text.setFont(self._axis_font())
            item.addItem(text, ignoreBounds=True)
            self._point_labels.append(text)
        for i, text in enumerate(self._point_labels):
            if i < len(kept):
                # beside a point space is short: the model's name only when there is more than one
                name = self.table_model.label(kept[i]) if several_models else label(kept[i])
                text.setText(name, color=colors["foreground"])
                text.show()
            else:
                text.hide()
        self._label_points = [(x, y, r / 2) for (x, y), r in zip(pts, px, strict=True)]
        if pts:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            xspan = max(max(xs) - min(xs), max(xs) * 0.1, 1e-3)
            yspan = max(max(ys) - min(ys), 1e-4)
            item.getViewBox().setRange(
                xRange=(min(xs) - xspan * 0.15, max(xs) + xspan * 0.45),
                yRange=(min(ys) - yspan * 0.35, max(ys) + yspan * 0.35),
                padding=0,
            )
        item.setTitle(
            "Latency vs quality (point area ∝ size on disk)"
            if pts
            else "Latency vs quality: no variant has both a timing and a quality score"
        )
        self._place_point_labels()
        self._update_highlight()

    def _place_point_labels(self) -> None:
        """Each label just right of its circle: an offset in pixels, so it follows zoom and resize."""
        if not self._label_points:
            return
        pixel = self.pareto_plot.getPlotItem().getViewBox().viewPixelSize()
        dx = pixel[0] if pixel and math.isfinite(pixel[0]) else 0.0
        for text, (x, y, radius) in zip(self._point_labels, self._label_points, strict=False):
            text.setPos(x + (radius + 4) * dx, y)

    def _update_highlight(self) -> None:
        selected = set(self.selected_ids())
        spots = [p for p in self.scatter.points() if p.data() in selected]
        self.highlight.setData(x=[p.pos().x() for p in spots], y=[p.pos().y() for p in spots])

    def highlighted_ids(self) -> list[str]:
        """Ids of the scatter points ringed as selected."""
        xs, ys = self.highlight.getData()
        out = []
        for p in self.scatter.points():
            if any(p.pos().x() == x and p.pos().y() == y for x, y in zip(xs, ys, strict=True)):
                out.append(p.data())
        return out

    def _point_tip(self, x: float, y: float, data: Any) -> str:
        row = next((r for r in self.rows if r["id"] == data), None)
        name = self.table_model.label(row) if row else str(data)
        size = _size_mb(row) if row else None
        return f"{name}\nlatency p50 {x:.4g} ms\nquality {y:.6g}\nsize {fmt(size, '.4g')} MB"

    def _on_point_clicked(self, _item: Any, points: Any, event: Any = None) -> None:
        """A click on a point selects its row; with Ctrl it is added to the selection (two: A/B)."""
        if points is None or len(points) == 0:
            return
        vid = points[0].data()
        add = False
        if event is not None and hasattr(event, "modifiers"):
            add = bool(event.modifiers() & Qt.KeyboardModifier.ControlModifier)
        if add:
            self._select_ids([*self.selected_ids(), vid], user=True)
        else:
            self.select_variant(vid)

    # ---------------------------------------------------------------------------- selection

    def selected_ids(self) -> list[str]:
        """Selected variants in the table's order."""
        if not hasattr(self, "table"):
            return []
        rows = sorted(i.row() for i in self.table.selectionModel().selectedRows())
        return [self.proxy.index(r, 0).data(ID_ROLE) for r in rows]

    def current_variant_id(self) -> str | None:
        """The variant File > Export means: the selected one (the current row when several are)."""
        ids = self.selected_ids()
        if not ids:
            return None
        current = self.table.currentIndex()
        vid = current.siblingAtColumn(0).data(ID_ROLE) if current.isValid() else None
        return vid if vid in ids else ids[0]

    def select_variant(self, vid: str) -> bool:
        if self.table_model.row_of(vid) < 0:
            return False
        self._select_ids([vid], user=True)
        return True

    def _select_ids(self, ids: list[str], user: bool = False) -> None:
        selection = QItemSelection()
        last = QModelIndex()
        for vid in ids:
            row = self.table_model.row_of(vid)
            if row < 0:
                continue
            index = self.proxy.mapFromSource(self.table_model.index(row, 0))
            selection.select(index, index.siblingAtColumn(self.proxy.columnCount() - 1))
            last = index
        model = self.table.selectionModel()
        flags = QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows
        if last.isValid():
            model.setCurrentIndex(last, QItemSelectionModel.SelectionFlag.NoUpdate)
            self.table.scrollTo(last)
        model.select(selection, flags)
        if not ids:
            model.clearSelection()

    def _on_selection_changed(self, *_args: Any) -> None:
        ids = self.selected_ids()
        self._update_plots()
        self._update_actions()
        self.selection_changed.emit(ids)
        if self._refreshing or len(ids) != 2:
            return
        self.set_ab(ids[0], ids[1])
        pair = (self.ab.a["id"], self.ab.b["id"]) if self.ab is not None else None
        if pair != (ids[0], ids[1]):
            self.compare_ab()

    def _update_actions(self) -> None:
        n = len(self.selected_ids())
        self.remove_button.setEnabled(n > 0)
        self.remove_action.setEnabled(n > 0)
        self.compare_action.setEnabled(n == 2)
        self.csv_button.setEnabled(bool(self.rows))
        self.export_button.setEnabled(bool(self.rows))

    def _compare_selection(self) -> None:
        ids = self.selected_ids()
        if len(ids) == 2:
            self.set_ab(*ids)
            self.compare_ab()

    # ---------------------------------------------------------------------------- actions

    def confirm(self, question: str) -> bool:
        """Ask the user; tests override this."""
        answer = QMessageBox.question(
            self,
            "Remove variants",
            question,
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def remove_selected(self) -> list[str]:
        ids = self.selected_ids()
        if not ids:
            return []
        names = ", ".join(self.table_model.label(r) for r in self.rows if r["id"] in ids)
        question = (
            f"Remove {len(ids)} variant{'s' if len(ids) != 1 else ''} ({names}) from the workspace?\n\n"
            "Their files are deleted; this cannot be undone."
        )
        if not self.confirm(question):
            return []
        removed = []
        for vid in ids:
            try:
                self.document.workspace.remove(vid)
                removed.append(vid)
            except Exception as exc:  # the files may be locked or already gone: say so, keep going
                self.error_banner.show_message(f"Cannot remove {vid}: {exc}")
        if removed:
            self.document.status.emit(f"Removed {len(removed)} variant{'s' if len(removed) != 1 else ''}")
            self.document.variants_changed.emit()  # every view of the workspace refreshes (this one too)
        return removed

    def export_selected(self) -> Any:
        from studio.gui.export_dialog import open_export_dialog

        return open_export_dialog(self.document, self, self.current_variant_id())

    def export_table_csv(self, path: str | Path) -> Path:
        return export_view_csv(self.table, path)

    def _export_csv_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export table", "variants.csv", "CSV (*.csv)")
        if path:
            self.export_table_csv(path)

    def _export_current_plot(self) -> None:
        plot = self.tabs.currentWidget()
        if isinstance(plot, pg.PlotWidget):
            name = self.tabs.tabText(self.tabs.currentIndex()).lower().replace(" ", "-")
            path, _ = QFileDialog.getSaveFileName(
                self, "Export plot", f"{name}.png", "PNG image (*.png);;SVG image (*.svg)"
            )
            if path:
                export_plot(plot, path)

    # ---------------------------------------------------------------------------- A/B

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
        self.tabs.setCurrentWidget(self.ab_panel)
        workspace, examples = self.document.workspace, self.examples_spin.value()
        self.progress.setValue(0)
        self.progress.show()
        self.cancel_button.setEnabled(True)
        self.ab_status.setText("Comparing…")
        self._compare_task = run_task(
            lambda progress: run_ab(workspace, a, b, examples, progress),
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

    def _on_compared(self, token: int, result: ABResult) -> None:
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

    def _show_ab(self, result: ABResult) -> None:
        data = result.compare
        la, lb = self.table_model.label(result.a), self.table_model.label(result.b)
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
            lambda: overlay_histograms(name, ref_a, ref_b),
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
        # headroom above the peak keeps the legend (top right) off the curves
        peak = float(max(overlay.counts_a.max(initial=0), overlay.counts_b.max(initial=0)) or 1)
        item.getViewBox().setRange(
            xRange=(float(overlay.edges[0]), float(overlay.edges[-1])), yRange=(0, peak * 1.45), padding=0.02
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

    # ---------------------------------------------------------------------------- state

    def save_state(self, settings: QSettings) -> None:
        settings.setValue("compare_view/main_split", self.main_split.saveState())
        settings.setValue("compare_view/ab_split", self.ab_split.saveState())
        settings.setValue("compare_view/examples", self.examples_spin.value())

    def restore_state(self, settings: QSettings) -> None:
        for key, split in (
            ("main_split", self.main_split),
            ("ab_split", self.ab_split),
        ):
            value = settings.value(f"compare_view/{key}")
            if value is not None:
                split.restoreState(value)
        examples = settings.value("compare_view/examples")
        if examples is not None:
            self.examples_spin.setValue(int(examples))

    def shutdown(self) -> None:
        self.cancel()
