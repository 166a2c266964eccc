"""The Heads tab: which attention heads matter, and what the model loses when some are switched off.

Head importance (studio.inspection.heads) is computed on a pool thread with progress and cancel. Clicking
a cell of the layers x heads heatmap masks that head; the fidelity of the masked model (mean cosine of
the family output against the unmasked model on a few builtin sentences) is then re-measured in the
background. Masking installs forward hooks on the shared module, so every job that runs the model goes
through one single-thread pool: a fidelity run can never see the hooks of an importance run.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, QSettings, Qt, QThreadPool, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from studio.gui.document import StudioDocument
from studio.gui.widgets import add_plot_export_action, plot_colors, run_task, style_axis, style_plot
from studio.inspection.heads import METHODS, HeadImportance

FIDELITY_EXAMPLES = 16
FIDELITY_SEQUENCE_LENGTH = 64
DATA = "builtin:sentences"


HOVER_HINT = "Hover a cell to read its layer, head and importance; click to switch it off."


def heads_off(n: int) -> str:
    return f"{n} head off" if n == 1 else f"{n} heads off"


class MaskedHeadsFidelity:
    """Fidelity of the model with some heads masked, measured as variants are judged (the core's
    FidelityProbe: 1 - the family's divergence from the unmasked outputs, the mean cosine of pooled
    embeddings for encoders). The reference outputs are computed on first use, on the heads view's single
    pool thread, never on the GUI thread."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._probe: Any = None

    def fidelity(self, masked: frozenset[tuple[int, int]]) -> float:
        import torch

        from studio.evaluation.data import load_examples
        from studio.evaluation.measure import runner_for
        from studio.inspection.attention import head_mask, require_attention_blocks
        from studio.techniques.mixed_precision import FidelityProbe

        if self._probe is None:
            self.blocks, _ = require_attention_blocks(self.model.module, self.model.path)
            examples = load_examples(DATA, FIDELITY_EXAMPLES)
            self._probe = FidelityProbe(self.model, examples, FIDELITY_SEQUENCE_LENGTH)
        values = [torch.ones(b.num_heads) for b in self.blocks]
        for layer, head in masked:
            values[layer][head] = 0.0
        with head_mask(self.blocks, values):
            return self._probe.fidelity(runner_for("torch", self.model.module, self.model))


def compute_importance(model: Any, method: str, examples: int, seq_len: int, progress: Any) -> HeadImportance:
    from studio.evaluation.data import load_examples
    from studio.inspection.heads import compute_head_importance

    progress(0.0, "preparing the model and examples…")
    return compute_head_importance(
        model,
        load_examples(DATA, examples),
        method=method,
        sequence_length=seq_len,
        batch_size=8,
        progress=progress,
    )


