"""The Graph tab: the computation graph of the open model or one of its variants, laid out top to bottom
with every repeated block (a transformer layer) collapsed into one box until it is double-clicked.

Colours on the boxes show an overlay (the share of run time per node, the layer-wise error against
another model, the precision, or any per-node numbers from a JSON file) with a legend; a diff against a
second variant puts its graph beside this one, boxes marked added / removed / changed, both canvases
moving together. Clicking a box shows its op, attributes, tensors with their shapes and a histogram of
its weights. Graphs, profiles and layer errors are computed on the work thread (`widgets.work_pool`);
laying out and drawing are fast enough for the GUI thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from studio.gui.document import StudioDocument
from studio.gui.graph_choices import ChoicesMixin, open_choice
from studio.gui.graph_details import DetailsMixin, NodeDetails
from studio.gui.graph_diff_pane import DiffPaneMixin, Pane, diff_combo
from studio.gui.graph_exporting import ExportMixin
from studio.gui.graph_legend import Legend
from studio.gui.graph_overlays import OverlayMixin, overlay_combo
from studio.gui.graph_scene import GraphCanvas, GraphScene
from studio.gui.widgets import Banner, run_task, work_pool
from studio.inspection.graph import Graph
from studio.inspection.graph_diff import Counterparts
from studio.inspection.graph_layout import Layout, blocks_of, layout_graph


class GraphView(ChoicesMixin, OverlayMixin, DiffPaneMixin, DetailsMixin, ExportMixin, QWidget):
    graph_shown = Signal(str)  # the choice key whose graph is on screen
    overlay_shown = Signal(str)  # an overlay's colours are on the boxes
    diff_shown = Signal()
    pane_added = Signal(str)  # the choice key of a graph added beside the others
    laid_out = Signal()  # the boxes were laid out anew (a block expanded or collapsed, a graph shown)
    failed = Signal(str)
    node_shown = Signal(str)  # a box's details are in the side panel
    histogram_shown = Signal(str)  # the weight whose histogram is drawn

    def __init__(self, document: StudioDocument, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.models: dict[str, Any] = {}  # choice key -> opened checkpoint
        self.graphs: dict[str, Graph] = {}  # choice key -> its graph
        self.key: str | None = None  # what is shown
        self.diff_key: str | None = None
        self.graph: Graph | None = None
        self.blocks: dict[str, str | None] = {}
        self.layout_: Layout | None = None
        self.expanded: set[str] = set()
        self.other: Graph | None = None  # the diff's A
        self.other_blocks: dict[str, str | None] = {}
        self.other_layout: Layout | None = None
        self.structure: dict[str, Any] | None = None
        self.node_values: dict[str, float] = {}  # the overlay's numbers per node
        self.shares: dict[str, float] = {}
        self.unplaced_share = 0.0  # time in kernels no node of the graph names
        self.errors: dict[str, float] = {}
        self.overlay = "none"
        self.values_file: Path | None = None
        self.legend: Legend | None = None
        self.selected: str | None = None
        self._tasks: dict[str, Any] = {}  # purpose -> its newest task; older results are dropped
        self._stale = True
        self._syncing = False
        self._extra_choices: dict[str, str] = {}
        self.extra: list[Pane] = []  # graphs C, D beside A and B
        self._links: Counterparts | None = None
        self._build()
        document.model_changed.connect(self.on_model_changed)
        document.variants_changed.connect(self.refresh_choices)
        self.refresh_choices()

    # ---------------------------------------------------------------------------- layout

    def _build(self) -> None:
        self.banner = Banner("error")
        self.variant_combo = QComboBox()
        self.variant_combo.setMinimumContentsLength(12)
        self.variant_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.variant_combo.setToolTip("Whose graph: the open model or one of its variants in the workspace")
        self.diff_combo = diff_combo()
        self.overlay_combo = overlay_combo()
        self.search_edit = QLineEdit()
        self.search_edit.setPlaceholderText("Find a node by name…")
        self.search_edit.setClearButtonEnabled(True)
        self.search_edit.setMinimumWidth(100)
        self.fit_button = QPushButton("Fit")
        self.fit_button.setToolTip("Show the whole graph (a tall one fitted to its width)")
        self.collapse_button = QPushButton("Collapse all")
        self.pane_combo = QComboBox()
        self.pane_combo.setMinimumContentsLength(9)
        self.pane_combo.setToolTip(
            "Up to two more variants on the right, diffed against the reference (A, or the shown graph), "
            "every canvas following the others by matched node"
        )
        self.close_panes_button = QToolButton()
        self.close_panes_button.setText("✕")
        self.close_panes_button.setToolTip("Close the extra panes")
        self.export_button = QToolButton()
        self.export_button.setText("Export…")
        self.export_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.export_svg_action = self.export_button.addAction("Export SVG…")
        self.export_png_action = self.export_button.addAction("Export PNG…")
        self.export_table_action = self.export_button.addAction("Export table (CSV/JSON)…")
        self.busy = QProgressBar()
        self.busy.setRange(0, 0)
        self.busy.setMaximumWidth(120)
        self.busy.hide()
        self.busy_label = QLabel("")
        self.summary = QLabel("")

        bar = QHBoxLayout()
        for label, widget in (
            ("Graph of", self.variant_combo),
            ("Diff against", self.diff_combo),
            ("Overlay", self.overlay_combo),
            ("Also show", self.pane_combo),
        ):
            bar.addWidget(QLabel(label))
            bar.addWidget(widget)
            bar.addSpacing(6)
        bar.addWidget(self.close_panes_button)
        bar.addWidget(self.search_edit, 1)
        bar.addWidget(self.fit_button)
        bar.addWidget(self.collapse_button)
        bar.addWidget(self.export_button)

        self.scene = GraphScene(self)
        self.canvas = GraphCanvas(self.scene)
        self.other_scene = GraphScene(self)
        self.other_canvas = GraphCanvas(self.other_scene)
        self.other_canvas.hide()
        self.canvas_split = QSplitter(Qt.Orientation.Horizontal)
        self.canvas_split.addWidget(self.other_canvas)
        self.canvas_split.addWidget(self.canvas)

        self.panel = NodeDetails()
        self.details, self.hist = self.panel.text, self.panel.hist
        self.main_split = QSplitter(Qt.Orientation.Horizontal)
        self.main_split.addWidget(self.canvas_split)
        self.main_split.addWidget(self.panel)
        self.main_split.setStretchFactor(0, 1)
        self.main_split.setSizes([900, 340])

        status = QHBoxLayout()
        status.addWidget(self.summary, 1)
        status.addWidget(self.busy_label)
        status.addWidget(self.busy)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self.banner)
        layout.addLayout(bar)
        layout.addWidget(self.main_split, 1)
        layout.addLayout(status)

        self.variant_combo.currentIndexChanged.connect(lambda _i: self._on_variant_chosen())
        self.diff_combo.currentIndexChanged.connect(lambda _i: self._on_diff_chosen())
        self.overlay_combo.currentTextChanged.connect(self._on_overlay_chosen)
        self.search_edit.returnPressed.connect(lambda: self.search(self.search_edit.text()))
        self.fit_button.clicked.connect(self.fit)
        self.collapse_button.clicked.connect(self.collapse_all)
        self.export_svg_action.triggered.connect(lambda: self._export_image_dialog("svg"))
        self.export_png_action.triggered.connect(lambda: self._export_image_dialog("png"))
        self.export_table_action.triggered.connect(self._export_table_dialog)
        for scene in (self.scene, self.other_scene):
            scene.box_clicked.connect(self.show_box)
            # queued: the relayout deletes the item whose double-click is being handled, and a scene whose
            # mouse grabber is deleted inside its own event swallows the next click
            scene.box_double_clicked.connect(self.toggle, Qt.ConnectionType.QueuedConnection)
        self.canvas.navigated.connect(lambda: self._sync(self.canvas))
        self.other_canvas.navigated.connect(lambda: self._sync(self.other_canvas))
        self.pane_combo.activated.connect(self._on_pane_chosen)
        self.close_panes_button.clicked.connect(self.clear_panes)

    def set_variant(self, key: str) -> None:
        """Show the graph of `key` ("source:<checkpoint>" or "row:<variant id>")."""
        self._add_choice(key)
        self.variant_combo.setCurrentIndex(self.variant_combo.findData(key))
        self._on_variant_chosen()

    def set_diff(self, key: str | None) -> None:
        """Diff against `key` (None: no diff)."""
        if key:
            self._add_choice(key)
        self.diff_combo.setCurrentIndex(max(0, self.diff_combo.findData(key or "")))
        self._on_diff_chosen()

    def on_model_changed(self) -> None:
        self.models.clear()
        self.graphs.clear()
        self.key = None
        self._extra_choices.clear()
        self.refresh_choices()
        self._stale = True
        if self.isVisible():
            self._on_variant_chosen()

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self._stale and self.document.model is not None:
            self._on_variant_chosen()  # the graph is read when the tab is first looked at, not at every open

    # ---------------------------------------------------------------------------- background work

    def busy_now(self) -> bool:
        return bool(self._tasks)

    def _start(self, purpose: str, fn: Any, on_done: Any, message: str) -> None:
        def done(token: int, result: Any) -> None:
            task = self._tasks.get(purpose)
            if task is None or task.token != token:
                return  # superseded by a newer request
            del self._tasks[purpose]
            self._update_busy()
            on_done(result)

        def failed(token: int, text: str) -> None:
            task = self._tasks.get(purpose)
            if task is None or task.token != token:
                return
            del self._tasks[purpose]
            self._update_busy()
            self.banner.show_message(f"{message.rstrip('…')} failed: {text}")
            self.failed.emit(text)

        old = self._tasks.pop(purpose, None)
        if old is not None:
            old.cancel()
        self._tasks[purpose] = run_task(fn, on_done=done, on_error=failed, pool=work_pool())
        self.busy_label.setText(message)
        self._update_busy()

    def _update_busy(self) -> None:
        self.busy.setVisible(bool(self._tasks))
        if not self._tasks:
            self.busy_label.setText("")

    def opened(self, key: str) -> Any:
        """The checkpoint a choice key names, opened once (callable from the work thread)."""
        return self.models.get(key) or open_choice(key, self.document)

    def _graph_task(self, key: str) -> Any:
        document = self.document

        def work() -> tuple[Any, Graph]:
            from studio.inspection.graph import graph_of

            model = self.models.get(key) or open_choice(key, document)
            graph = self.graphs.get(key) or graph_of(model)
            return model, graph

        return work

    # ---------------------------------------------------------------------------- the shown graph

    def _on_variant_chosen(self) -> None:
        key = self.variant_combo.currentData()
        if not key:
            return
        self._stale = False
        self.banner.dismiss()

        def shown(result: tuple[Any, Graph]) -> None:
            self.models[key], self.graphs[key] = result
            self.show_graph(key)

        self._start("graph", self._graph_task(key), shown, "reading the graph…")

    def show_graph(self, key: str) -> None:
        self.key = key
        self.graph = self.graphs[key]
        self.blocks = blocks_of(self.graph)
        self.expanded.clear()
        self.shares, self.errors = {}, {}
        self.selected = None
        self.panel.clear()
        self._rediff()  # without A, the shown graph is the extra panes' reference
        self._relayout(fit=True)
        self.graph_shown.emit(key)
        if self.overlay != "none":
            self._on_overlay_chosen(self.overlay)
        if self.diff_key:
            self._on_diff_chosen()

    def _relayout(self, fit: bool = False) -> None:
        if self.graph is None:
            return
        self.layout_ = layout_graph(self.graph, self.expanded, self.blocks)
        self.scene.show_layout(self.layout_)
        self._layout_panes()
        self._paint()
        n_blocks = len({b for b in self.blocks.values() if b})
        self.summary.setText(
            f"{self.graph.kind} graph · {len(self.graph.nodes)} nodes in {n_blocks} blocks · "
            f"{len(self.layout_.boxes)} boxes shown (double-click a block to expand or collapse it)"
        )
        if fit:
            self.fit()
        if self.selected and self.selected in self.scene.boxes:
            self.scene.highlight(self.selected)
        self.laid_out.emit()

    def toggle(self, box_id: str) -> None:
        """Expand a collapsed block, or collapse the block a node of an expanded one belongs to."""
        layout = self.pane_of_box(box_id)[2]
        if layout is None:
            return
        box = next((b for b in layout.boxes if b.id == box_id), None)
        if box is None:
            return
        if box.collapsed:
            self.expanded.add(box_id)
        elif box.block in self.expanded:
            self.expanded.discard(box.block)
            box_id = box.block
        else:
            return
        self.selected = box_id
        self._relayout()
        self.canvas.centre_on_box(box_id if box_id in self.scene.boxes else self._first_member(box_id))

    def _first_member(self, block: str) -> str:
        assert self.layout_ is not None
        members = [n for n, b in self.blocks.items() if b == block]
        return self.layout_.item_of.get(members[0], block) if members else block

    def expand(self, block: str) -> None:
        if block not in self.expanded:
            self.expanded.add(block)
            self._relayout()

    def collapse_all(self) -> None:
        self.expanded.clear()
        self._relayout(fit=True)

    def fit(self) -> None:
        """Every canvas fitted to its own graph (a small torch original is not drawn at the scale of its
        much larger export)."""
        self._syncing = True
        try:
            for canvas in self.canvases():
                if canvas is self.canvas or canvas.isVisible():
                    canvas.fit()
        finally:
            self._syncing = False

    # ---------------------------------------------------------------------------- search

    def search(self, text: str) -> str | None:
        """Centre on and highlight the first node whose name holds `text` (any case), expanding its block;
        the box shown, or None when nothing matches."""
        if self.graph is None or not text.strip():
            return None
        needle = text.strip().lower()
        match = next((n.name for n in self.graph.nodes if needle in n.name.lower()), None)
        if match is None:
            self.summary.setText(f"no node's name holds “{text.strip()}”")
            return None
        block = self.blocks.get(match)
        if block is not None:
            self.expand(block)
        self.show_box(match)
        self.canvas.centre_on_box(match)
        return match

    def _paint(self) -> None:
        """Colours and marks on every canvas, and the legends for them."""
        colors = self.overlay_colors()
        self.scene.color_boxes(colors)
        diff_legend = self._paint_marks()
        self.canvas.legend.set_legend(self.legend)
        self.other_canvas.legend.set_legend(diff_legend)

    def shutdown(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
