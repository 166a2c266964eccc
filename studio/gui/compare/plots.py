"""The Compare tab's plots of the variants in the table: bar charts of latency (p50 bars, p95 whiskers),
size and quality loss, and a latency / quality scatter with one Pareto front per model and quality metric.

The bars follow the table's order and tint the selected rows; the scatter rings them, and a click on a
point asks the tab to select its row (`point_clicked`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import QWidget

from studio.gui.compare.generation_plots import GenerationPlots
from studio.gui.widgets import add_plot_export_action, fmt, plot_colors, style_legend, style_plot
from studio.variant_rows import (
    label,
    latency,
    metric_name,
    model_of,
    pareto_fronts,
    quality_score,
    row_label,
    size_mb,
)


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


class ComparePlots(QObject):
    """The four plots (tabs of the Compare tab) and what is drawn on them."""

    point_clicked = Signal(str, bool)  # variant id; True when Ctrl adds it to the selection

    def __init__(self, host: QWidget) -> None:
        super().__init__(host)
        self.host = host  # whose font the tick and point labels follow
        self.rows: list[dict[str, Any]] = []  # every row of the workspace (for the tooltips)
        self.plotted: list[dict[str, Any]] = []  # rows in the bar charts, in x order
        self.names: dict[str, str] = {}  # model source -> short name
        self.selected: set[str] = set()
        self.batch: str | None = None
        self._pareto_rows: list[dict[str, Any]] = []
        self._front: list[int] = []
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
        self.generation = GenerationPlots(self)  # shown when variants have generation metrics

    def tabs(self) -> list[tuple[pg.PlotWidget, str]]:
        """The plots with their tab titles, in tab order."""
        return [
            (self.pareto_plot, "Latency vs quality"),
            (self.latency_plot, "Latency"),
            (self.size_plot, "Size"),
            (self.quality_plot, "Quality"),
            *self.generation.tabs(),
        ]

    def axis_font(self) -> QFont:
        font = QFont(self.host.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.9))
        return font

    def bar_plot(self, plot: pg.PlotWidget, title: str, ylabel: str) -> pg.BarGraphItem:
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
        bottom.setStyle(tickFont=self.axis_font(), tickTextOffset=4)
        bottom.setHeight(2 * self.host.fontMetrics().height() + 30)
        bars = pg.BarGraphItem(
            x=[], height=[], width=0.6, brush=colors["bars_fill"], pen=pg.mkPen(colors["bars"])
        )
        item.addItem(bars)
        return bars

    def _setup_bars(self) -> None:
        colors = plot_colors()
        self.latency_bars = self.bar_plot(self.latency_plot, "Latency", "latency per batch (ms)")
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
        self.size_bars = self.bar_plot(self.size_plot, "Size on disk", "size on disk (MB)")
        self.quality_bars = self.bar_plot(
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

    def apply_theme(self) -> None:
        colors = plot_colors()
        for plot, _title in self.tabs():
            style_plot(plot)
        self.latency_whiskers.setData(pen=pg.mkPen(colors["foreground"], width=1.5))
        for i, line in enumerate(self.front_lines):
            self._style_front(line, i)
        self.highlight.setPen(pg.mkPen(colors["mean"], width=3))

    def show_rows(
        self,
        rows: list[dict[str, Any]],
        every_row: list[dict[str, Any]],
        names: dict[str, str],
        selected: set[str],
        batch: str | None,
    ) -> None:
        """Draw `rows` (the table's shown rows, in its order) at batch size `batch`, `selected` tinted."""
        self.plotted, self.rows, self.names, self.selected, self.batch = (
            rows,
            every_row,
            names,
            selected,
            batch,
        )
        self.redraw()

    def redraw(self) -> None:
        rows = self.plotted
        selected = self.selected
        colors = plot_colors()
        sel_fill = QColor(colors["mean"])
        sel_fill.setAlpha(160)
        brushes = [pg.mkBrush(sel_fill if r["id"] in selected else colors["bars_fill"]) for r in rows]
        xs = np.arange(len(rows), dtype=float)
        ticks = [[(i, tick_label(r, self.names)) for i, r in enumerate(rows)]]
        batch = self.batch

        # latency: p50 bars with p95 whiskers
        p50 = np.array([latency(r, batch) if batch else None for r in rows], dtype=float)
        p95 = np.array([latency(r, batch, "p95") if batch else None for r in rows], dtype=float)
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
        self.finish_bars(self.latency_plot, ticks, len(rows), 0.0, float(ymax) * 1.15 or 1.0)
        self.value_texts(
            self.latency_plot, [(x, v, f"{v:.3g}") for x, v in zip(xs[ok], p50[ok], strict=True)]
        )

        # size
        size = np.array([size_mb(r) for r in rows], dtype=float)
        ok = np.isfinite(size)
        self.size_bars.setOpts(
            x=xs[ok], height=size[ok], brushes=[b for b, k in zip(brushes, ok, strict=True) if k]
        )
        ymax = float(np.nanmax(size)) if ok.any() else 1.0
        self.finish_bars(self.size_plot, ticks, len(rows), 0.0, ymax * 1.15 or 1.0)
        self.value_texts(self.size_plot, [(x, v, f"{v:.3g}") for x, v in zip(xs[ok], size[ok], strict=True)])

        # quality: the loss (1 - quality) from 0, the original's level. A zoomed quality axis (0.885 ..)
        # made a difference of 0.01 look like a collapse; from 0 the bars compare honestly.
        scored = [quality_score(r, self.rows) for r in rows]
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
        self.finish_bars(self.quality_plot, ticks, len(rows), 0.0, top * 1.2 if top > 0 else 1e-3)
        self.value_texts(
            self.quality_plot,
            [
                (x, d, f"{v:.6g}" if d > 0 else f"{v:.6g} (same)")
                for x, d, v in zip(xs[ok], loss[ok], quality[ok], strict=True)
            ],
        )

        self._update_pareto(rows, scored)
        self.generation.redraw(rows, self.rows, self.names, selected)

    def finish_bars(
        self, plot: pg.PlotWidget, ticks: list[list[tuple[int, str]]], n: int, y0: float, y1: float
    ) -> None:
        item = plot.getPlotItem()
        item.getAxis("bottom").setTicks(ticks)
        item.getAxis("bottom").setStyle(showValues=n > 0)
        item.getViewBox().setRange(xRange=(-0.6, max(n, 1) - 0.4), yRange=(y0, y1), padding=0)

    def value_texts(self, plot: pg.PlotWidget, values: list[tuple[float, float, str]]) -> None:
        """Numbers above the bars, from a pool of text items reused across updates."""
        pool = self._value_labels.setdefault(id(plot), [])
        color = plot_colors()["foreground"]
        while len(pool) < len(values):
            text = pg.TextItem("", anchor=(-0.08, 1.0))  # just right of the bar's centre (and whisker)
            text.setFont(self.axis_font())
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
        batch = self.batch
        colors = plot_colors()
        pts, kept = [], []
        for r, (_k, q) in zip(rows, scored, strict=True):
            lat = latency(r, batch) if batch else None
            if lat is not None and q is not None:
                pts.append((lat, q))
                kept.append(r)
        self._pareto_rows = kept
        sizes = [size_mb(r) or 0.0 for r in kept]
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
            name = self.names.get(source, source)
            title = f"Pareto front, {name} ({metric_name(metric)})" if several else "Pareto front"
            line.opts["name"] = title
            self.pareto_legend.addItem(line, title)
        item.setLabel("bottom", f"latency p50 at batch size {batch} (ms)" if batch else "latency p50 (ms)")
        keys = sorted({k for k, q in scored if q is not None and k not in ("reference", "-")})
        item.setLabel("left", quality_axis_label(keys))
        several_models = len({model_of(r) for r in kept}) > 1
        while len(self._point_labels) < len(kept):
            text = pg.TextItem("", anchor=(0.0, 0.5))
            text.setFont(self.axis_font())
            item.addItem(text, ignoreBounds=True)
            self._point_labels.append(text)
        for i, text in enumerate(self._point_labels):
            if i < len(kept):
                # beside a point space is short: the model's name only when there is more than one
                name = self._label(kept[i]) if several_models else label(kept[i])
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
        selected = self.selected
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
        name = self._label(row) if row else str(data)
        size = size_mb(row) if row else None
        return f"{name}\nlatency p50 {x:.4g} ms\nquality {y:.6g}\nsize {fmt(size, '.4g')} MB"

    def _on_point_clicked(self, _item: Any, points: Any, event: Any = None) -> None:
        """A click on a point selects its row; with Ctrl it is added to the selection (two: A/B)."""
        if points is None or len(points) == 0:
            return
        vid = points[0].data()
        add = False
        if event is not None and hasattr(event, "modifiers"):
            add = bool(event.modifiers() & Qt.KeyboardModifier.ControlModifier)
        self.point_clicked.emit(vid, add)

    def _label(self, row: dict[str, Any]) -> str:
        return row_label(row, self.names)
