"""The Compare tab: every variant of the workspace in one sortable table, bar charts of latency, size and
quality, a latency / quality Pareto scatter, and an A/B comparison of two variants.

This module puts the parts together (the table in `table`, the plots in `plots`, the A/B panel in
`ab_panel`). The table and the plots are views of the same list (`Workspace.list()`), re-read when the
document says the workspace changed. Selection is shared: a row selected in the table is ringed in the
scatter and its bars are tinted; a point clicked in the scatter selects its row. Two selected rows (or the
A and B pickers) start an A/B comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import QSettings, Qt, Signal
from PySide6.QtGui import QAction, QFont
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from studio.ab_session import ABSession, Overlay
from studio.gui.compare.ab_panel import ABPanel
from studio.gui.compare.plots import ComparePlots
from studio.gui.compare.table import VariantTable, export_view_csv
from studio.gui.document import StudioDocument
from studio.gui.widgets import Banner, export_plot
from studio.variant_rows import batch_sizes, model_of

EMPTY_MESSAGE = "No variants yet — build a pipeline in the Pipeline tab and press Run"
ALL_MODELS = "All models"

# what the parts hold that callers of the tab (the main window, the screenshots, the tests) reach directly
PLOT_NAMES = (
    "pareto_plot",
    "latency_plot",
    "size_plot",
    "quality_plot",
    "latency_bars",
    "latency_whiskers",
    "size_bars",
    "quality_bars",
    "scatter",
    "front_line",
    "front_lines",
    "pareto_legend",
    "highlighted_ids",
    "generation",
)
AB_NAMES = (
    "a_combo",
    "b_combo",
    "examples_spin",
    "compare_button",
    "cancel_button",
    "progress",
    "ab_status",
    "metrics_table",
    "disagreements_table",
    "layer_combo",
    "layer_info",
    "hist_plot",
    "hist_a",
    "hist_b",
    "hist_legend",
    "set_ab",
    "compare_ab",
    "select_layer",
)


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
        self._refreshing = False
        self._build()
        for name in PLOT_NAMES:
            setattr(self, name, getattr(self.plots, name))
        for name in AB_NAMES:
            setattr(self, name, getattr(self.ab_panel, name))
        document.variants_changed.connect(self.refresh)
        document.model_changed.connect(self._on_open_model_changed)
        self.refresh()

    @property
    def ab(self) -> ABSession | None:
        """The comparison on screen."""
        return self.ab_panel.ab

    @property
    def overlay(self) -> Overlay | None:
        """The layer histograms on screen."""
        return self.ab_panel.overlay

    @property
    def fronts(self) -> dict[tuple[str, str | None], list[str]]:
        """(model, quality metric) -> the variant ids on its Pareto front."""
        return self.plots.fronts

    @property
    def _plotted(self) -> list[dict[str, Any]]:
        return self.plots.plotted

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
        self.table = VariantTable()
        self.table_model, self.proxy = self.table.table_model, self.table.proxy
        self._sort_title, self._sort_order = "Created", Qt.SortOrder.AscendingOrder
        self.table.horizontalHeader().sortIndicatorChanged.connect(self._on_sort_changed)
        self.proxy.layoutChanged.connect(self._on_layout_changed)
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

        # plots and the A/B panel
        self.plots = ComparePlots(self)
        self.plots.point_clicked.connect(self._on_point_clicked)
        self.ab_panel = ABPanel(self.document, self.table_model.label)
        self.ab_panel.compare_started.connect(lambda *_ids: self.tabs.setCurrentWidget(self.ab_panel))
        for signal in ("compare_started", "compare_finished", "compare_failed", "histogram_shown"):
            getattr(self.ab_panel, signal).connect(getattr(self, signal))
        self.tabs = QTabWidget()
        for plot, title in self.plots.tabs():
            self.tabs.addTab(plot, title)
        self.tabs.addTab(self.ab_panel, "A/B comparison")
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

    def apply_theme(self) -> None:
        self.ab_panel.apply_theme()
        self.error_banner.restyle()
        self.plots.apply_theme()
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
            self.table.fit_columns()
            self._fill_batches()
            self.ab_panel.set_rows(rows)
            self.table.select_ids([i for i in selected if self.table_model.row_of(i) >= 0])
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

    def batch(self) -> str | None:
        return self.batch_combo.currentData()

    def plotted_rows(self) -> list[dict[str, Any]]:
        """Rows in the bar charts, in the table's current order."""
        by_id = {r["id"]: r for r in self.rows}
        return [by_id[i] for i in self.table.shown_ids() if i in by_id]

    def sort_by(self, title: str, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        """Sort the table by the column whose header starts with `title` (what a header click does)."""
        self.table.sort_by(title, order)

    def _update_plots(self) -> None:
        selected = set(self.selected_ids())
        self.plots.show_rows(self.plotted_rows(), self.rows, self.table_model.names, selected, self.batch())
        shown = self.plots.generation.has_rows()  # the generation tabs only for variants that generate
        for plot, _title in self.plots.generation.tabs():
            self.tabs.setTabVisible(self.tabs.indexOf(plot), shown)

    def _on_point_clicked(self, vid: str, add: bool) -> None:
        """A click on a point selects its row; with Ctrl it is added to the selection (two: A/B)."""
        if add:
            self.table.select_ids([*self.selected_ids(), vid])
        else:
            self.select_variant(vid)

    # ---------------------------------------------------------------------------- selection

    def selected_ids(self) -> list[str]:
        """Selected variants in the table's order."""
        return self.table.selected_ids() if hasattr(self, "table") else []

    def current_variant_id(self) -> str | None:
        """The variant File > Export means: the selected one (the current row when several are)."""
        return self.table.current_variant_id()

    def select_variant(self, vid: str) -> bool:
        if self.table_model.row_of(vid) < 0:
            return False
        self.table.select_ids([vid])
        return True

    def _on_selection_changed(self, *_args: Any) -> None:
        ids = self.selected_ids()
        self._update_plots()
        self._update_actions()
        self.selection_changed.emit(ids)
        if self._refreshing or len(ids) != 2:
            return
        self.ab_panel.set_ab(ids[0], ids[1])
        pair = (self.ab.a["id"], self.ab.b["id"]) if self.ab is not None else None
        if pair != (ids[0], ids[1]):
            self.ab_panel.compare_ab()

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
            self.ab_panel.set_ab(*ids)
            self.ab_panel.compare_ab()

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

    # ---------------------------------------------------------------------------- state

    def cancel(self) -> None:
        """Esc: stop waiting for the comparison and the histogram (late results are ignored)."""
        self.ab_panel.cancel()

    def save_state(self, settings: QSettings) -> None:
        settings.setValue("compare_view/main_split", self.main_split.saveState())
        self.ab_panel.save_state(settings)

    def restore_state(self, settings: QSettings) -> None:
        value = settings.value("compare_view/main_split")
        if value is not None:
            self.main_split.restoreState(value)
        self.ab_panel.restore_state(settings)

    def shutdown(self) -> None:
        self.cancel()
