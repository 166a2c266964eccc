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
    QFileDialog,
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
from studio.gui.graph_details import NodeDetails
from studio.gui.graph_scene import (
    MARK_COLORS,
    PRECISION_COLORS,
    GraphCanvas,
    GraphScene,
    Legend,
    render_canvases,
)
from studio.gui.widgets import Banner, run_task, work_pool
from studio.inspection.graph import Graph, graph_diff
from studio.inspection.graph_export import (
    DIFF_COLUMNS,
    NODE_COLUMNS,
    diff_rows,
    node_rows,
    onto_graph,
    read_node_values,
    write_table,
)
from studio.inspection.graph_layout import Layout, blocks_of, box_labels, box_values, layout_graph
from studio.variant_rows import label as row_label
from studio.variant_rows import model_names

OVERLAYS = ("none", "time share", "error", "precision", "from JSON file")
PROFILE_EXAMPLES = 4
SEQUENCE_LENGTH = 32
HISTOGRAM_BINS = 64
DATA = "builtin:sentences"


def open_choice(key: str, document: StudioDocument) -> Any:
    """The checkpoint a choice key names: "source:<checkpoint>" (the document's own open model when it is
    that one) or "row:<variant id>" of the workspace."""
    kind, _, ref = key.partition(":")
    if kind == "source":
        if document.model is not None and ref == document.source:
            return document.model
        from studio.checkpoints import open_checkpoint

        return open_checkpoint(ref, trust=document.trusted and ref == document.source)
    from studio.compare import open_row

    return open_row(document.workspace.get(ref), trust=False)


def load_graph(model: Any) -> Graph:
    from studio.inspection.graph import graph_of

    return graph_of(model)


def time_shares(model: Any) -> dict[str, float]:
    from studio.evaluation.data import load_examples
    from studio.evaluation.node_profile import profile_model

    profile = profile_model(
        model, load_examples(DATA, PROFILE_EXAMPLES), sequence_length=SEQUENCE_LENGTH, runs=2
    )
    return dict(profile.shares)


def layer_errors(reference: Any, model: Any, graph: Graph) -> dict[str, float]:
    """Per node: the largest relative error, against `reference`, of the modules whose weights it reads."""
    from studio.evaluation.data import load_examples
    from studio.inspection.layer_diff import layer_diff

    diff = layer_diff(
        reference, model, examples=load_examples(DATA, PROFILE_EXAMPLES), sequence_length=SEQUENCE_LENGTH
    )
    errors = {x["name"]: x["relative_error"] for x in diff["layers"]}
    return {r["name"]: r["error"] for r in node_rows(graph, None, errors) if r["error"] is not None}


