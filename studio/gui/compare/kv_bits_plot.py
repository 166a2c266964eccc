"""The Compare tab's "KV-cache bits vs quality vs memory" plot: for the `kv_cache.quantize` variants with
generation metrics and the originals they are measured against, the bits per cached value (x, a log-2 axis: 2, 4, 8, 16, 32), perplexity (y, or
generation match when no row has perplexity) and the KV cache's bytes after prompt + new tokens (the
point's area, and its label). An original's float cache sits at its dtype's bits; a `kv_cache.quantize`
variant at its step's `bits`, coloured by its method. Other variants (quantized weights, a float cache)
are left out: at 32 or 16 bits they would pile up on the original's point and say nothing about the cache.
The legend sits under the plot, so it never covers a point.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtGui import QColor, QFont

from studio.gui.widgets import add_plot_export_action, plot_colors, style_legend
from studio.units import human_bytes
from studio.variant_rows import (
    KV_CACHE_TECHNIQUE,
    generation_quality,
    kv_cache_bits,
    kv_cache_bytes,
    label,
    steps,
)

QUALITY_KEYS = ("perplexity", "generation_match")  # perplexity first: it is what the cache's bits change
AXIS = {
    "perplexity": "perplexity on the evaluation text (lower is better)",
    "generation_match": "generation match (share of greedy tokens as the original's; 1 = same)",
}
FLOAT_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}
MIN_SIZE, MAX_SIZE = 10.0, 38.0  # point diameters (px) of the smallest and largest cache
METHOD_COLORS = {"quanto": QColor(220, 120, 40), "turboquant": QColor(150, 80, 200)}


def cache_bits(row: dict[str, Any]) -> float:
    """Bits per cached value: a kv_cache.quantize step's `bits`, else the float dtype the model runs in
    (a precision.half step's, float32 otherwise)."""
    bits = kv_cache_bits(row)
    if bits is not None:
        return bits
    for step in steps(row):
        if step.get("technique") == "precision.half":
            return float(FLOAT_BITS.get(str((step.get("params") or {}).get("dtype", "float16")), 16))
    return 32.0


def cache_method(row: dict[str, Any]) -> str:
    """The kv_cache.quantize step's method ("quanto", "turboquant"), or "float" for a float cache."""
    for step in steps(row):
        if step.get("technique") == KV_CACHE_TECHNIQUE:
            return str((step.get("params") or {}).get("method") or "quanto")
    return "float"


def quality_key(rows: list[dict[str, Any]], every_row: list[dict[str, Any]]) -> str | None:
    for key in QUALITY_KEYS:
        if any(generation_quality(r, every_row, key) is not None for r in rows if r["kind"] != "baseline"):
            return key
    return None


class KvBitsPlot:
    """One scatter per cache method; `points` holds what is drawn, by row id: (bits, quality, bytes)."""

    def __init__(self, axis_font: QFont) -> None:
        self.plot = pg.PlotWidget()
        self.points: dict[str, tuple[float, float, float | None]] = {}
        self.sizes: dict[str, float] = {}
        self.quality_key: str | None = None
        self._font = axis_font
        self._labels: list[pg.TextItem] = []
        self._scatters: dict[str, pg.ScatterPlotItem] = {}
        item = self.plot.getPlotItem()
        item.showGrid(x=True, y=True, alpha=0.15)
        for name in ("left", "bottom"):
            item.getAxis(name).enableAutoSIPrefix(False)
        item.setLabel("bottom", "KV-cache bits per cached value (log scale)")
        item.setLabel("left", "quality")
        # under the bottom axis (row 4 of the plot item's layout, the plot's column): clear of every point
        self.legend = pg.LegendItem(labelTextSize="9pt", colCount=4)
        item.layout.addItem(self.legend, 4, 1)
        self.highlight = pg.ScatterPlotItem(pen=pg.mkPen(plot_colors()["mean"], width=3), brush=None)
        self.highlight.setZValue(5)
        item.addItem(self.highlight)
        add_plot_export_action(self.plot, self.plot, "kv-bits")

    def _scatter(self, method: str) -> pg.ScatterPlotItem:
        if method not in self._scatters:
            colors = plot_colors()
            color = QColor(METHOD_COLORS.get(method, colors["bars"]))
            fill = QColor(color)
            fill.setAlpha(150)
            scatter = pg.ScatterPlotItem(pen=pg.mkPen(color, width=1.2), brush=pg.mkBrush(fill))
            self.plot.getPlotItem().addItem(scatter)
            self._scatters[method] = scatter
        return self._scatters[method]

    def redraw(self, rows: list[dict[str, Any]], every_row: list[dict[str, Any]], selected: set[str]) -> None:
        """Draw the originals and kv_cache.quantize variants among `rows` (those with generation metrics)
        that have a quality score."""
        rows = [r for r in rows if r["kind"] == "baseline" or kv_cache_bits(r) is not None]
        key = quality_key(rows, every_row)
        self.quality_key = key
        self.points = {}
        by_method: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            q = generation_quality(r, every_row, key) if key else None
            if q is None:
                continue
            self.points[r["id"]] = (cache_bits(r), q, kv_cache_bytes(r))
            by_method.setdefault(cache_method(r), []).append(r)
        sizes = [b for _x, _y, b in self.points.values() if b]
        top = max(sizes, default=0.0)
        self.sizes = {
            vid: (MIN_SIZE + (MAX_SIZE - MIN_SIZE) * math.sqrt(b / top)) if b and top else MIN_SIZE
            for vid, (_x, _y, b) in self.points.items()
        }
        self.legend.clear()
        for method in sorted(set(self._scatters) | set(by_method), key=lambda m: (m != "float", m)):
            scatter = self._scatter(method)
            members = by_method.get(method, [])
            scatter.setData(
                x=[math.log2(self.points[r["id"]][0]) for r in members],
                y=[self.points[r["id"]][1] for r in members],
                size=[self.sizes[r["id"]] for r in members],
                data=[r["id"] for r in members],
            )
            if members:
                self.legend.addItem(scatter, "float cache" if method == "float" else f"{method} cache")
        chosen = [vid for vid in self.points if vid in selected]
        self.highlight.setData(
            x=[math.log2(self.points[v][0]) for v in chosen],
            y=[self.points[v][1] for v in chosen],
            size=[self.sizes[v] + 8 for v in chosen],
        )
        style_legend(self.legend)
        self._label_points(rows)
        self._finish_axes(key)

    def _label_points(self, rows: list[dict[str, Any]]) -> None:
        item = self.plot.getPlotItem()
        colors = plot_colors()
        drawn = [r for r in rows if r["id"] in self.points]
        while len(self._labels) < len(drawn):
            text = pg.TextItem("", anchor=(0, 0.5))
            text.setFont(self._font)
            item.addItem(text, ignoreBounds=True)
            self._labels.append(text)
        for i, text in enumerate(self._labels):
            if i >= len(drawn):
                text.hide()
                continue
            row = drawn[i]
            bits, q, size = self.points[row["id"]]
            memory = f"KV {human_bytes(int(size))}" if size is not None else "KV bytes not measured"
            method = cache_method(row)
            text.setText(f"{label(row)}\n{method} {bits:g}-bit · {memory}", color=colors["foreground"])
            text.setPos(math.log2(bits) + 0.12, q)
            text.show()

    def _finish_axes(self, key: str | None) -> None:
        item = self.plot.getPlotItem()
        item.setLabel("left", AXIS.get(key or "", "generation quality"))
        quantized = any(b != 32 and b != 16 for b, _q, _s in self.points.values())
        item.setTitle(
            "KV-cache bits vs quality vs memory (point area: KV-cache bytes after prompt + new tokens, batch 1)"
            if quantized
            else "KV-cache bits vs quality: no variant quantizes its KV cache (kv_cache.quantize)"
        )
        ticks = [1, 2, 3, 4, 8, 16, 32]
        item.getAxis("bottom").setTicks([[(math.log2(b), f"{b:g}") for b in ticks]])
        if not self.points:
            return
        xs = [math.log2(b) for b, _q, _s in self.points.values()]
        ys = np.array([q for _b, q, _s in self.points.values()], dtype=float)
        yspan = max(float(ys.max() - ys.min()), abs(float(ys.max())) * 0.02, 1e-4)
        # room on the right of the rightmost point for its two-line label, and for the largest point's area
        item.getViewBox().setRange(
            xRange=(min(xs) - 0.6, max(xs) + 1.4),
            yRange=(float(ys.min()) - yspan * 0.35, float(ys.max()) + yspan * 0.35),
            padding=0,
        )
