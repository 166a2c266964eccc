"""The run panel: runs the document's pipeline in a worker process and shows its events as they arrive.

The work happens in `python -m studio.worker`, driven by a `WorkerProcess` (studio/gui/worker_process.py)
that hands the panel typed events as they come and, at the end, how the worker ended. A worker that ends
without a `done` or `error` event is reported as a crash with its exit status and last stderr lines. The
window never waits on the worker.
"""

from __future__ import annotations

import math
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import QCoreApplication, QElapsedTimer, QProcess, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QFont, QFontDatabase, QPalette
from PySide6.QtWidgets import (
    QFrame,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSplitter,
    QStyle,
    QVBoxLayout,
    QWidget,
)

from studio.events import Done, Error, Event, Log, Metric, Progress, VariantSaved
from studio.gui.document import StudioDocument
from studio.gui.param_form import ParamForm
from studio.gui.step_row import StepRow
from studio.gui.worker_process import WorkerProcess
from studio.jobs import Job, JobEnd
from studio.units import human_bytes


def _fmt_elapsed(ms: int) -> str:
    s = ms // 1000
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def summarize(result: dict[str, Any]) -> str:
    """One short paragraph about a finished run: the variant, its size, quality and latency vs the original."""
    variants = result.get("variants") or []
    if not variants:
        return "The run finished without a variant."
    variant = variants[-1]
    metrics = variant.get("metrics") or {}
    base = (result.get("baseline") or {}).get("metrics") or {}
    parts = [f"Saved variant {variant.get('id', '?')}"]
    if "size_bytes" in metrics:
        size = f"size {human_bytes(metrics['size_bytes'])}"
        if base.get("size_bytes"):
            size += f" (original {human_bytes(base['size_bytes'])})"
        parts.append(size)
    quality = metrics.get("quality") or {}
    for key, value in quality.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{key.replace('_', ' ')} {value:.4f}")
            break
    latency = metrics.get("latency_ms") or {}
    base_latency = base.get("latency_ms") or {}
    for batch, stats in latency.items():
        if isinstance(stats, dict) and isinstance(stats.get("p50"), (int, float)):
            text = f"p50 latency at batch {batch}: {stats['p50']:.1f} ms"
            ref = (base_latency.get(batch) or {}).get("p50")
            if isinstance(ref, (int, float)):
                text += f" (original {ref:.1f} ms)"
            parts.append(text)
            break
    return "; ".join(parts) + "."


