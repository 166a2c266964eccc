"""The Graph tab's side panel: what the clicked box is (a block's size and ops; a node's op, precision,
attributes, tensors with their shapes and weights) and the histogram of the node's largest weight, read
off the GUI thread (`DetailsMixin`, one part of `GraphView`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QSplitter, QTextBrowser, QWidget

from studio.gui.graph_scene import GraphScene
from studio.gui.widgets import plot_colors, style_plot
from studio.inspection.graph import Graph, GraphNode
from studio.inspection.graph_layout import Layout

HISTOGRAM_BINS = 64


def esc(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def shape_text(shape: Any) -> str:
    if shape is None:
        return "shape unknown"
    return "[" + ", ".join(str(d) for d in shape) + "]"


def block_html(box_id: str, members: int, ops: dict[str, int], value: str) -> str:
    lines = [f"<h3>{esc(box_id)}</h3>", f"<p>block of <b>{members}</b> nodes — double-click to expand</p>"]
    if value:
        lines.append(f"<p>{esc(value)}</p>")
    ranked = sorted(ops.items(), key=lambda x: -x[1])
    lines.append("<p>" + ", ".join(f"{esc(op)} ×{n}" for op, n in ranked) + "</p>")
    return "".join(lines)


def node_html(graph: Graph, node: GraphNode, block: str | None, value: str) -> str:
    lines = [
        f"<h3>{esc(node.name)}</h3>",
        f"<p>op <b>{esc(node.op)}</b> · precision {esc(node.precision or '–')} · block {esc(block or '–')}</p>",
    ]
    if value:
        lines.append(f"<p>{esc(value)}</p>")
    if node.attributes:
        attributes = [f"{esc(k)} = {esc(json.dumps(v)[:120])}" for k, v in node.attributes.items()]
        lines.append("<p><b>attributes</b><br>" + "<br>".join(attributes) + "</p>")
    for title, tensors in (("inputs", node.inputs), ("outputs", node.outputs)):
        rows = [f"{esc(t)} <i>{esc(shape_text(graph.shapes.get(t)))}</i>" for t in tensors]
        lines.append(f"<p><b>{title}</b><br>" + ("<br>".join(rows) or "–") + "</p>")
    if node.weights:
        weights = [
            f"{esc(w['name'])} {esc(shape_text(w['shape']))} {esc(w['dtype'])}"
            + (f" = {esc(', '.join(w['torch']))}" if w.get("torch") else "")
            for w in node.weights
        ]
        lines.append("<p><b>weights</b><br>" + "<br>".join(weights) + "</p>")
    return "".join(lines)


class NodeDetails(QSplitter):
    """The text above, the histogram below (hidden until a node with weights is shown)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(Qt.Orientation.Vertical, parent)
        self.text = QTextBrowser()
        self.text.setOpenLinks(False)
        self.text.setPlaceholderText("Click a box to see its op, attributes, tensors and weights.")
        self.hist = pg.PlotWidget()
        style_plot(self.hist)
        item = self.hist.getPlotItem()
        item.setLabel("bottom", "weight value")
        item.setLabel("left", "count")
        item.getAxis("bottom").enableAutoSIPrefix(False)
        item.getAxis("left").enableAutoSIPrefix(False)
        colors = plot_colors()
        self.curve = pg.PlotDataItem(
            [0.0, 1.0],
            [0],
            stepMode="center",
            fillLevel=0,
            pen=pg.mkPen(colors["bars"]),
            brush=colors["bars_fill"],
        )
        item.addItem(self.curve)
        self.hist.hide()
        self.addWidget(self.text)
        self.addWidget(self.hist)
        self.setSizes([420, 220])

    def clear(self) -> None:
        self.text.clear()
        self.hist.hide()

    def show_block(self, box_id: str, members: int, ops: dict[str, int], value: str) -> None:
        self.hist.hide()
        self.text.setHtml(block_html(box_id, members, ops, value))

    def show_node(self, graph: Graph, node: GraphNode, block: str | None, value: str) -> None:
        self.text.setHtml(node_html(graph, node, block, value))

    def show_histogram(self, result: Any) -> bool:
        """Draw a `HistogramResult`; False (and the plot hidden) when there is nothing to draw."""
        if result is None or not result.stats.counts:
            self.hist.hide()
            return False
        s = result.stats
        self.curve.setData(np.asarray(s.edges), np.asarray(s.counts, dtype=float))
        short = ".".join(s.name.split(".")[-3:])  # the panel is narrow: the tail names the weight
        self.hist.getPlotItem().setTitle(f"{short}: {s.params:,} values", size="9pt")
        self.hist.setToolTip(s.name)
        self.hist.show()
        return True


class DetailsMixin:
    """What `GraphView` does when a box is clicked (it provides the attributes used here)."""

    selected: str | None
    scene: GraphScene
    other_scene: GraphScene
    graph: Graph | None
    layout_: Layout | None
    other: Graph | None
    other_layout: Layout | None
    blocks: dict[str, str | None]
    panel: NodeDetails
    hist: Any
    key: str | None
    diff_key: str | None
    models: dict[str, Any]
    node_shown: Any
    histogram_shown: Any
    box_value: Callable[[str, bool], str]
    highlight_everywhere: Callable[[str], None]
    pane_of_box: Callable[[str], tuple[str | None, Graph | None, Layout | None]]
    _start: Callable[[str, Any, Any, str], None]

    def show_box(self, box_id: str) -> None:
        self.selected = box_id
        self.highlight_everywhere(box_id)
        key, graph, layout = self.pane_of_box(box_id)
        if graph is None or layout is None:
            return
        box = next((b for b in layout.boxes if b.id == box_id), None)
        if box is None:
            return
        value = self.box_value(box_id, box_id in self.scene.boxes)
        if box.collapsed:
            ops: dict[str, int] = {}
            for name in layout.members(box_id):
                op = graph.node(name).op
                ops[op] = ops.get(op, 0) + 1
            self.panel.show_block(box_id, box.members, ops, value)
            self.node_shown.emit(box_id)
            return
        node = graph.node(box_id)
        self.panel.show_node(graph, node, self.blocks.get(node.name), value)
        self.node_shown.emit(box_id)
        self._request_histogram(node, key)

    def _request_histogram(self, node: Any, key: str | None) -> None:
        matrices = [w for w in node.weights if len(w["shape"]) >= 1]
        model = self.models.get(key or "")
        if not matrices or model is None:
            self.hist.hide()
            return
        weight = max(matrices, key=lambda w: len(w["shape"]))

        def work() -> Any:
            from studio.inspection.histogram import compute_histogram

            refs = {r.name: r for r in model.tensors()}
            ref = refs.get(weight["name"]) or next(
                (refs[t] for t in weight.get("torch", []) if t in refs), None
            )
            return None if ref is None else compute_histogram(ref, HISTOGRAM_BINS)

        self._start("histogram", work, self._show_histogram, f"reading {weight['name']}…")

    def _show_histogram(self, result: Any) -> None:
        if self.panel.show_histogram(result):
            self.histogram_shown.emit(result.stats.name)
