"""The Graph tab's diff panes: a second graph (A, the reference) drawn left of the shown one (B), and up
to two more variants (C, D) on the right, each diffed against the reference: boxes marked added, removed,
changed, or "plumbing" (an ONNX graph's glue no module of a torch original stands for), a legend per
pane, and every canvas following the one being moved by matched node: it centres the counterpart of the
box in the middle of the moved canvas.

`DiffPaneMixin` is one part of `GraphView`, which builds the first two canvases and calls `_layout_panes`
and `_paint_marks` whenever boxes are laid out or repainted. Without A, the shown graph is the reference
of the extra panes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QSplitter

from studio.gui.graph_legend import Legend
from studio.gui.graph_scene import MARK_COLORS, GraphCanvas, GraphScene
from studio.inspection.graph import Graph
from studio.inspection.graph_diff import Counterparts, graph_diff
from studio.inspection.graph_export import diff_marks
from studio.inspection.graph_layout import Layout, blocks_of, box_labels, layout_graph

MAX_EXTRA_PANES = 2  # with A and B: four graphs side by side


def diff_combo() -> QComboBox:
    combo = QComboBox()
    combo.setMinimumContentsLength(12)
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setToolTip(
        "Diff: a second variant (A) drawn on the left; boxes are marked added, removed or changed"
    )
    return combo


@dataclass
class Pane:
    """One more graph beside A and B, diffed against the reference."""

    key: str
    graph: Graph
    scene: GraphScene
    canvas: GraphCanvas
    blocks: dict[str, str | None] = field(default_factory=dict)
    layout: Layout | None = None
    structure: dict[str, Any] | None = None


def box_members(layout: Layout) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, box in layout.item_of.items():
        out.setdefault(box, []).append(name)
    return out


class DiffPaneMixin:
    """The diff half of `GraphView` (which provides the attributes used here)."""

    diff_combo: QComboBox
    pane_combo: QComboBox
    diff_key: str | None
    key: str | None
    graph: Graph | None
    layout_: Layout | None
    expanded: set[str]
    other: Graph | None
    other_blocks: dict[str, str | None]
    other_layout: Layout | None
    structure: dict[str, Any] | None
    scene: GraphScene
    canvas: GraphCanvas
    other_scene: GraphScene
    other_canvas: GraphCanvas
    canvas_split: QSplitter
    models: dict[str, Any]
    graphs: dict[str, Graph]
    diff_shown: Any
    pane_added: Any
    _syncing: bool
    _paint: Callable[[], None]
    _relayout: Callable[..., None]
    _start: Callable[[str, Any, Any, str], None]
    _graph_task: Callable[[str], Any]
    show_box: Callable[[str], None]
    toggle: Callable[[str], None]
    extra: list[Pane]
    _links: Counterparts | None
    selected: str | None

    # ---------------------------------------------------------------------------- A

    def _on_diff_chosen(self) -> None:
        key = self.diff_combo.currentData() or None
        self.diff_key = key
        if not key:
            self.other = self.other_layout = self.structure = None
            self.other_scene.clear()
            self.other_canvas.hide()
            self._rediff()
            self._paint()
            return
        if self.graph is None:
            return  # shown once the graph is

        def shown(result: tuple[Any, Graph]) -> None:
            if self.diff_key != key or self.graph is None:
                return
            self.models[key], self.graphs[key] = result
            self.other = result[1]
            self.other_blocks = blocks_of(self.other)
            self.other_canvas.show()
            self._rediff()
            self._share_widths()
            self._relayout()
            self.fit()
            self.diff_shown.emit()

        self._start("diff", self._graph_task(key), shown, "reading the second graph…")

    # ---------------------------------------------------------------------------- C, D

    def _on_pane_chosen(self, index: int) -> None:
        key = self.pane_combo.itemData(index)
        self.pane_combo.setCurrentIndex(0)
        if key:
            self.add_pane(key)

    def add_pane(self, key: str) -> None:
        """One more graph on the right (up to two), diffed against the reference and linked by node."""
        if len(self.extra) >= MAX_EXTRA_PANES or self.graph is None:
            return

        def shown(result: tuple[Any, Graph]) -> None:
            if len(self.extra) >= MAX_EXTRA_PANES or self.graph is None:
                return
            self.models[key], self.graphs[key] = result
            scene = GraphScene(self.canvas)
            canvas = GraphCanvas(scene)
            pane = Pane(key, result[1], scene, canvas, blocks_of(result[1]))
            self.extra.append(pane)
            self.canvas_split.addWidget(canvas)
            scene.box_clicked.connect(self.show_box)
            scene.box_double_clicked.connect(self.toggle, Qt.ConnectionType.QueuedConnection)
            canvas.navigated.connect(lambda: self._sync(canvas))
            self._rediff()
            self._share_widths()
            self._relayout()
            self.fit()
            self.pane_added.emit(key)

        self._start(f"pane:{key}", self._graph_task(key), shown, "reading another graph…")

    def clear_panes(self) -> None:
        for pane in self.extra:
            pane.canvas.hide()
            pane.canvas.setParent(None)
            pane.canvas.deleteLater()
        self.extra = []
        self._rediff()
        self._paint()

    def _share_widths(self) -> None:
        shown = [c for c in self.canvases() if c.isVisible() or c in [p.canvas for p in self.extra]]
        width = max(200, self.canvas_split.width() // max(1, len(shown)))
        self.canvas_split.setSizes(
            [width if self.other is not None else 0, width] + [width] * len(self.extra)
        )

    # ---------------------------------------------------------------------------- the diffs

    def reference(self) -> Graph | None:
        return self.other if self.other is not None else self.graph

    def panes(self) -> list[tuple[Graph, GraphCanvas]]:
        """Every graph shown with its canvas, the reference first (A when there is one, else B)."""
        out: list[tuple[Graph, GraphCanvas]] = []
        if self.other is not None:
            out.append((self.other, self.other_canvas))
        if self.graph is not None:
            out.append((self.graph, self.canvas))
        return out + [(p.graph, p.canvas) for p in self.extra]

    def _rediff(self) -> None:
        """The diff of every shown graph against the reference, and the counterparts linking them."""
        reference = self.reference()
        self.structure = graph_diff(self.other, self.graph) if self.other and self.graph else None
        for pane in self.extra:
            pane.structure = graph_diff(reference, pane.graph) if reference is not None else None
        diffs = ([self.structure] if self.structure is not None else []) + [
            p.structure for p in self.extra if p.structure is not None
        ]
        self._links = Counterparts(diffs) if diffs else None

    def _layout_panes(self) -> None:
        if self.other is not None:
            self.other_layout = layout_graph(self.other, self.expanded, self.other_blocks)
            self.other_scene.show_layout(self.other_layout)
        for pane in self.extra:
            pane.layout = layout_graph(pane.graph, self.expanded, pane.blocks)
            pane.scene.show_layout(pane.layout)

    def _paint_marks(self) -> Legend | None:
        """The diff's outlines on every canvas and the extra panes' legends; A's legend, or None."""
        legend = None
        if self.structure is None or self.layout_ is None or self.other_layout is None:
            self.scene.mark_boxes({})
        else:
            marks_a, marks_b = diff_marks(self.structure)
            self.scene.mark_boxes(box_labels(self.layout_, marks_b, mixed="changed"))
            self.other_scene.mark_boxes(box_labels(self.other_layout, marks_a, mixed="changed"))
            legend = self._diff_legend()
        for pane in self.extra:
            if pane.structure is None or pane.layout is None:
                continue
            pane.scene.mark_boxes(box_labels(pane.layout, diff_marks(pane.structure)[1], mixed="changed"))
            pane.canvas.legend.set_legend(self._diff_legend(pane.structure, "the reference", "this graph"))
        return legend

    def _diff_legend(self, structure: dict[str, Any] | None = None, a: str = "A", b: str = "B") -> Legend:
        s = structure or self.structure or {"added": [], "removed": [], "changed": []}
        title = "diff: A (left) → B (right), box outlines" if a == "A" else f"diff: {a} → {b}, box outlines"
        categories = [
            (f"added in {b} ({len(s['added'])} nodes)", MARK_COLORS["added"]),
            (f"removed from {a} ({len(s['removed'])} nodes)", MARK_COLORS["removed"]),
            (f"changed ({len(s['changed'])}: fused, quantized, …)", MARK_COLORS["changed"]),
        ]
        if s.get("plumbing"):
            categories.append((f"plumbing ({len(s['plumbing'])}: no torch module)", MARK_COLORS["plumbing"]))
        return Legend(title, categories=categories)

    # ---------------------------------------------------------------------------- navigation

    def pane_of_box(self, box_id: str) -> tuple[str | None, Graph | None, Layout | None]:
        """(choice key, graph, layout) of the pane a clicked box belongs to: B first, then A, C, D."""
        if box_id in self.scene.boxes:
            return self.key, self.graph, self.layout_
        if box_id in self.other_scene.boxes and self.other is not None:
            return self.diff_key, self.other, self.other_layout
        for pane in self.extra:
            if box_id in pane.scene.boxes:
                return pane.key, pane.graph, pane.layout
        return None, None, None

    def highlight_everywhere(self, box_id: str) -> None:
        """Highlight a box and, in every other pane, the box of its counterpart (or of the same name)."""
        panes = self.panes()
        graph = self.pane_of_box(box_id)[1]
        source = next((i for i, (g, _) in enumerate(panes) if g is graph), None)
        for index, (_, canvas) in enumerate(panes):
            scene = canvas.graph_scene()
            match = box_id if index == source else None
            if match is None and source is not None:
                match = self.counterpart_box(source, index, box_id)
            scene.highlight(match if match is not None else box_id)

    def canvases(self) -> list[GraphCanvas]:
        return [self.other_canvas, self.canvas] + [p.canvas for p in self.extra]

    def counterpart_box(
        self, source: int, target: int, box_id: str, members: dict[str, list[str]] | None = None
    ) -> str | None:
        """The box of pane `target` (in `panes()` order) showing a counterpart of a node in box `box_id`
        of pane `source` (`members`: the source layout's `box_members`, when already at hand)."""
        panes = self.panes()
        if self._links is None or not (0 <= source < len(panes) and 0 <= target < len(panes)):
            return None
        source_layout, target_layout = self._pane_layout(source), self._pane_layout(target)
        if source_layout is None or target_layout is None:
            return None
        names = (members if members is not None else box_members(source_layout)).get(box_id, [box_id])
        for name in names:
            for match in self._links.of(source, target, name):
                if match in target_layout.item_of:
                    return target_layout.item_of[match]
        return None

    def _pane_layout(self, index: int) -> Layout | None:
        layouts = ([self.other_layout] if self.other is not None else []) + [self.layout_]
        layouts += [p.layout for p in self.extra]
        return layouts[index] if index < len(layouts) else None

    def _sync(self, source: GraphCanvas, target: GraphCanvas | None = None) -> None:
        """Every other visible canvas follows `source` (or just `target`): by the matched box nearest the
        middle of `source`, or by the scroll fractions where no box there has a counterpart."""
        if self._syncing:
            return
        panes = self.panes()
        canvases = [c for _, c in panes]
        if source not in canvases:
            return
        self._syncing = True
        try:
            src = canvases.index(source)
            layout = self._pane_layout(src)
            for index, canvas in enumerate(canvases):
                if (
                    canvas is source
                    or not canvas.isVisible()
                    or (target is not None and canvas is not target)
                ):
                    continue
                pair = self._nearest_matched(src, index, source, layout) if layout is not None else None
                if pair is None:
                    canvas.follow(source)
                else:
                    # graphs of one kind keep one zoom, box for box; a torch graph beside an ONNX one
                    # zooms relative to its own fit, or it would be drawn tiny beside the export
                    canvas.follow_box(source, *pair, relative_zoom=panes[index][0].kind != panes[src][0].kind)
        finally:
            self._syncing = False

    def _nearest_matched(
        self, source: int, target: int, canvas: GraphCanvas, layout: Layout
    ) -> tuple[str, str] | None:
        """(source box, target box): the selected box when it is in view and has a counterpart in pane
        `target`, else the box nearest the middle of `canvas` that has one."""
        boxes = canvas.graph_scene().boxes
        selected = self.selected
        if (
            selected is not None and selected in boxes and canvas.shows(selected)
        ):  # the box clicked or found leads
            match = self.counterpart_box(source, target, selected)
            if match is not None:
                return selected, match
        centre = canvas.centre()
        by_distance = sorted(
            layout.boxes,
            key=lambda b: math.hypot(b.x + b.w / 2 - centre.x(), b.y + b.h / 2 - centre.y()),
        )
        members = box_members(layout)
        for box in by_distance[:64]:  # a screenful: farther boxes would not line up what is on screen
            match = self.counterpart_box(source, target, box.id, members)
            if match is not None and box.id in boxes:
                return box.id, match
        return None
