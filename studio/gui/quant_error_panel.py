"""The Model tab's quantization error of a workspace variant: per quantized layer (weight-only RTN, GPTQ,
AWQ, dynamic INT8, SmoothQuant W8A8), the float weights of the checkpoint the variant was made from and
the dequantized ones as two histograms on the same bins, with the relative L2 error, the bits and the
group size; and every layer's relative error in a column of the tree.

The comparison is `studio.inspection.quant_error`. It needs the variant's module (its layers hold the
codes) and the source checkpoint, so the whole-model pass runs on a pool thread after a variant opens, and
each layer's histograms are computed off-thread too; a result that arrives after the model or the
selection moved on is dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QColor

from studio.gui.widgets import (
    fill_table,
    fmt,
    histogram_curve,
    plot_colors,
    run_task,
    style_legend,
    style_plot,
)
from studio.inspection.quant_error import LayerError, VariantQuantError, open_variant_quant_error

if TYPE_CHECKING:
    from studio.gui.model_view import ModelView

ERROR_COLUMN = 4  # the tree's column of per-layer relative error
ERROR_TITLE = "Quant. error"
# Relative L2 errors above these read as large / moderate in the tree's colour (int4 RTN on a small LM
# sits near 0.09, int8 near 0.005).
HIGH_ERROR = 0.15
MODERATE_ERROR = 0.05


def percent(value: float) -> str:
    return f"{100 * value:.3g} %"


class QuantErrorPanel(QObject):
    """Owns the comparison plot (a page of the Model tab's plot stack) and the tree's error column."""

    errors_shown = Signal(int)  # quantized layers whose error is in the tree
    layer_shown = Signal(str)  # a layer's comparison is on screen

    def __init__(self, view: ModelView) -> None:
        super().__init__(view)
        self.view = view
        self.report: VariantQuantError | None = None
        self.errors: dict[str, float] = {}
        self.current: LayerError | None = None
        self.current_layer = ""
        self._open_task: Any = None
        self._task: Any = None
        self.plot = pg.PlotWidget()
        self._setup_plot()

    # ---------------------------------------------------------------------------- plot

    def _setup_plot(self) -> None:
        colors = plot_colors()
        item = self.plot.getPlotItem()
        item.setLabel("bottom", "weight value (the float checkpoint's units)")
        item.setLabel("left", "count (values per bin)")
        for axis in ("bottom", "left"):
            item.getAxis(axis).enableAutoSIPrefix(False)
        item.showGrid(x=True, y=True, alpha=0.15)
        self.legend = item.addLegend(offset=(-10, 10), labelTextSize="9pt")
        self.float_curve = histogram_curve(colors)
        self.dq_curve = pg.PlotDataItem(
            [0.0, 1.0], [0], stepMode="center", pen=pg.mkPen(colors["mean"], width=1.6)
        )
        item.addItem(self.float_curve)
        item.addItem(self.dq_curve)
        self.legend.addItem(self.float_curve, "float")
        self.legend.addItem(self.dq_curve, "dequantized")
        style_legend(self.legend)

    def apply_theme(self) -> None:
        colors = plot_colors()
        style_plot(self.plot)
        self.float_curve.setPen(pg.mkPen(colors["bars"], width=1))
        self.float_curve.setBrush(colors["bars_fill"])
        self.dq_curve.setPen(pg.mkPen(colors["mean"], width=1.6))
        style_legend(self.legend)

    # ---------------------------------------------------------------------------- the whole model

    def model_changed(self) -> None:
        """Forget the old model's layers; for a workspace variant, find its quantized layers and their
        errors in the background."""
        self._cancel(all_tasks=True)
        self.report, self.errors, self.current, self.current_layer = None, {}, None, ""
        self.view.tree.setColumnHidden(ERROR_COLUMN, True)
        model = self.view.document.model
        if model is None or not model.runnable or not (model.path / "manifest.json").is_file():
            return

        def compute() -> tuple[VariantQuantError | None, dict[str, float]]:
            report = open_variant_quant_error(model)
            return report, (report.relative_errors() if report is not None else {})

        self._open_task = run_task(compute, on_done=self._on_errors, on_error=self._on_open_error)
        self.view.busy_label.setText("comparing the quantized layers with the original…")

    def _on_errors(self, token: int, result: tuple[VariantQuantError | None, dict[str, float]]) -> None:
        if self._open_task is None or token != self._open_task.token:
            return
        self._open_task = None
        self.view.busy_label.setText("")
        self.report, self.errors = result
        if self.report is None:
            return
        self._fill_column()
        self.errors_shown.emit(len(self.errors))
        path = self.view.selected_path()
        if path and self.layer_for(path):
            self.show(path)

    def _on_open_error(self, token: int, message: str) -> None:
        if self._open_task is None or token != self._open_task.token:
            return
        self._open_task = None
        self.view.busy_label.setText("")
        self.view.document.status.emit(f"cannot compare the quantized layers with the original: {message}")

    def _fill_column(self) -> None:
        self.view.tree.setColumnHidden(ERROR_COLUMN, not self.errors)
        for path, value in self.errors.items():
            cell = self.view.error_cells.get(path)
            if cell is None:
                continue
            cell.setText(percent(value))
            layer = self.report.layers[path] if self.report is not None else None
            cell.setToolTip(
                "relative L2 error of the dequantized weight against the original's"
                + (f" ({layer.scheme})" if layer is not None else "")
            )
            if value >= HIGH_ERROR:
                cell.setForeground(QColor(200, 60, 60))
            elif value >= MODERATE_ERROR:
                cell.setForeground(QColor(200, 140, 30))

    # ---------------------------------------------------------------------------- one layer

    def layer_for(self, path: str) -> str | None:
        """The quantized layer a selected tree path stands for: the layer's row or its weight's codes."""
        return self.report.layer_of(path) if self.report is not None else None

    def show(self, path: str) -> bool:
        """Show the comparison of the layer `path` stands for; False when it is not a quantized layer of
        the open variant with an original (the caller then shows what it shows for any tensor)."""
        layer = self.layer_for(path)
        if layer is None or self.report is None or self.report.source_tensor(layer) is None:
            return False
        self._cancel()
        self.current_layer = layer
        bins = self.view.bins_spin.value()
        report = self.report
        self.view.busy_label.setText(f"dequantizing {layer}…")
        self._task = run_task(
            lambda: report.error(layer, bins), on_done=self._on_layer, on_error=self._on_layer_error
        )
        return True

    def _on_layer(self, token: int, result: LayerError | None) -> None:
        if self._task is None or token != self._task.token:
            return
        self._task = None
        self.view.busy_label.setText("")
        if result is None:
            return
        self.current = result
        self._draw(result)
        self.layer_shown.emit(result.layer.name)

    def _on_layer_error(self, token: int, message: str) -> None:
        if self._task is None or token != self._task.token:
            return
        self._task = None
        self.view.busy_label.setText("")
        self.view.show_message(f"Cannot compare {self.current_layer} with the original:\n{message}")

    def _draw(self, result: LayerError) -> None:
        layer = result.layer
        edges = np.asarray(result.edges)
        log = self.view.log_check.isChecked()
        item = self.plot.getPlotItem()
        item.setLogMode(x=False, y=log)
        item.setLabel("left", "count (values per bin, log scale)" if log else "count (values per bin)")
        fill = -0.3 if log else 0
        self.float_curve.setData(edges, np.asarray(result.float_counts, dtype=float))
        self.float_curve.setFillLevel(fill)
        self.dq_curve.setData(edges, np.asarray(result.dequantized_counts, dtype=float))
        source = self.report.source.source if self.report is not None else "the original"
        self.legend.clear()
        self.legend.addItem(self.float_curve, f"float ({source})")
        self.legend.addItem(self.dq_curve, f"dequantized int{layer.bits} ({layer.kind})")
        style_legend(self.legend)
        item.setTitle(f"{layer.name}: float vs dequantized, relative L2 error {percent(result.relative_l2)}")
        peak = max(max(result.float_counts), max(result.dequantized_counts), 1)
        y_range = (np.log10(0.5), np.log10(peak) + 1.0) if log else (0.0, peak * 1.4)
        item.getViewBox().setRange(xRange=(float(edges[0]), float(edges[-1])), yRange=y_range, padding=0.02)
        group = (
            "whole tensor"
            if layer.group_size is None
            else ("whole row" if layer.group_size == layer.shape[1] else f"{layer.group_size} columns")
        )
        rows = [
            ("layer", layer.name),
            ("layer type", layer.kind),
            ("quantization", layer.scheme),
            ("bits", str(layer.bits)),
            ("group size (columns per scale)", group),
            ("shape (out × in)", f"{layer.shape[0]}×{layer.shape[1]}"),
            ("relative L2 error ‖Ŵ − W‖ / ‖W‖", percent(result.relative_l2)),
            ("RMS error", fmt(result.rms)),
            ("compared with", f"{result.source_tensor} of {source}"),
        ]
        if result.rescaled:
            rows.append(("rescaling (AWQ / SmoothQuant)", "fitted row and column factors taken out"))
        fill_table(self.view.stats_table, rows)
        self.view.show_page(self.plot)

    def redraw(self) -> None:
        """The log axis changed: draw the current comparison again."""
        if self.current is not None and self.view.plot_stack.currentWidget() is self.plot:
            self._draw(self.current)

    # ---------------------------------------------------------------------------- tasks

    def cancel(self) -> None:
        """Stop waiting for the selected layer's comparison (the whole-model pass goes on)."""
        self._cancel()

    def shutdown(self) -> None:
        self._cancel(all_tasks=True)

    def _cancel(self, all_tasks: bool = False) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if all_tasks and self._open_task is not None:
            self._open_task.cancel()
            self._open_task = None