class HeadsView(QWidget):
    computed = Signal()  # a new importance heatmap is on screen
    compute_failed = Signal(str)
    masked_changed = Signal()
    fidelity_changed = Signal(float)  # the fidelity shown for the current masked set

    def __init__(self, document: StudioDocument, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(1)  # see the module docstring
        self.importance: HeadImportance | None = None
        self.masked: set[tuple[int, int]] = set()
        self.fidelity: float | None = None
        self._started = time.monotonic()
        self._compute_task = None
        self._fidelity_seq = 0  # bumped on every masked-set change; older results are dropped
        self._probe: MaskedHeadsFidelity | None = None
        self._build()
        document.model_changed.connect(self.on_model_changed)
        self.on_model_changed()

    # ---------------------------------------------------------------------------- layout

    def _build(self) -> None:
        self.method_combo = QComboBox()
        self.method_combo.addItems(list(METHODS))
        self.method_combo.setToolTip(
            "gradient: |d loss / d head mask| (Michel et al. 2019), one backward pass per batch, fast.\n"
            "ablation: output change when each head is zeroed alone, one forward pass per head, slower."
        )
        self.examples_spin = QSpinBox()
        self.examples_spin.setRange(1, 4096)
        self.examples_spin.setValue(32)
        self.examples_spin.setToolTip(f"Sentences from {DATA} used to rank the heads")
        self.seq_spin = QSpinBox()
        self.seq_spin.setRange(8, 4096)
        self.seq_spin.setValue(64)
        self.seq_spin.setSuffix(" tokens")
        self.seq_spin.setToolTip("Sequence length (longer sentences are truncated)")
        self.compute_button = QPushButton("Compute")
        self.compute_button.setDefault(True)
        self.compute_button.setToolTip("Rank the attention heads of the open model")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip("Stop the computation (Esc)")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.progress.setMaximumWidth(220)
        self.progress_label = QLabel("")
        controls = QHBoxLayout()
        for label, widget in (("Method", self.method_combo), ("Examples", self.examples_spin)):
            controls.addWidget(QLabel(label))
            controls.addWidget(widget)
        controls.addWidget(QLabel("Sequence length"))
        controls.addWidget(self.seq_spin)
        controls.addWidget(self.compute_button)
        controls.addWidget(self.cancel_button)
        controls.addWidget(self.progress)
        controls.addWidget(self.progress_label, 1)

        # heatmap
        colors = plot_colors()
        self.plot = pg.PlotWidget()
        item = self.plot.getPlotItem()
        item.setLabel("bottom", "head")
        item.setLabel("left", "layer (attention block)")
        item.setTitle("Head importance")
        item.setMouseEnabled(x=False, y=False)
        item.hideButtons()
        item.getViewBox().invertY(True)
        item.getViewBox().setDefaultPadding(0.0)
        self.image = pg.ImageItem(axisOrder="row-major")
        item.addItem(self.image)
        self.colorbar = pg.ColorBarItem(
            values=(0, 1), colorMap="viridis", label="importance (normalised per layer)", interactive=False
        )
        self.colorbar.setImageItem(self.image, insert_in=item)
        self.mask_marks = pg.ScatterPlotItem(
            symbol="x", size=20, pen=pg.mkPen(colors["mask"], width=3), brush=colors["mask"]
        )
        self.mask_marks.setZValue(10)
        item.addItem(self.mask_marks)
        self.plot.scene().sigMouseMoved.connect(self._on_hover)
        self.plot.scene().sigMouseClicked.connect(self._on_click)
        add_plot_export_action(self.plot, self.plot, "head-importance")

        self.placeholder = QLabel()
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setWordWrap(True)
        font = QFont(self.placeholder.font())
        font.setPointSizeF(font.pointSizeF() * 1.15)
        self.placeholder.setFont(font)
        self.stack = QStackedWidget()
        self.stack.addWidget(self.placeholder)
        self.stack.addWidget(self.plot)
        self.hover_label = QLabel(HOVER_HINT)
        self.hover_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        center = QWidget()
        cv = QVBoxLayout(center)
        cv.setContentsMargins(0, 0, 0, 0)
        cv.addWidget(self.stack, 1)
        cv.addWidget(self.hover_label)

        # side panel: masked heads, fidelity, actions
        self.fidelity_label = QLabel("fidelity with 0 heads off: 1.0000")
        big = QFont(self.fidelity_label.font())
        big.setPointSizeF(big.pointSizeF() * 1.3)
        big.setBold(True)
        self.fidelity_label.setFont(big)
        self.fidelity_label.setWordWrap(True)
        self.fidelity_note = QLabel(
            f"Fidelity of the model with the heads off vs all heads on (mean cosine of the embeddings for "
            f"encoders, 1 - the divergence of the output distributions otherwise), on "
            f"{FIDELITY_EXAMPLES} builtin sentences at {FIDELITY_SEQUENCE_LENGTH} tokens. 1.0 = unchanged."
        )
        self.fidelity_note.setWordWrap(True)
        self.masked_list = QListWidget()
        self.masked_list.setToolTip("Heads switched off (click a cell again to switch it back on)")
        self.lowest_spin = QSpinBox()
        self.lowest_spin.setRange(1, 10000)
        self.lowest_spin.setValue(12)
        self.lowest_button = QPushButton("Switch off the least important")
        self.lowest_button.setToolTip("Mask the N heads with the lowest importance (ranked across layers)")
        self.clear_button = QPushButton("Switch all back on")
        self.prune_button = QPushButton("Prune these heads")
        self.prune_button.setToolTip(
            "Add a prune.heads step with exactly these heads to the pipeline (undo with Ctrl+Z)"
        )
        lowest = QHBoxLayout()
        lowest.addWidget(self.lowest_spin)
        lowest.addWidget(self.lowest_button, 1)
        box = QGroupBox("Heads switched off")
        bv = QVBoxLayout(box)
        bv.addWidget(self.fidelity_label)
        bv.addWidget(self.fidelity_note)
        bv.addWidget(self.masked_list, 1)
        bv.addLayout(lowest)
        bv.addWidget(self.clear_button)
        bv.addWidget(self.prune_button)
        self.info_label = QLabel("")
        self.info_label.setWordWrap(True)
        info_box = QGroupBox("About this ranking")
        form = QFormLayout(info_box)
        form.addRow(self.info_label)
        side = QWidget()
        sv = QVBoxLayout(side)
        sv.setContentsMargins(0, 0, 0, 0)
        sv.addWidget(box, 1)
        sv.addWidget(info_box)

        self.split = QSplitter(Qt.Orientation.Horizontal)
        self.split.addWidget(center)
        self.split.addWidget(side)
        self.split.setSizes([900, 340])
        self.split.setStretchFactor(0, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addLayout(controls)
        layout.addWidget(self.split, 1)

        self.compute_button.clicked.connect(self.compute)
        self.cancel_button.clicked.connect(self.cancel)
        self.clear_button.clicked.connect(self.clear_mask)
        self.lowest_button.clicked.connect(lambda: self.mask_least_important(self.lowest_spin.value()))
        self.prune_button.clicked.connect(self.prune_masked)
        self._update_actions()

    def apply_theme(self) -> None:
        style_plot(self.plot)
        for side in ("left", "right", "top", "bottom"):  # the colour bar is a PlotItem framed by four axes
            style_axis(self.colorbar.getAxis(side))
        colors = plot_colors()
        self.mask_marks.setPen(pg.mkPen(colors["mask"], width=3))
        self.mask_marks.setBrush(colors["mask"])

    # ---------------------------------------------------------------------------- model

    def on_model_changed(self) -> None:
        self.cancel()
        self._fidelity_seq += 1
        self.importance = None
        self.masked.clear()
        self.fidelity = None
        model = self.document.model
        self._probe = MaskedHeadsFidelity(model) if model is not None else None
        self.masked_list.clear()
        self.info_label.setText("")
        self.hover_label.setText(HOVER_HINT)  # not a cell of the old model's layers
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress_label.setText("")
        if model is None:
            self._placeholder("Open a model to rank its attention heads.")
        else:
            self._placeholder(
                f"Press <b>Compute</b> to rank the attention heads of <b>{model.source}</b>.<br><br>"
                "<i>gradient</i>: one backward pass per batch of examples (seconds on a small model).<br>"
                "<i>ablation</i>: one forward pass per head (slower, measures the output change directly)."
            )
        self._show_fidelity()
        self._update_actions()

    def _placeholder(self, html: str) -> None:
        self.placeholder.setText(html)
        self.stack.setCurrentWidget(self.placeholder)

    # ---------------------------------------------------------------------------- importance

    @property
    def computing(self) -> bool:
        return self._compute_task is not None

    def compute(self) -> None:
        model = self.document.model
        if model is None or self.computing:
            return
        method = self.method_combo.currentText()
        examples, seq_len = self.examples_spin.value(), self.seq_spin.value()
        # busy until the first real fraction: loading the model and its imports take seconds before it
        self.progress.setRange(0, 0)
        self.progress_label.setText(f"loading the model for {method} importance…")
        self._started = time.monotonic()
        self._compute_task = run_task(
            lambda progress: compute_importance(model, method, examples, seq_len, progress),
            on_done=self._on_computed,
            on_error=self._on_compute_error,
            on_progress=self._on_progress,
            pool=self.pool,
        )
        self.document.status.emit(f"computing {method} head importance on {examples} examples…")
        self._update_actions()

    def cancel(self) -> None:
        if self._compute_task is not None:
            self._compute_task.cancel()
            self._compute_task = None
            self.progress.setRange(0, 1000)
            self.progress.setValue(0)
            self.progress_label.setText("cancelled")
            self.document.status.emit("head importance cancelled")
        self._update_actions()

    def _on_progress(self, token: int, fraction: float, message: str) -> None:
        if self._compute_task is not None and token == self._compute_task.token:
            if fraction > 0.0:
                self.progress.setRange(0, 1000)
                self.progress.setValue(int(1000 * max(0.0, min(1.0, fraction))))
            self.progress_label.setText(message)

    def _on_compute_error(self, token: int, message: str) -> None:
        if self._compute_task is None or token != self._compute_task.token:
            return
        self._compute_task = None
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress_label.setText("failed")
        if "no attention heads" in message:
            self._placeholder(
                "<b>This model has no attention heads to rank.</b><br><br>"
                f"{message}<br><br>Head importance and head pruning apply to transformer models "
                "(BERT/MiniLM, GPT-2, Llama, Marian…)."
            )
        else:
            self._placeholder(f"<b>Head importance could not be computed.</b><br><br>{message}")
        self.document.status.emit(f"head importance failed: {message}")
        self.compute_failed.emit(message)
        self._update_actions()

    def _on_computed(self, token: int, result: HeadImportance) -> None:
        if self._compute_task is None or token != self._compute_task.token:
            return
        self._compute_task = None
        previous = self.importance
        self.importance = result
        if previous is None or (previous.layers, previous.heads) != (result.layers, result.heads):
            self.masked.clear()
        self.progress.setRange(0, 1000)
        self.progress.setValue(1000)
        # the wall time the user waited (loading included), and the part spent ranking
        wall = time.monotonic() - self._started
        self.progress_label.setText(f"done in {wall:.1f} s ({result.seconds:.1f} s ranking heads)")
        self._draw_heatmap()
        self._draw_masks()
        self.info_label.setText(
            f"{result.method} importance of {result.layers} attention blocks × {result.heads} heads on "
            f"{result.examples} examples at {result.sequence_length} tokens ({result.seconds:.1f} s).<br>"
            f"Objective: {result.objective}.<br>Scores are divided by each layer's L2 norm "
            "(Michel et al. 2019), so compare heads within a row."
        )
        self.lowest_spin.setMaximum(max(1, result.layers * result.heads - 1))
        self.document.status.emit(f"head importance computed in {result.seconds:.1f} s")
        self.computed.emit()
        self._update_actions()

    def matrix(self) -> np.ndarray:
        """The importance as a float array (NaN where a layer has fewer heads)."""
        if self.importance is None:
            return np.zeros((0, 0))
        return np.array(
            [[math.nan if v is None else float(v) for v in row] for row in self.importance.importance],
            dtype=float,
        )

    def _draw_heatmap(self) -> None:
        result = self.importance
        if result is None:
            return
        data = self.matrix()
        top = float(np.nanmax(data)) if np.isfinite(data).any() else 1.0
        levels = (0.0, top if top > 0 else 1.0)
        self.image.setImage(data, levels=levels)
        self.image.setRect(QRectF(0, 0, result.heads, result.layers))
        self.colorbar.setLevels(levels)
        item = self.plot.getPlotItem()
        item.getAxis("bottom").setTicks([[(h + 0.5, str(h)) for h in range(result.heads)]])
        item.getAxis("left").setTicks([[(i + 0.5, str(i)) for i in range(result.layers)]])
        item.setTitle(
            f"Head importance ({result.method}, {result.examples} examples, {result.sequence_length} tokens)"
            " — click a head to switch it off"
        )
        vb = item.getViewBox()
        vb.setLimits(xMin=0, xMax=result.heads, yMin=0, yMax=result.layers)
        vb.setRange(xRange=(0, result.heads), yRange=(0, result.layers), padding=0)
        self.stack.setCurrentWidget(self.plot)

    # ---------------------------------------------------------------------------- hover / click

    def _cell_at(self, scene_pos: Any) -> tuple[int, int] | None:
        if self.importance is None:
            return None
        vb = self.plot.getPlotItem().getViewBox()
        if not vb.sceneBoundingRect().contains(scene_pos):
            return None
        point = vb.mapSceneToView(scene_pos)
        layer, head = math.floor(point.y()), math.floor(point.x())
        if 0 <= layer < self.importance.layers and 0 <= head < self.importance.heads:
            if self.importance.importance[layer][head] is None:
                return None
            return layer, head
        return None

    def cell_center(self, layer: int, head: int) -> Any:
        """Where cell (layer, head) is in the plot widget's coordinates (for clicks in tests and demos)."""
        vb = self.plot.getPlotItem().getViewBox()
        scene = vb.mapViewToScene(pg.Point(head + 0.5, layer + 0.5))
        return self.plot.mapFromScene(scene)

    def _on_hover(self, scene_pos: Any) -> None:
        cell = self._cell_at(scene_pos)
        if cell is None or self.importance is None:
            return
        layer, head = cell
        value = self.importance.importance[layer][head]
        block = self.importance.blocks[layer]["name"]
        state = "off — click to switch back on" if cell in self.masked else "click to switch off"
        self.hover_label.setText(
            f"layer {layer} ({block}), head {head}: importance {value:.4f} "
            f"(raw {self.importance.raw[layer][head]:.4g}) — {state}"
        )

    def _on_click(self, event: Any) -> None:
        if event.button() != Qt.MouseButton.LeftButton or event.double():
            return
        cell = self._cell_at(event.scenePos())
        if cell is not None:
            event.accept()
            self.toggle_head(*cell)

    # ---------------------------------------------------------------------------- masking + fidelity

    def toggle_head(self, layer: int, head: int) -> None:
        cell = (layer, head)
        if cell in self.masked:
            self.masked.discard(cell)
        else:
            self.masked.add(cell)
        self._masked_changed()

    def set_masked(self, cells: set[tuple[int, int]]) -> None:
        self.masked = set(cells)
        self._masked_changed()

    def clear_mask(self) -> None:
        self.set_masked(set())

    def mask_least_important(self, count: int) -> None:
        if self.importance is not None:
            self.set_masked({(layer, head) for layer, head, _ in self.importance.ranked()[:count]})

    def _masked_changed(self) -> None:
        self._draw_masks()
        self.masked_list.clear()
        for layer, head in sorted(self.masked):
            value = None
            if self.importance is not None:
                value = self.importance.importance[layer][head]
            extra = f"  (importance {value:.3f})" if value is not None else ""
            self.masked_list.addItem(f"layer {layer} · head {head}{extra}")
        self.masked_changed.emit()
        self._update_actions()
        self._evaluate_fidelity()

    def _draw_masks(self) -> None:
        cells = sorted(self.masked)
        self.mask_marks.setData(x=[h + 0.5 for _, h in cells], y=[layer + 0.5 for layer, _ in cells])

    def _evaluate_fidelity(self) -> None:
        self._fidelity_seq += 1
        masked = frozenset(self.masked)
        if not masked or self._probe is None:
            # Masking nothing leaves the model untouched (the hooks multiply by exactly 1).
            self.fidelity = 1.0
            self._show_fidelity()
            self.fidelity_changed.emit(1.0)
            return
        probe, seq = self._probe, self._fidelity_seq

        def job() -> tuple[int, float | None]:
            if seq != self._fidelity_seq:
                return seq, None  # a newer masked set is queued behind this one: skip the work
            return seq, probe.fidelity(masked)

        self.fidelity_label.setText(f"fidelity with {heads_off(len(masked))}: measuring…")
        run_task(job, on_done=self._on_fidelity, on_error=self._on_fidelity_error, pool=self.pool)

    def _on_fidelity(self, _token: int, result: tuple[int, float | None]) -> None:
        seq, value = result
        if seq != self._fidelity_seq or value is None:
            return  # stale: the masked set changed since
        self.fidelity = value
        self._show_fidelity()
        self.fidelity_changed.emit(value)

    def _on_fidelity_error(self, _token: int, message: str) -> None:
        self.fidelity = None
        self.fidelity_label.setText("fidelity: not available")
        self.fidelity_note.setText(message)

    def _show_fidelity(self) -> None:
        value = 1.0 if self.fidelity is None else self.fidelity
        self.fidelity_label.setText(f"fidelity with {heads_off(len(self.masked))}: {value:.4f}")

    # ---------------------------------------------------------------------------- pipeline

    def heads_param(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for layer, head in sorted(self.masked):
            out.setdefault(layer, []).append(head)
        return out

    def prune_masked(self) -> None:
        if not self.masked:
            return
        index = self.document.add_block("prune.heads", {"heads": self.heads_param()})
        self.document.status.emit(
            f"added prune.heads ({len(self.masked)} heads) as step {index + 1} of the pipeline — Ctrl+Z to undo"
        )

    def _update_actions(self) -> None:
        has_model = self.document.model is not None
        self.compute_button.setEnabled(has_model and not self.computing)
        self.cancel_button.setEnabled(self.computing)
        self.progress.setVisible(self.computing or self.progress.value() > 0)
        ready = self.importance is not None
        self.lowest_button.setEnabled(ready)
        self.lowest_spin.setEnabled(ready)
        self.clear_button.setEnabled(bool(self.masked))
        self.prune_button.setEnabled(bool(self.masked))
        self.masked_list.setEnabled(ready)

    # ---------------------------------------------------------------------------- state

    def save_state(self, settings: QSettings) -> None:
        settings.setValue("heads_view/split", self.split.saveState())
        settings.setValue("heads_view/method", self.method_combo.currentText())
        settings.setValue("heads_view/examples", self.examples_spin.value())
        settings.setValue("heads_view/seq", self.seq_spin.value())

    def restore_state(self, settings: QSettings) -> None:
        value = settings.value("heads_view/split")
        if value is not None:
            self.split.restoreState(value)
        method = settings.value("heads_view/method")
        if method in METHODS:
            self.method_combo.setCurrentText(str(method))
        for key, spin in (("examples", self.examples_spin), ("seq", self.seq_spin)):
            v = settings.value(f"heads_view/{key}")
            if v is not None:
                spin.setValue(int(v))

    def shutdown(self, timeout_ms: int = 30000) -> None:
        """Stop and wait for model-running work, so no hook outlives the view."""
        self.cancel()
        self._fidelity_seq += 1
        self.pool.waitForDone(timeout_ms)
