"""The Graph tab's diff pane: a second graph (A, the reference) drawn left of the shown one (B), its
boxes and B's marked added / removed / changed by the structural diff, with the diff's legend, and the
two canvases moving together.

`DiffPaneMixin` is one part of `GraphView`, which builds the widgets and calls `_paint_marks` whenever
boxes are laid out or repainted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtWidgets import QComboBox, QSplitter

from studio.gui.graph_legend import Legend
from studio.gui.graph_scene import MARK_COLORS, GraphCanvas, GraphScene
from studio.inspection.graph import Graph
from studio.inspection.graph_diff import graph_diff
from studio.inspection.graph_export import diff_marks
from studio.inspection.graph_layout import Layout, blocks_of, box_labels


def diff_combo() -> QComboBox:
    combo = QComboBox()
    combo.setMinimumContentsLength(16)
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setToolTip(
        "Diff: a second variant (A) drawn on the left; boxes are marked added, removed or changed"
    )
    return combo


class DiffPaneMixin:
    """The diff half of `GraphView` (which provides the attributes used here)."""

    diff_combo: QComboBox
    diff_key: str | None
    graph: Graph | None
    layout_: Layout | None
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
    _syncing: bool
    _paint: Callable[[], None]
    _relayout: Callable[..., None]
    _start: Callable[[str, Any, Any, str], None]
    _graph_task: Callable[[str], Any]
    fit: Callable[[], None]

    def _on_diff_chosen(self) -> None:
        key = self.diff_combo.currentData() or None
        self.diff_key = key
        if not key:
            self.other = self.other_layout = self.structure = None
            self.other_scene.clear()
            self.other_canvas.hide()
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
            self.structure = graph_diff(self.other, self.graph)
            self.other_canvas.show()
            half = max(200, self.canvas_split.width() // 2)
            self.canvas_split.setSizes([half, half])
            self._relayout()
            self.fit()
            self.diff_shown.emit()

        self._start("diff", self._graph_task(key), shown, "reading the second graph…")

    def _paint_marks(self) -> Legend | None:
        """The diff's outlines on both canvases; the diff's legend, or None without a diff."""
        if self.structure is None or self.layout_ is None or self.other_layout is None:
            self.scene.mark_boxes({})
            return None
        marks_a, marks_b = diff_marks(self.structure)
        self.scene.mark_boxes(box_labels(self.layout_, marks_b, mixed="changed"))
        self.other_scene.mark_boxes(box_labels(self.other_layout, marks_a, mixed="changed"))
        return self._diff_legend()

    def _diff_legend(self) -> Legend:
        s = self.structure or {"added": [], "removed": [], "changed": []}
        return Legend(
            "diff: A (left) → B (right), box outlines",
            categories=[
                (f"added in B ({len(s['added'])} nodes)", MARK_COLORS["added"]),
                (f"removed from A ({len(s['removed'])} nodes)", MARK_COLORS["removed"]),
                (f"changed ({len(s['changed'])}: fused, quantized, …)", MARK_COLORS["changed"]),
            ],
        )

    def _sync(self, source: GraphCanvas, target: GraphCanvas) -> None:
        if self._syncing or not target.isVisible():
            return
        self._syncing = True
        try:
            target.follow(source)
        finally:
            self._syncing = False
