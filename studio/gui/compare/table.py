"""The Compare tab's variants table: one row per workspace variant, columns following the batch sizes the
variants were timed at, sorted numerically (empty cells last), filtered to one model, and written as CSV
in the order shown. What a cell means (latency, size, quality, label) comes from `studio.variant_rows`."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QItemSelection,
    QItemSelectionModel,
    QModelIndex,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
)
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTableView, QWidget

from studio.gui.widgets import fmt
from studio.units import human_bytes
from studio.variant_rows import (
    batch_sizes,
    decode_tokens_per_s,
    generation_batch_sizes,
    generation_quality,
    kv_cache_bits,
    kv_cache_bytes,
    latency,
    metric_name,
    model_names,
    model_of,
    quality_metric,
    quality_score,
    row_label,
    size_mb,
    steps,
    throughput,
    tpot_ms,
    ttft_ms,
)
from studio.variant_rows import steps_text as joined_steps

SORT_ROLE = Qt.ItemDataRole.UserRole + 1  # number (or casefolded text) the proxy sorts by
ID_ROLE = Qt.ItemDataRole.UserRole + 2  # the variant id of the row
CSV_ROLE = Qt.ItemDataRole.UserRole + 3  # full-precision value written to CSV


def steps_text(row: dict[str, Any]) -> str:
    if row["kind"] == "baseline":
        return "—"
    return joined_steps(row) or "(no steps)"


@dataclass
class Column:
    title: str
    tooltip: str
    text: Callable[[dict[str, Any]], str]
    value: Callable[[dict[str, Any]], Any]  # sort / CSV value: float, str or None
    numeric: bool = True


def quality_of(rows: list[dict[str, Any]], key: str) -> Callable[[dict[str, Any]], float | None]:
    """A row's generation quality `key` (an original's, from its variants among `rows`)."""
    return lambda r: generation_quality(r, rows, key)


def generation_columns(rows: list[dict[str, Any]], number: Callable[..., Callable[..., str]]) -> list[Column]:
    """The generation metrics of causal LMs (time to first token, time per token, decode tokens/s, KV
    cache, generation quality) at the smallest batch size they were timed at; none when no row has them."""
    batches = generation_batch_sizes(rows)
    if not batches:
        return []
    b = batches[0]
    cols = [
        Column(
            f"TTFT b{b}\np50 (ms)",
            f"Time to first token: prefill of a batch of {b} prompts and the first new token, median, ms",
            number(lambda r: ttft_ms(r, b), ".4g"),
            lambda r: ttft_ms(r, b),
        ),
        Column(
            f"TPOT b{b}\np50 (ms)",
            f"Time per output token: one decode step of a batch of {b} with the KV cache, median, ms",
            number(lambda r: tpot_ms(r, b), ".4g"),
            lambda r: tpot_ms(r, b),
        ),
        Column(
            f"Decode b{b}\n(tokens/s)",
            f"New tokens per second while decoding at batch size {b} (batch / TPOT p50)",
            number(lambda r: decode_tokens_per_s(r, b), ".4g"),
            lambda r: decode_tokens_per_s(r, b),
        ),
        Column(
            "KV cache\n(bytes)",
            "Bytes the KV cache holds after prompt + new tokens at batch 1 (0: generated without a cache)",
            lambda r: human_bytes(v) if (v := kv_cache_bytes(r)) is not None else "—",
            kv_cache_bytes,
        ),
    ]
    if any(kv_cache_bits(r) is not None for r in rows):
        cols.append(
            Column(
                "KV bits",
                "Bits per cached key of a kv_cache.quantize variant (empty: the model's float cache)",
                number(kv_cache_bits, "g"),
                kv_cache_bits,
            )
        )
    for key, title, tip in (
        ("perplexity", "Perplexity", "Perplexity on the evaluation text (lower is better)"),
        (
            "generation_match",
            "Generation\nmatch",
            "Share of greedy new tokens equal to the original's, up to the first difference (1 = same)",
        ),
    ):
        if any(generation_quality(r, rows, key) is not None for r in rows):
            value = quality_of(rows, key)
            cols.append(Column(title, tip, number(value, ".5g"), value))
    return cols


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
            key, q = quality_score(r, rows)
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
                number(size_mb, ".4g"),
                size_mb,
            ),
            Column(
                "Quality\n(fidelity)",
                "Agreement with the variant's own original model: mean cosine of the outputs (embeddings) "
                "or top-1 agreement (classifiers, language models); 1 = identical. Numbers of different "
                "models or metrics are not comparable",
                quality_text,
                lambda r: quality_score(r, rows)[1],
            ),
        ]
        for b in batch_sizes(rows):
            cols += [
                Column(
                    f"b{b} p50\n(ms)",
                    f"Median latency of one batch of {b}, in milliseconds",
                    number(lambda r, b=b: latency(r, b), ".4g"),
                    lambda r, b=b: latency(r, b),
                ),
                Column(
                    f"b{b} p95\n(ms)",
                    f"95th percentile latency of one batch of {b}, in milliseconds",
                    number(lambda r, b=b: latency(r, b, "p95"), ".4g"),
                    lambda r, b=b: latency(r, b, "p95"),
                ),
                Column(
                    f"b{b} throughput\n(/s)",
                    f"Examples per second at batch size {b} (batch size / median latency)",
                    number(lambda r, b=b: throughput(r, b), ".4g"),
                    lambda r, b=b: throughput(r, b),
                ),
            ]
        cols += generation_columns(rows, number)
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
                return json.dumps(steps(row), indent=1) if steps(row) else column.text(row)
            if column.title.startswith("Quality"):
                key, _q = quality_score(row, self.rows)
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


class VariantTable(QTableView):
    """The table view over a `VariantTableModel` through a `NumericSortProxy`: row selection, sorting by a
    column title, and selection by variant id (what the scatter and the A/B pickers need)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.table_model = VariantTableModel(self)
        self.proxy = NumericSortProxy(self)
        self.proxy.setSourceModel(self.table_model)
        self.proxy.setSortRole(SORT_ROLE)
        self.setModel(self.proxy)
        self.setSortingEnabled(True)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setAlternatingRowColors(True)
        self.setWordWrap(False)
        self.verticalHeader().setVisible(False)
        self.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.horizontalHeader().setStretchLastSection(True)
        self.horizontalHeader().setHighlightSections(False)

    def shown_ids(self) -> list[str]:
        """Ids of the rows shown (filtered), in the table's current order."""
        return [self.proxy.index(r, 0).data(ID_ROLE) for r in range(self.proxy.rowCount())]

    def sort_by(self, title: str, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        """Sort by the column whose header starts with `title` (what a header click does)."""
        titles = [c.title for c in self.table_model.columns]
        column = next(i for i, t in enumerate(titles) if t.startswith(title))
        self.sortByColumn(column, order)

    def fit_columns(self) -> None:
        header = self.horizontalHeader()
        self.resizeColumnsToContents()
        for c in range(self.table_model.columnCount()):
            header.resizeSection(c, min(header.sectionSize(c), 260))

    def selected_ids(self) -> list[str]:
        """Selected variants in the table's order."""
        rows = sorted(i.row() for i in self.selectionModel().selectedRows())
        return [self.proxy.index(r, 0).data(ID_ROLE) for r in rows]

    def current_variant_id(self) -> str | None:
        """The selected variant (the current row when several are)."""
        ids = self.selected_ids()
        if not ids:
            return None
        current = self.currentIndex()
        vid = current.siblingAtColumn(0).data(ID_ROLE) if current.isValid() else None
        return vid if vid in ids else ids[0]

    def select_ids(self, ids: list[str]) -> None:
        selection = QItemSelection()
        last = QModelIndex()
        for vid in ids:
            row = self.table_model.row_of(vid)
            if row < 0:
                continue
            index = self.proxy.mapFromSource(self.table_model.index(row, 0))
            selection.select(index, index.siblingAtColumn(self.proxy.columnCount() - 1))
            last = index
        model = self.selectionModel()
        flags = QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows
        if last.isValid():
            model.setCurrentIndex(last, QItemSelectionModel.SelectionFlag.NoUpdate)
            self.scrollTo(last)
        model.select(selection, flags)
        if not ids:
            model.clearSelection()
