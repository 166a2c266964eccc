"""The Model tab's whole-model panel: parameters by layer type (a bar chart and a table) and bytes by dtype.

It shows a `whole_model_summary`, computed from tensor headers, so it needs no weights; the longest
layer-type names are elided in the middle (their ends tell the types apart).
"""

from __future__ import annotations

from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QFont, QFontMetrics
from PySide6.QtWidgets import QTabWidget, QWidget

from studio.gui.widgets import (
    add_plot_export_action,
    add_table_export_action,
    fill_table,
    human_count,
    make_table,
    plot_colors,
    style_plot,
)
from studio.units import human_bytes


class WholeModelPanel(QTabWidget):
    TYPE_BARS = 7  # bars in the chart; smaller types are summed into one "other" bar

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.type_plot = pg.PlotWidget()
        self._setup_type_plot()
        add_plot_export_action(self.type_plot, self.type_plot, "parameters-by-layer-type")
        self.type_table = make_table(["Layer type", "Parameters", "Share"])
        add_table_export_action(self.type_table, "parameters-by-layer-type")
        self.dtype_table = make_table(["DType", "Tensors", "Parameters", "Bytes", "Share"])
        add_table_export_action(self.dtype_table, "bytes-by-dtype")
        self.addTab(self.type_plot, "Parameters by layer type")
        self.addTab(self.type_table, "Layer types (table)")
        self.addTab(self.dtype_table, "Bytes by dtype")

    def _setup_type_plot(self) -> None:
        colors = plot_colors()
        item = self.type_plot.getPlotItem()
        item.setTitle("Parameters by layer type")
        item.setLabel("bottom", "parameters")
        item.setLabel("left", "layer type")
        item.getAxis("bottom").enableAutoSIPrefix(False)
        item.getViewBox().invertY(True)
        item.setMouseEnabled(x=False, y=False)
        item.showGrid(x=True, alpha=0.15)
        self.type_bars = pg.BarGraphItem(
            x0=[], y=[], width=[], height=0.7, brush=colors["bars_fill"], pen=pg.mkPen(colors["bars"])
        )
        item.addItem(self.type_bars)
        self._tick_font = QFont(self.font())
        self._tick_font.setPointSizeF(max(7.0, self._tick_font.pointSizeF() * 0.9))
        self.type_plot.getAxis("left").setStyle(tickFont=self._tick_font)
        self.type_plot.getAxis("left").enableAutoSIPrefix(False)

    def apply_theme(self) -> None:
        colors = plot_colors()
        style_plot(self.type_plot)
        self.type_bars.setOpts(brush=colors["bars_fill"], pen=pg.mkPen(colors["bars"]))

    def show_summary(self, summary: dict[str, Any]) -> None:
        by_type = summary["by_type"]
        total = summary["params"] or 1
        shown = by_type[: self.TYPE_BARS]
        rest = by_type[self.TYPE_BARS :]
        if len(rest) == 1:
            shown = by_type
        elif rest:
            shown = [*shown, (f"{len(rest)} other types", sum(c for _, c in rest))]
        names = [n for n, _ in shown]
        top = max((c for _, c in shown), default=1)
        unit, div = next(((u, d) for u, d in (("millions", 1e6), ("thousands", 1e3)) if top >= d), ("", 1.0))
        widths = [c / div for _, c in shown]
        self.type_bars.setOpts(x0=[0] * len(widths), y=list(range(len(widths))), width=widths, height=0.7)
        axis = self.type_plot.getAxis("left")
        metrics = QFontMetrics(self._tick_font)
        labels = [metrics.elidedText(n, Qt.TextElideMode.ElideMiddle, 230) for n in names]
        axis.setWidth(min(250, max((metrics.horizontalAdvance(t) for t in labels), default=60) + 30))
        axis.setTicks([list(enumerate(labels))])
        item = self.type_plot.getPlotItem()
        in_all = f"; {human_count(summary['params'])} in all" if by_type else ""
        item.setLabel("bottom", f"parameters ({unit}{in_all})" if unit else f"parameters{in_all}")
        item.setTitle("Parameters by layer type" if by_type else "Parameters by layer type (no model open)")
        item.getAxis("bottom").setStyle(showValues=bool(by_type))
        item.getViewBox().setLimits(yMin=-1, yMax=max(len(names), 1))
        item.getViewBox().setRange(
            xRange=(0, max(widths, default=1) * 1.08), yRange=(-0.75, len(names) - 0.25), padding=0
        )
        fill_table(
            self.type_table,
            [(n, f"{c:,}", f"{100 * c / total:.1f} %") for n, c in by_type],
            align_right_from=1,
        )
        total_bytes = summary["bytes"] or 1
        fill_table(
            self.dtype_table,
            [
                (d, f"{t:,}", f"{p:,}", human_bytes(b), f"{100 * b / total_bytes:.1f} %")
                for d, (t, p, b) in summary["by_dtype"]
            ],
        )