class RunPanel(QWidget):
    """Run / Cancel, per-step progress, a log, the distillation loss curve and the run's result."""

    started = Signal()
    finished = Signal(dict)  # the run's result (`model-studio run --json`)
    failed = Signal(str)  # why the run failed (validation, an error event, a crash)
    cancelled = Signal()  # the user cancelled; nothing was saved
    compare_requested = Signal()  # "Show in Compare" after a run: the window switches tabs (it never jumps)

    def __init__(self, document: StudioDocument, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.worker: WorkerProcess | None = None
        self.job_id: str | None = None
        self.result: dict[str, Any] | None = None
        self.last_error = ""
        self._rows: list[StepRow] = []
        self._n_steps = 0
        self._curves: dict[Any, Any] = {}
        self._loss: dict[Any, tuple[list[float], list[float]]] = {}
        self._last_message: dict[int, str] = {}
        self._clock = QElapsedTimer()
        self._ticker = QTimer(self)
        self._ticker.setInterval(250)
        self._ticker.timeout.connect(self._tick)

        self._build_ui()
        pipeline = document.pipeline
        for sig in (pipeline.step_added, pipeline.step_moved, pipeline.step_removed, pipeline.params_changed):
            sig.connect(self._pipeline_changed)
        pipeline.reset.connect(self._pipeline_reset)
        self._build_rows()
        self._update_buttons()
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)  # no worker outlives the window

    # ---------------------------------------------------------------------------- construction

    def _build_ui(self) -> None:
        style = self.style()
        self.run_action = QAction(
            style.standardIcon(QStyle.StandardPixmap.SP_MediaPlay), "Run pipeline", self
        )
        self.run_action.triggered.connect(self.run)
        self.cancel_action = QAction(
            style.standardIcon(QStyle.StandardPixmap.SP_MediaStop), "Cancel run", self
        )
        self.cancel_action.triggered.connect(self.cancel)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.setSpacing(6)

        top = QHBoxLayout()
        self.run_button = QPushButton(self.run_action.icon(), "Run")
        self.run_button.setToolTip("Run the pipeline in a worker process")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton(self.cancel_action.icon(), "Cancel")
        self.cancel_button.setToolTip("Stop the worker; nothing is saved")
        self.cancel_button.clicked.connect(self.cancel)
        self.elapsed_label = QLabel("0:00")
        self.elapsed_label.setToolTip("Elapsed time")
        mono = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
        self.elapsed_label.setFont(mono)
        self.status_label = QLabel("Ready.")
        self.status_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        top.addWidget(self.run_button)
        top.addWidget(self.cancel_button)
        top.addSpacing(12)
        top.addWidget(QLabel("Elapsed"))
        top.addWidget(self.elapsed_label)
        top.addSpacing(12)
        top.addWidget(self.status_label, 1)
        self.compare_button = QPushButton("Show in Compare")
        self.compare_button.setToolTip("Open the Compare tab with the new variant next to the others")
        self.compare_button.clicked.connect(self.compare_requested.emit)
        self.compare_button.hide()
        top.addWidget(self.compare_button)
        layout.addLayout(top)

        self.error_banner = QFrame()
        self.error_banner.setObjectName("run-error")
        self.error_banner.setStyleSheet(
            "#run-error { background: rgba(211, 47, 47, 0.12); border: 1px solid rgba(211, 47, 47, 0.6);"
            " border-radius: 4px; }"
        )
        eb = QVBoxLayout(self.error_banner)
        eb.setContentsMargins(8, 4, 8, 4)
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setTextFormat(Qt.TextFormat.PlainText)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        eb.addWidget(self.error_label)
        self.error_banner.hide()
        layout.addWidget(self.error_banner)

        self.result_label = QLabel()
        self.result_label.setObjectName("run-result")
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.result_label.setStyleSheet(
            "#run-result { background: rgba(46, 125, 50, 0.12); border: 1px solid rgba(46, 125, 50, 0.6);"
            " border-radius: 4px; padding: 4px 8px; }"
        )
        self.result_label.hide()
        layout.addWidget(self.result_label)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.setChildrenCollapsible(False)
        layout.addWidget(splitter, 1)

        left = QWidget()
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        steps_box = QGroupBox("Steps")
        sv = QVBoxLayout(steps_box)
        sv.setContentsMargins(6, 6, 6, 6)
        self.rows_widget = QWidget()
        self.rows_grid = QGridLayout(self.rows_widget)
        self.rows_grid.setContentsMargins(0, 0, 0, 0)
        self.rows_grid.setColumnStretch(1, 1)
        self.rows_grid.setHorizontalSpacing(10)
        self.rows_grid.setVerticalSpacing(2)
        holder = QWidget()
        hv = QVBoxLayout(holder)
        hv.setContentsMargins(0, 0, 0, 0)
        hv.addWidget(self.rows_widget)
        hv.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(holder)
        self.steps_scroll = scroll
        sv.addWidget(scroll)
        lv.addWidget(steps_box, 3)

        settings_box = QGroupBox("Run settings (saved with the pipeline)")
        gv = QVBoxLayout(settings_box)
        gv.setContentsMargins(6, 6, 6, 6)
        from studio.pipeline import DataSpec, EvaluateSpec

        recipe = self.document.pipeline.recipe
        self.data_form = ParamForm(DataSpec, recipe.data.model_dump())
        self.data_form.params_edited.connect(self._data_edited)
        self.evaluate_form = ParamForm(EvaluateSpec, recipe.evaluate.model_dump())
        self.evaluate_form.params_edited.connect(self._evaluate_edited)
        width = max(self.data_form.label_width(), self.evaluate_form.label_width())
        self.data_form.set_label_width(width)
        self.evaluate_form.set_label_width(width)
        settings_inner = QWidget()
        si = QVBoxLayout(settings_inner)
        si.setContentsMargins(0, 0, 4, 0)
        si.addWidget(self._small_heading("Data"))
        si.addWidget(self.data_form)
        si.addWidget(self._small_heading("Evaluation"))
        si.addWidget(self.evaluate_form)
        si.addStretch(1)
        settings_scroll = QScrollArea()
        settings_scroll.setWidgetResizable(True)
        settings_scroll.setFrameShape(QFrame.Shape.NoFrame)
        settings_scroll.setWidget(settings_inner)
        gv.addWidget(settings_scroll)
        self.settings_box = settings_box
        lv.addWidget(settings_box, 4)
        splitter.addWidget(left)

        right = QSplitter(Qt.Orientation.Vertical)
        right.setChildrenCollapsible(False)
        pal = self.palette()
        self.loss_plot = pg.PlotWidget(
            background=pal.color(QPalette.ColorRole.Base), title="Distillation loss"
        )
        fg = pal.color(QPalette.ColorRole.Text)
        for axis in ("left", "bottom"):
            self.loss_plot.getAxis(axis).setPen(fg)
            self.loss_plot.getAxis(axis).setTextPen(fg)
        self.loss_plot.setLabel("bottom", "iteration")
        self.loss_plot.setLabel("left", "loss")
        self.loss_plot.getAxis("left").enableAutoSIPrefix(False)  # "loss", not "loss (x0.001)"
        self.loss_plot.showGrid(x=True, y=True, alpha=0.2)
        self.loss_plot.setMinimumHeight(160)
        self.loss_plot.hide()
        right.addWidget(self.loss_plot)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(10_000)
        self.log_view.setFont(mono)
        self.log_view.setPlaceholderText("The worker's log appears here when the pipeline runs.")
        self.log_view.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        right.addWidget(self.log_view)
        splitter.addWidget(right)
        splitter.setStretchFactor(0, 2)
        splitter.setStretchFactor(1, 3)
        splitter.setSizes([500, 760])

    @staticmethod
    def _small_heading(text: str) -> QLabel:
        label = QLabel(text)
        font = QFont(label.font())
        font.setBold(True)
        label.setFont(font)
        return label

    # ---------------------------------------------------------------------------- rows

    def _build_rows(self, steps: list[Any] | None = None) -> None:
        from studio.techniques.base import registry

        for row in self._rows:
            row.remove()
        self._rows = []
        techniques = registry()
        steps = self.document.pipeline.steps() if steps is None else steps
        self._n_steps = len(steps)
        self._rows.append(StepRow(self.rows_grid, 0, "Load model", "loading and checking the model"))
        for i, step in enumerate(steps):
            cls = techniques.get(step.technique)
            title = cls.title if cls is not None else step.technique
            self._rows.append(StepRow(self.rows_grid, i + 1, f"{i + 1}. {title}", step.technique))
        self._rows.append(
            StepRow(self.rows_grid, len(steps) + 1, "Evaluate", "measure the original and the new variant")
        )
        # every row in view up to a long pipeline (the settings below scroll instead): Evaluate was hidden
        # (computed from the rows' parts: the new widgets are not shown yet, so the grid's hint leaves them out)
        one = self._rows[0]
        spacing = max(0, self.rows_grid.verticalSpacing())
        per_row = max(one.title.sizeHint().height(), one.bar.sizeHint().height())
        per_row += one.message.fontMetrics().height() + 2 * spacing
        self.steps_scroll.setMinimumHeight(min(per_row * len(self._rows) + 8, 600))
        uses_distill = any(s.technique == "distill" for s in steps)
        self.loss_plot.setVisible(uses_distill or bool(self._loss))

    def row_for_step(self, step: int) -> StepRow:
        """The row of a worker step index (-1 prepare, 0..n-1 steps, n evaluation)."""
        return self._rows[max(0, min(step + 1, len(self._rows) - 1))]

    def loss_points(self) -> dict[Any, tuple[list[float], list[float]]]:
        """The plotted distillation loss by step index: (iterations, losses)."""
        return {k: (list(xs), list(ys)) for k, (xs, ys) in self._loss.items()}

    def progress_values(self) -> list[int]:
        """Every row's progress in percent (prepare, steps..., evaluate)."""
        return [row.bar.value() for row in self._rows]

    def _pipeline_changed(self, *_args: Any) -> None:
        if not self.is_running():
            self._build_rows()

    def _pipeline_reset(self) -> None:
        recipe = self.document.pipeline.recipe
        self.data_form.set_values(recipe.data.model_dump())
        self.evaluate_form.set_values(recipe.evaluate.model_dump())
        self._pipeline_changed()

    def _data_edited(self, values: dict[str, Any]) -> None:
        from studio.pipeline import DataSpec

        self.document.pipeline.set_data(DataSpec.model_validate(values))

    def _evaluate_edited(self, values: dict[str, Any]) -> None:
        from studio.pipeline import EvaluateSpec

        self.document.pipeline.set_evaluate(EvaluateSpec.model_validate(values))

    # ---------------------------------------------------------------------------- public

    def is_running(self) -> bool:
        return self.worker is not None

    @property
    def process(self) -> QProcess | None:
        """The running worker's process (None when no run is going)."""
        return None if self.worker is None else self.worker.process

    def log(self, text: str) -> None:
        secs = self._clock.elapsed() // 1000 if self._clock.isValid() else 0
        self.log_view.appendPlainText(f"[{secs // 60:02d}:{secs % 60:02d}] {text}")

    def run(self) -> bool:
        """Validate the pipeline and start the worker; problems are shown (and `failed` emitted) instead."""
        if self.is_running():
            return False
        recipe = self.document.recipe()
        problem = self._validate(recipe)
        self._reset_view(recipe)
        if problem:
            self._fail(f"The pipeline cannot run: {problem}")
            return False

        job = Job(
            recipe.model_dump(mode="json"),
            self.document.workspace.root,
            recipe_path=str(self.document.recipe_path) if self.document.recipe_path else None,
            trust=self.document.trusted,  # the person's confirmation, never the recipe's field
        )
        self.job_id = job.job_id
        worker = WorkerProcess(job, self)
        worker.event_received.connect(self._handle_event)
        worker.stray_line.connect(lambda line: self.log(f"(worker) {line}"))
        worker.note.connect(self.log)
        worker.ended.connect(self._worker_ended)
        worker.failed_to_start.connect(self._failed_to_start)
        self.worker = worker
        self._clock.start()
        self._ticker.start()
        self._tick()
        self.status_label.setText("Starting the worker…")
        self.log(f"job {self.job_id}: {len(recipe.steps)} step(s) on {recipe.model}")
        worker.start()
        self._update_buttons()
        self.started.emit()
        return True

    def cancel(self) -> None:
        """Stop the worker now (SIGTERM to its process group, SIGKILL after a grace period)."""
        worker = self.worker
        if worker is None or worker.cancelled:
            return
        self.status_label.setText("Cancelling…")
        self.log("cancelling the run")
        worker.cancel()

    def shutdown(self) -> None:
        """Stop a running worker at once and clean up (the window is closing)."""
        if self.worker is not None:
            self.worker.kill()

    # ---------------------------------------------------------------------------- worker events

    def _handle_event(self, event: Event) -> None:
        if isinstance(event, Progress):
            row_index = max(0, min(event.step + 1, len(self._rows) - 1))
            for earlier in self._rows[:row_index]:
                earlier.set(1.0)
            self.row_for_step(event.step).set(event.fraction, event.message)
            if event.message:
                self.status_label.setText(event.message)
                if self._last_message.get(event.step) != event.message:
                    self._last_message[event.step] = event.message
                    self.log(event.message)
        elif isinstance(event, Log):
            prefix = "" if event.level == "info" else f"{event.level.upper()}: "
            self.log(prefix + event.message)
        elif isinstance(event, Metric):
            if event.name == "distill_loss":
                self._add_loss(event)
            else:
                where = f" (step {event.step + 1})" if isinstance(event.step, int) and event.step >= 0 else ""
                self.log(f"{event.name} = {event.value:.6g}{where}")
        elif isinstance(event, VariantSaved):
            self.log(f"saved variant {event.variant.get('id', '?')}")
        # `done` and `error` are the outcome: shown when the worker has ended (`_worker_ended`)

    def _add_loss(self, event: Metric) -> None:
        key = event.step
        xs, ys = self._loss.setdefault(key, ([], []))
        xs.append(float(event.extra.get("iteration", len(xs))))
        ys.append(event.value)
        curve = self._curves.get(key)
        if curve is None:
            color = pg.intColor(len(self._curves), hues=6)
            name = f"step {key + 1}" if isinstance(key, int) else "loss"
            curve = self.loss_plot.plot([], [], pen=pg.mkPen(color, width=2), name=name)
            self._curves[key] = curve
        curve.setData(xs, ys)
        self.loss_plot.show()

    def _failed_to_start(self, message: str) -> None:
        self._end()
        self._fail(message)

    def _worker_ended(self, end: JobEnd) -> None:
        if self.worker is None:
            return
        self._end()
        outcome = end.outcome
        if end.cancelled:
            for row in self._rows:
                row.mark_cancelled()
            self.status_label.setText("Cancelled: nothing was saved.")
            self.log("cancelled; nothing was saved")
            self.cancelled.emit()
        elif isinstance(outcome, Done) and end.code >= 0:
            for row in self._rows:
                row.set(1.0)
            self.result = outcome.result
            summary = summarize(outcome.result)
            self.result_label.setText(summary)
            self.result_label.show()
            self.status_label.setText("Finished.")
            self.compare_button.show()
            self.log(summary)
            self.document.status.emit(summary)
            self.finished.emit(outcome.result)
            self.document.variants_changed.emit()
        elif isinstance(outcome, Error):
            where = ""
            if isinstance(outcome.step, int) and 0 <= outcome.step + 1 < len(self._rows):
                self.row_for_step(outcome.step).mark_failed()
                if 0 <= outcome.step < self._n_steps:
                    where = f"step {outcome.step + 1}: "
            if outcome.detail:
                self.log(outcome.detail.rstrip())
            self._fail(f"The run failed ({outcome.kind}): {where}{outcome.message}")
        else:
            tail = "\n".join(end.stderr[-8:])
            if end.stderr:
                self.log("worker stderr (last lines):\n" + "\n".join(end.stderr))
            self._fail(f"The worker crashed: {end.reason}." + (f"\n{tail}" if tail else ""))

    def _end(self) -> None:
        worker, self.worker = self.worker, None
        self._ticker.stop()
        self._tick()
        if worker is not None:
            worker.deleteLater()
        self._update_buttons()

    # ---------------------------------------------------------------------------- view state

    def _validate(self, recipe: Any) -> str:
        """The first problem `model-studio run` would refuse the recipe for, or ""."""
        from studio.checkpoints.stage import stage_of_source
        from studio.pipeline import check_steps
        from studio.recipe_check import check_recipe

        model = self.document.model
        try:
            if model is not None and recipe.model == self.document.source:
                # what `plan` checks, and the heads / layer names the steps give (they must exist here)
                problems = check_recipe(recipe, model)
                if problems:
                    return problems[0].message
            else:
                # No model in this window: check the steps alone (opening a checkpoint imports torch;
                # the worker does that, and refuses anything else with an error event).
                start = stage_of_source(recipe.model)
                _, problems = check_steps(recipe.steps, start, None)
                if problems:
                    return problems[0][1]
        except Exception as exc:
            return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        return ""

    def _reset_view(self, recipe: Any) -> None:
        self.result = None
        self.last_error = ""
        self._last_message = {}
        self.error_banner.hide()
        self.result_label.hide()
        self.compare_button.hide()
        self.log_view.clear()
        for curve in self._curves.values():
            self.loss_plot.removeItem(curve)
        self._curves = {}
        self._loss = {}
        self._build_rows(list(recipe.steps))

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.error_label.setText(message)
        self.error_banner.show()
        self.status_label.setText("Failed.")
        self.log(message)
        self.failed.emit(message)

    def _tick(self) -> None:
        if self._clock.isValid():
            self.elapsed_label.setText(_fmt_elapsed(self._clock.elapsed()))

    def _update_buttons(self) -> None:
        running = self.is_running()
        self.run_button.setEnabled(not running)
        self.run_action.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.cancel_action.setEnabled(running)
        self.settings_box.setEnabled(not running)