class GraphView(QWidget):
    graph_shown = Signal(str)  # the choice key whose graph is on screen
    overlay_shown = Signal(str)  # an overlay's colours are on the boxes
    diff_shown = Signal()
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
        self._build()
        document.model_changed.connect(self.on_model_changed)
        document.variants_changed.connect(self.refresh_choices)
        self.refresh_choices()

    # ---------------------------------------------------------------------------- layout

    def _build(self) -> None:
        self.banner = Banner("error")
        self.variant_combo = QComboBox()
        self.variant_combo.setMinimumContentsLength(18)
        self.variant_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.variant_combo.setToolTip("Whose graph: the open model or one of its variants in the workspace")
        self.diff_combo = QComboBox()
        self.diff_combo.setMinimumContentsLength(16)
        self.diff_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.diff_combo.setToolTip(
            "Diff: a second variant (A) drawn on the left; boxes are marked added, removed or changed"
        )
        self.overlay_combo = QComboBox()
        self.overlay_combo.addItems(list(OVERLAYS))
        self.overlay_combo.setToolTip(
            "Colour the boxes: share of run time, relative error against the diff variant (or the open "
            "model), precision, or {node name: number} from a JSON file"
        )
        self.search_edit = QLineEdit()
        self.search_edit.setPlaceholderText("Find a node by name…")
        self.search_edit.setClearButtonEnabled(True)
        self.search_edit.setMinimumWidth(180)
        self.fit_button = QPushButton("Fit")
        self.fit_button.setToolTip("Show the whole graph (a tall one fitted to its width)")
        self.collapse_button = QPushButton("Collapse all")
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
        ):
            bar.addWidget(QLabel(label))
            bar.addWidget(widget)
            bar.addSpacing(6)
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
        self.canvas.navigated.connect(lambda: self._sync(self.canvas, self.other_canvas))
        self.other_canvas.navigated.connect(lambda: self._sync(self.other_canvas, self.canvas))

    # ---------------------------------------------------------------------------- choices

    def choices(self) -> list[tuple[str, str]]:
        """(name, key) of every graph there is to show: the open model, its variants in the workspace, and
        any checkpoint chosen through `set_variant`/`set_diff`."""
        out: list[tuple[str, str]] = []
        source = self.document.source
        if self.document.model is not None and source:
            out.append((f"original {model_names([source])[source]}", f"source:{source}"))
            try:
                rows = self.document.workspace.list()
            except Exception:  # a workspace that cannot be listed still leaves the open model to show
                rows = []
            for row in rows:
                if row.get("model") == source and row["kind"] != "baseline" and not row.get("missing"):
                    out.append((f"{row_label(row)} ({row['kind']})", f"row:{row['id']}"))
        known = {k for _, k in out}
        out += [(name, key) for key, name in self._extra_choices.items() if key not in known]
        return out

    def refresh_choices(self) -> None:
        choices = self.choices()
        for combo, first in ((self.variant_combo, None), (self.diff_combo, ("no diff", ""))):
            kept = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            if first is not None:
                combo.addItem(*first)
            for name, key in choices:
                combo.addItem(name, key)
            index = combo.findData(kept) if kept is not None else -1
            combo.setCurrentIndex(max(0, index))
            combo.blockSignals(False)

    def _add_choice(self, key: str) -> None:
        if key not in {k for _, k in self.choices()}:
            ref = key.partition(":")[2]
            self._extra_choices[key] = model_names([ref])[ref] if key.startswith("source:") else ref
            self.refresh_choices()

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

    def _graph_task(self, key: str) -> Any:
        document = self.document

        def work() -> tuple[Any, Graph]:
            model = self.models.get(key) or open_choice(key, document)
            graph = self.graphs.get(key) or load_graph(model)
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
        if self.other is not None:
            self.other_layout = layout_graph(self.other, self.expanded, self.other_blocks)
            self.other_scene.show_layout(self.other_layout)
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
        layout = self.layout_ if box_id in self.scene.boxes else self.other_layout
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
        self.canvas.fit()
        if self.other_canvas.isVisible():
            self.other_canvas.follow(self.canvas)

    def _sync(self, source: GraphCanvas, target: GraphCanvas) -> None:
        if self._syncing or not target.isVisible():
            return
        self._syncing = True
        try:
            target.follow(source)
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

    # ---------------------------------------------------------------------------- details

    def show_box(self, box_id: str) -> None:
        self.selected = box_id
        self.scene.highlight(box_id)
        self.other_scene.highlight(box_id)
        graph, layout = (
            (self.graph, self.layout_) if box_id in self.scene.boxes else (self.other, self.other_layout)
        )
        if graph is None or layout is None:
            return
        box = next((b for b in layout.boxes if b.id == box_id), None)
        if box is None:
            return
        value = self._box_value(box_id)
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
        self._request_histogram(node, graph is self.graph)

    def _box_value(self, box_id: str) -> str:
        if self.layout_ is None or box_id not in self.scene.boxes or self.legend is None:
            return ""
        if self.overlay == "precision":
            return ""
        values = box_values(self.layout_, self.node_values, "sum" if self.overlay == "time share" else "max")
        if box_id not in values:
            return ""
        return f"{self.legend.title}: {self.legend.fmt.format(self._scaled(values[box_id]))}"

    def _request_histogram(self, node: Any, shown_side: bool) -> None:
        matrices = [w for w in node.weights if len(w["shape"]) >= 1]
        key = self.key if shown_side else self.diff_key
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

    # ---------------------------------------------------------------------------- overlays

    def set_overlay(self, name: str) -> None:
        self.overlay_combo.setCurrentText(name)
        if self.overlay != name:
            self._on_overlay_chosen(name)

    def load_values_file(self, path: str | Path) -> None:
        """Colour the boxes by `{node name: number}` from a JSON file."""
        self.values_file = Path(path)
        self.node_values = read_node_values(self.values_file)
        self.overlay = "from JSON file"
        self.overlay_combo.blockSignals(True)
        self.overlay_combo.setCurrentText(self.overlay)
        self.overlay_combo.blockSignals(False)
        self._paint()
        self.overlay_shown.emit(self.overlay)

    def _on_overlay_chosen(self, name: str) -> None:
        self.overlay = name
        self.banner.dismiss()
        key, graph = self.key, self.graph
        if name == "none" or graph is None or key is None:
            self.node_values = {}
            self._paint()
            return
        if name == "precision":
            self.node_values = {}
            self._paint()
            self.overlay_shown.emit(name)
            return
        if name == "from JSON file":
            path, _ = QFileDialog.getOpenFileName(self, "Per-node values", "", "JSON (*.json)")
            if not path:
                self.set_overlay("none")
                return
            try:
                self.load_values_file(path)
            except Exception as exc:  # a StudioError names the problem; show it, keep the tab usable
                self.banner.show_message(getattr(exc, "message", str(exc)))
                self.set_overlay("none")
            return
        model = self.models[key]
        if name == "time share":

            def shown_shares(shares: dict[str, float]) -> None:
                self.shares, self.unplaced_share = onto_graph(shares, graph)
                self._values_ready("time share", self.shares)
                if self.unplaced_share > 0:
                    self.summary.setText(
                        f"{100 * self.unplaced_share:.1f} % of the run time is in kernels ONNX Runtime fused "
                        "on load that no node of this graph names"
                    )

            self._start(
                "overlay", lambda: time_shares(model), shown_shares, "profiling the run time per node…"
            )
        elif name == "error":
            reference_key = self.diff_key or f"source:{self.document.source}"
            document = self.document

            def work() -> dict[str, float]:
                reference = self.models.get(reference_key) or open_choice(reference_key, document)
                return layer_errors(reference, model, graph)

            def shown_errors(errors: dict[str, float]) -> None:
                self.errors = errors
                self._values_ready("error", errors)

            self._start("overlay", work, shown_errors, "comparing every layer's output…")

    def _values_ready(self, overlay: str, values: dict[str, float]) -> None:
        if self.overlay != overlay:
            return  # another overlay was chosen meanwhile
        self.node_values = values
        self._paint()
        self.overlay_shown.emit(overlay)

    def _scaled(self, value: float) -> float:
        return value * 100 if self.overlay == "time share" else value

    def _paint(self) -> None:
        """Colours and marks on both canvases, and the legend for them."""
        self.legend = None
        colors: dict[str, Any] = {}
        if self.layout_ is not None and self.graph is not None:
            if self.overlay == "precision":
                labels = box_labels(self.layout_, {n.name: n.precision for n in self.graph.nodes})
                colors = {b: PRECISION_COLORS.get(v, PRECISION_COLORS["mixed"]) for b, v in labels.items()}
                used = [k for k in PRECISION_COLORS if k in set(labels.values())]
                self.legend = Legend("precision", categories=[(k, PRECISION_COLORS[k]) for k in used])
            elif self.overlay != "none" and self.node_values:
                how = "sum" if self.overlay == "time share" else "max"
                values = {
                    b: self._scaled(v) for b, v in box_values(self.layout_, self.node_values, how).items()
                }
                if values:
                    title, fmt = {
                        "time share": ("share of run time (%)", "{:.1f}"),
                        "error": ("relative error vs reference (max per box)", "{:.2g}"),
                    }.get(
                        self.overlay,
                        (f"{self.values_file.name if self.values_file else 'value'} (max per box)", "{:.3g}"),
                    )
                    self.legend = Legend(
                        title, low=min(0.0, min(values.values())), high=max(values.values()), fmt=fmt
                    )
                    colors = {b: self.legend.color(v) for b, v in values.items()}
        self.scene.color_boxes(colors)
        marks_shown = False
        if self.structure is not None and self.layout_ is not None and self.other_layout is not None:
            from studio.inspection.graph_export import diff_marks

            marks_a, marks_b = diff_marks(self.structure)
            self.scene.mark_boxes(box_labels(self.layout_, marks_b, mixed="changed"))
            self.other_scene.mark_boxes(box_labels(self.other_layout, marks_a, mixed="changed"))
            marks_shown = True
        else:
            self.scene.mark_boxes({})
        self.canvas.legend.set_legend(self.legend)
        self.other_canvas.legend.set_legend(self._diff_legend() if marks_shown else None)

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

    # ---------------------------------------------------------------------------- diff

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

    # ---------------------------------------------------------------------------- export

    def export_image(self, path: str | Path) -> Path:
        """The canvases (A and B side by side in a diff) with their legends, as SVG or PNG by the suffix."""
        scenes = [self.other_scene, self.scene] if self.other is not None else [self.scene]
        legends = [self.legend] if self.legend is not None else []
        if self.structure is not None:
            legends.append(self._diff_legend())
        return render_canvases(scenes, legends, path, self.font())

    def table_rows(self) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
        """What "Export table" writes: the diff's rows when there is one, else one row per node with the
        time share and error computed so far."""
        if self.structure is not None:
            return diff_rows(self.structure), DIFF_COLUMNS
        if self.graph is None:
            return [], NODE_COLUMNS
        rows = node_rows(self.graph, self.shares or None, None)
        for row in rows:
            row["error"] = self.errors.get(row["name"])
        return rows, NODE_COLUMNS

    def export_table(self, path: str | Path) -> Path:
        rows, columns = self.table_rows()
        return write_table(path, rows, columns)

    def _export_image_dialog(self, suffix: str) -> None:
        name = "graph-diff" if self.other is not None else "graph"
        kind = "SVG image (*.svg)" if suffix == "svg" else "PNG image (*.png)"
        path, _ = QFileDialog.getSaveFileName(self, "Export the graph", f"{name}.{suffix}", kind)
        if path and Path(path).suffix.lower() not in (".svg", ".png"):
            path += f".{suffix}"  # the format goes by the suffix
        if path:
            try:
                self.export_image(path)
            except OSError as exc:
                self.banner.show_message(f"could not export: {exc}")

    def _export_table_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export the table", "graph.csv", "CSV (*.csv);;JSON (*.json)"
        )
        if path:
            try:
                self.export_table(path)
            except Exception as exc:  # BadInput says why the place cannot be written
                self.banner.show_message(getattr(exc, "message", str(exc)))

    def shutdown(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
