"""The Compare tab's generation plots, for variants of causal LMs with generation metrics: decode tokens/s
and KV-cache memory as bars, and decode tokens/s against generation quality (generation match, or
perplexity) as a scatter with one Pareto front per model, and KV-cache bits against quality and memory
(`KvBitsPlot`). What a row's numbers mean comes from
`studio.variant_rows`; the bars share the look of the other bar charts (`ComparePlots.bar_plot`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QObject
from PySide6.QtGui import QColor

from studio.gui.compare.kv_bits_plot import KvBitsPlot
from studio.gui.widgets import add_plot_export_action, plot_colors, style_legend
from studio.variant_rows import (
    decode_tokens_per_s,
    generation_batch_sizes,
    generation_pareto,
    generation_quality,
    generation_quality_key,
    kv_cache_bits,
    kv_cache_bytes,
    label,
    row_label,
)

if TYPE_CHECKING:
    from studio.gui.compare.plots import ComparePlots

QUALITY_AXIS = {
    "generation_match": "generation match (share of greedy tokens as the original's; 1 = same)",
    "perplexity": "perplexity on the evaluation text (lower is better)",
}


def gen_tick(row: dict[str, Any], names: dict[str, str]) -> str:
    """A bar's tick: the row's label on two lines, with the KV-cache bits of a kv_cache.quantize variant."""
    head, _, tail = row_label(row, names).partition(" ")
    if len(tail) > 18:
        tail = tail[:17] + "…"
    bits = kv_cache_bits(row)
    text = f"{head}\n{tail}" if tail else head
    return f"{text}\nKV {bits:g}-bit" if bits is not None else text


def kv_unit(values: list[float]) -> tuple[float, str]:
    """The unit the KV-cache bars are drawn in: MB, or kB for caches under a megabyte (a small model's
    cache of a short context is a few kilobytes, which in MB reads as 0.00922)."""
    return (1e6, "MB") if max(values, default=0.0) >= 1e6 else (1e3, "kB")


class GenerationPlots(QObject):
    """Decode speed bars, KV-cache memory bars, and the speed / quality scatter."""

    def __init__(self, owner: ComparePlots) -> None:
        super().__init__(owner)
        self.owner = owner
        self.rows: list[dict[str, Any]] = []  # the rows drawn (those with generation metrics), in x order
        self.batch = "1"
        self.quality_key: str | None = None
        self.fronts: dict[tuple[str, str | None], list[str]] = {}
        self.speed_plot = pg.PlotWidget()
        self.kv_plot = pg.PlotWidget()
        self.gen_pareto_plot = pg.PlotWidget()
        self.speed_bars = owner.bar_plot(self.speed_plot, "Decode speed", "decode tokens/s")
        self.kv_bars = owner.bar_plot(self.kv_plot, "KV-cache memory", "KV cache (MB)")
        self.kv_unit = "MB"
        for plot in (self.speed_plot, self.kv_plot):  # ticks of three lines: id, steps, KV-cache bits
            plot.getPlotItem().getAxis("bottom").setHeight(3 * owner.host.fontMetrics().height() + 30)
        self.speed_legend = self._selection_legend(self.speed_plot)
        self.kv_legend = self._selection_legend(self.kv_plot)
        self._setup_pareto()
        self.kv_bits = KvBitsPlot(owner.axis_font())
        for plot, name in (
            (self.speed_plot, "decode-speed"),
            (self.kv_plot, "kv-cache"),
            (self.gen_pareto_plot, "tokens-vs-quality"),
        ):
            add_plot_export_action(plot, plot, name)

    def tabs(self) -> list[tuple[pg.PlotWidget, str]]:
        return [
            (self.speed_plot, "Decode speed"),
            (self.kv_plot, "KV cache"),
            (self.gen_pareto_plot, "Tokens/s vs quality"),
            (self.kv_bits.plot, "KV bits vs quality"),
        ]

    def _selection_legend(self, plot: pg.PlotWidget) -> pg.LegendItem:
        colors = plot_colors()
        selected = QColor(colors["mean"])
        selected.setAlpha(160)
        legend = plot.getPlotItem().addLegend(offset=(-10, 10), labelTextSize="9pt")
        sample = pg.BarGraphItem(x=[], height=[], width=0.6, brush=selected, pen=pg.mkPen(colors["mean"]))
        legend.addItem(sample, "selected in the table")
        style_legend(legend)
        return legend

    def _setup_pareto(self) -> None:
        colors = plot_colors()
        item = self.gen_pareto_plot.getPlotItem()
        item.setTitle("Decode speed vs generation quality")
        item.setLabel("bottom", "decode tokens/s")
        item.setLabel("left", "quality")
        item.showGrid(x=True, y=True, alpha=0.15)
        for name in ("left", "bottom"):
            item.getAxis(name).enableAutoSIPrefix(False)
        # bottom-left: faster variants sit right, better ones up (or down for perplexity); the corner
        # farthest from a good trade-off is the one least likely to hold points
        self.gen_legend = item.addLegend(offset=(10, -10), labelTextSize="9pt")
        self.gen_scatter = pg.ScatterPlotItem(
            size=14, pen=pg.mkPen(colors["bars"], width=1.2), brush=colors["bars_fill"], name="variant"
        )
        item.addItem(self.gen_scatter)
        self.gen_front = pg.PlotDataItem(
            [],
            [],
            pen=pg.mkPen(colors["foreground"], width=1.5, style=pg.QtCore.Qt.PenStyle.DashLine),
            symbol="d",
            symbolSize=7,
            symbolPen=None,
            symbolBrush=colors["foreground"],
            name="Pareto front",
        )
        item.addItem(self.gen_front)
        self.gen_highlight = pg.ScatterPlotItem(
            size=22, pen=pg.mkPen(colors["mean"], width=3), brush=None, name="selected", pxMode=True
        )
        self.gen_highlight.setZValue(5)
        item.addItem(self.gen_highlight)
        self._labels: list[pg.TextItem] = []
        style_legend(self.gen_legend)

    def has_rows(self) -> bool:
        return bool(self.rows)

    def redraw(
        self,
        rows: list[dict[str, Any]],
        every_row: list[dict[str, Any]],
        names: dict[str, str],
        selected: set[str],
    ) -> None:
        """Draw the rows (in the table's order) that have generation metrics at the smallest batch size."""
        batches = generation_batch_sizes(rows)
        self.batch = batches[0] if batches else "1"
        self.rows = [r for r in rows if decode_tokens_per_s(r, self.batch) is not None]
        colors = plot_colors()
        sel_fill = QColor(colors["mean"])
        sel_fill.setAlpha(160)
        brushes = [pg.mkBrush(sel_fill if r["id"] in selected else colors["bars_fill"]) for r in self.rows]
        xs = np.arange(len(self.rows), dtype=float)
        ticks = [[(i, gen_tick(r, names)) for i, r in enumerate(self.rows)]]
        owner = self.owner

        speed = np.array([decode_tokens_per_s(r, self.batch) for r in self.rows], dtype=float)
        self.speed_bars.setOpts(x=xs, height=speed, brushes=brushes)
        item = self.speed_plot.getPlotItem()
        item.setTitle(f"Decode speed at batch size {self.batch} (higher is better)")
        item.setLabel("left", f"decode tokens/s at batch {self.batch} (tokens/s)")
        top = float(np.nanmax(speed)) if len(speed) else 1.0
        owner.finish_bars(self.speed_plot, ticks, len(self.rows), 0.0, top * 1.15 or 1.0)
        owner.value_texts(self.speed_plot, [(x, v, f"{v:.3g}") for x, v in zip(xs, speed, strict=True)])

        kv = [kv_cache_bytes(r) for r in self.rows]
        scale, unit = kv_unit([b for b in kv if b is not None])
        self.kv_unit = unit
        kv_scaled = np.array([b / scale if b is not None else np.nan for b in kv], dtype=float)
        ok = np.isfinite(kv_scaled)
        self.kv_bars.setOpts(
            x=xs[ok], height=kv_scaled[ok], brushes=[b for b, k in zip(brushes, ok, strict=True) if k]
        )
        item = self.kv_plot.getPlotItem()
        item.setTitle("KV-cache memory after prompt + new tokens, batch 1 (lower is better)")
        item.setLabel("left", f"KV cache ({unit}, {'10⁶' if unit == 'MB' else '10³'} bytes)")
        top = float(np.nanmax(kv_scaled[ok])) if ok.any() else 0.0
        owner.finish_bars(self.kv_plot, ticks, len(self.rows), 0.0, top * 1.15 if top > 0 else 1.0)
        owner.value_texts(
            self.kv_plot, [(x, v, f"{v:.3g} {unit}") for x, v in zip(xs[ok], kv_scaled[ok], strict=True)]
        )
        self._update_pareto(every_row, names, selected)
        self.kv_bits.redraw(self.rows, every_row, selected)

    def _update_pareto(
        self, every_row: list[dict[str, Any]], names: dict[str, str], selected: set[str]
    ) -> None:
        rows, batch = self.rows, self.batch
        key = generation_quality_key(every_row)
        self.quality_key = key
        item = self.gen_pareto_plot.getPlotItem()
        pts, kept = [], []
        for r in rows:
            q = generation_quality(r, every_row, key) if key else None
            speed = decode_tokens_per_s(r, batch)
            if q is not None and speed is not None:
                pts.append((speed, q))
                kept.append(r)
        self.gen_scatter.setData(x=[p[0] for p in pts], y=[p[1] for p in pts], data=[r["id"] for r in kept])
        fronts = generation_pareto(kept, key, batch) if key else {}
        self.fronts = {k: [kept[i]["id"] for i in front] for k, front in fronts.items()}
        front = next(iter(fronts.values()), [])
        self.gen_front.setData([pts[i][0] for i in front], [pts[i][1] for i in front])
        chosen = [p for p, r in zip(pts, kept, strict=True) if r["id"] in selected]
        self.gen_highlight.setData(x=[p[0] for p in chosen], y=[p[1] for p in chosen])
        item.setLabel("bottom", f"decode tokens/s at batch {batch} (tokens/s)")
        item.setLabel("left", QUALITY_AXIS.get(key or "", "generation quality"))
        item.setTitle(
            "Decode speed vs generation quality"
            if pts
            else "Decode speed vs quality: no variant has both generation metrics and a quality score"
        )
        colors = plot_colors()
        while len(self._labels) < len(kept):
            text = pg.TextItem("", anchor=(-0.1, 0.5))
            text.setFont(self.owner.axis_font())
            item.addItem(text, ignoreBounds=True)
            self._labels.append(text)
        for i, text in enumerate(self._labels):
            if i < len(kept):
                text.setText(label(kept[i]), color=colors["foreground"])
                text.setPos(*pts[i])
                text.show()
            else:
                text.hide()
        if pts:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            xspan = max(max(xs) - min(xs), max(xs) * 0.1, 1e-3)
            yspan = max(max(ys) - min(ys), abs(max(ys)) * 0.02, 1e-4)
            item.getViewBox().setRange(
                xRange=(min(xs) - xspan * 0.2, max(xs) + xspan * 0.6),
                yRange=(min(ys) - yspan * 0.6, max(ys) + yspan * 0.35),
                padding=0,
            )
