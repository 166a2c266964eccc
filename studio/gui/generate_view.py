"""The Generate tab: one prompt, two variants (A and B) of the open causal LM or seq2seq model generating
side by side, their text streaming in token by token, with live time to first token and decode tokens/s,
and plots of decode speed and KV-cache memory against context length.

Everything is computed by a `generate` job in a worker process (studio/generate_job.py), driven by a
`WorkerProcess`; this view builds the job, shows the events as they arrive, and stops the worker on Stop.
"""

from __future__ import annotations

from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import QCoreApplication, Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QComboBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QSplitter,
    QStyle,
    QVBoxLayout,
    QWidget,
)

from studio.events import Done, Error, Event, Metric, Progress, Token
from studio.generate_job import (
    DEFAULT_NEW_TOKENS,
    GENERATIVE_FAMILIES,
    MAX_NEW_TOKENS,
    GenerateRequest,
    Side,
    generate_job,
)
from studio.gui.document import StudioDocument
from studio.gui.widgets import Banner, add_plot_export_action, plot_colors, style_legend, style_plot
from studio.gui.worker_process import WorkerProcess
from studio.jobs import JobEnd
from studio.variant_rows import label as row_label
from studio.variant_rows import model_names

LABELS = ("A", "B")
SIDE_COLORS = {"A": QColor(30, 110, 210), "B": QColor(230, 120, 20)}
DEFAULT_PROMPT = "The function returns"


class SidePane(QGroupBox):
    """One variant's output: the text so far and its live numbers."""

    def __init__(self, label: str, parent: QWidget | None = None) -> None:
        super().__init__(label, parent)
        self.label = label
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        stats = QHBoxLayout()
        self.ttft_label = QLabel("TTFT –")
        self.ttft_label.setToolTip(
            "Time to first token: the prefill of the prompt and the first token's choice"
        )
        self.speed_label = QLabel("decode – tokens/s")
        self.speed_label.setToolTip("Decode tokens per second so far (every token after the first)")
        self.count_label = QLabel("0 tokens")
        for widget in (self.ttft_label, self.speed_label, self.count_label):
            stats.addWidget(widget)
            stats.addSpacing(12)
        stats.addStretch(1)
        layout.addLayout(stats)
        self.text_view = QPlainTextEdit()
        self.text_view.setReadOnly(True)
        self.text_view.setPlaceholderText(f"What {label} generates appears here, token by token.")
        layout.addWidget(self.text_view, 1)

    def set_title(self, name: str) -> None:
        self.setTitle(f"{self.label} · {name}")

    def clear(self) -> None:
        self.text_view.clear()
        self.ttft_label.setText("TTFT –")
        self.speed_label.setText("decode – tokens/s")
        self.count_label.setText("0 tokens")

    def show_token(self, event: Token) -> None:
        self.text_view.setPlainText(event.text)
        self.text_view.verticalScrollBar().setValue(self.text_view.verticalScrollBar().maximum())
        self.ttft_label.setText(f"TTFT {event.ttft_ms:.1f} ms")
        if event.tokens > 1:
            self.speed_label.setText(f"decode {event.tokens_per_s:.0f} tokens/s")
        self.count_label.setText(f"{event.tokens} token{'s' if event.tokens != 1 else ''}")


class GenerateView(QWidget):
    started = Signal()
    finished = Signal(dict)  # the generate job's result
    failed = Signal(str)  # why it failed (an error event, a crash, a worker that did not start)
    stopped = Signal()  # the person pressed Stop; the worker has ended

    def __init__(self, document: StudioDocument, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.worker: WorkerProcess | None = None
        self.result: dict[str, Any] | None = None
        self.last_end: JobEnd | None = None
        self.last_error = ""
        self.profile_lengths: list[int] | None = None  # None: the job picks them from the model's context
        self._names: dict[str, str] = {}
        self._points: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        self._curves: dict[tuple[str, str], Any] = {}
        self._build_ui()
        document.model_changed.connect(self.refresh)
        document.variants_changed.connect(self.refresh)
        self.refresh()
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)  # no worker outlives the window

    # ---------------------------------------------------------------------------- construction

    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.setSpacing(6)
        self.notice = Banner("info")
        layout.addWidget(self.notice)
        self.error_banner = Banner("error")
        layout.addWidget(self.error_banner)

        layout.addWidget(QLabel("Prompt"))
        self.prompt_edit = QPlainTextEdit(DEFAULT_PROMPT)
        self.prompt_edit.setToolTip(
            "The text both variants continue (greedy decoding: the same text every run)"
        )
        lines = self.prompt_edit.fontMetrics().lineSpacing()
        self.prompt_edit.setFixedHeight(lines * 3 + 12)
        layout.addWidget(self.prompt_edit)

        controls = QHBoxLayout()
        self.combos: dict[str, QComboBox] = {}
        for label in LABELS:
            combo = QComboBox()
            combo.setMinimumContentsLength(24)
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setToolTip(
                f"Variant {label}: the original or one of its torch variants in the workspace "
                "(ONNX and TensorRT variants do not generate here)"
            )
            combo.currentIndexChanged.connect(self._titles_changed)
            self.combos[label] = combo
            controls.addWidget(QLabel(label))
            controls.addWidget(combo)
            controls.addSpacing(8)
        controls.addWidget(QLabel("New tokens"))
        self.tokens_spin = QSpinBox()
        self.tokens_spin.setRange(1, MAX_NEW_TOKENS)
        self.tokens_spin.setValue(DEFAULT_NEW_TOKENS)
        self.tokens_spin.setToolTip("The most tokens each variant generates (fewer if it ends its text)")
        controls.addWidget(self.tokens_spin)
        controls.addSpacing(8)
        style = self.style()
        self.generate_button = QPushButton(style.standardIcon(QStyle.StandardPixmap.SP_MediaPlay), "Generate")
        self.generate_button.setToolTip("Generate with A and B in a worker process")
        self.generate_button.clicked.connect(self.generate)
        self.stop_button = QPushButton(style.standardIcon(QStyle.StandardPixmap.SP_MediaStop), "Stop")
        self.stop_button.setToolTip("Stop the worker; the text so far stays")
        self.stop_button.clicked.connect(self.cancel)
        controls.addWidget(self.generate_button)
        controls.addWidget(self.stop_button)
        controls.addSpacing(8)
        self.status_label = QLabel("Ready.")
        self.status_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        controls.addWidget(self.status_label, 1)
        layout.addLayout(controls)

        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.setChildrenCollapsible(False)
        outputs = QWidget()
        ol = QHBoxLayout(outputs)
        ol.setContentsMargins(0, 0, 0, 0)
        self.panes = {label: SidePane(label) for label in LABELS}
        for pane in self.panes.values():
            ol.addWidget(pane)
        splitter.addWidget(outputs)

        plots = QWidget()
        pl = QHBoxLayout(plots)
        pl.setContentsMargins(0, 0, 0, 0)
        self.speed_plot = self._plot(
            "Decode speed against context length", "decode speed", "tokens/s", False, (-10, -10)
        )
        self.kv_plot = self._plot("KV-cache memory against context length", "KV cache", "B", True, (10, 10))
        pl.addWidget(self.speed_plot)
        pl.addWidget(self.kv_plot)
        splitter.addWidget(plots)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 1)
        layout.addWidget(splitter, 1)

    def _plot(
        self, title: str, name: str, units: str, si_prefix: bool, legend_at: tuple[int, int]
    ) -> pg.PlotWidget:
        """A plot against context length; its legend sits in the corner its curves leave free (speed falls
        with the context and its axis starts at 0: bottom right; the cache grows: top left)."""
        plot = pg.PlotWidget(title=title)
        style_plot(plot)
        plot.setLabel("bottom", "context length", units="tokens")
        plot.setLabel("left", name, units=units)
        plot.getAxis("bottom").enableAutoSIPrefix(False)  # "tokens", never "ktokens"
        plot.getAxis("left").enableAutoSIPrefix(si_prefix)  # bytes read best as kB / MB
        plot.showGrid(x=True, y=True, alpha=0.2)
        plot.setMinimumHeight(200)
        legend = plot.addLegend(offset=legend_at, labelTextSize="9pt")
        style_legend(legend)
        add_plot_export_action(plot, plot, title.split(" ")[0].lower())
        return plot

    def apply_theme(self) -> None:
        """Re-colour the plots and banners after a light/dark switch (the window calls every tab's)."""
        for plot in (self.speed_plot, self.kv_plot):
            style_plot(plot)
        self.notice.restyle()
        self.error_banner.restyle()

    # ---------------------------------------------------------------------------- variants

    def generative(self) -> bool:
        model = self.document.model
        return model is not None and model.family in GENERATIVE_FAMILIES

    def choices(self) -> list[tuple[str, str]]:
        """What A and B can be, as (name, key): the open model's original, then its variants in the workspace
        that generate (torch ones, and ONNX graphs exported with their cache). A key is `Side.key`:
        "source:<checkpoint>" or "row:<variant id>"."""
        if not self.generative():
            return []
        source = self.document.source
        out = [(f"original {model_names([source])[source]}", Side("", source=source).key)]
        for row in self.document.workspace.list():
            if row.get("model") == source and not row.get("missing") and generates(row):
                out.append((row_label(row), Side("", row=row["id"]).key))
        return out

    def refresh(self) -> None:
        """Fill A and B from the open model and the workspace, keeping what was chosen where it still exists."""
        choices = self.choices()
        for i, label in enumerate(LABELS):
            combo = self.combos[label]
            kept = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            for text, data in choices:
                combo.addItem(text, data)
            index = combo.findData(kept) if kept is not None else -1
            if index < 0 and choices:  # A: the original; B: the newest variant (the original if none)
                index = 0 if i == 0 else len(choices) - 1
            combo.setCurrentIndex(index)
            combo.blockSignals(False)
        model = self.document.model
        if model is None:
            self.notice.show_message(
                "Open a causal LM or seq2seq model (for example builtin:tinylm) to generate."
            )
        elif not self.generative():
            self.notice.show_message(
                f"The open model is a {model.family} model: it does not generate text. Open a causal LM or "
                "seq2seq model (for example builtin:tinylm) to generate."
            )
        else:
            self.notice.hide()
        self._titles_changed()
        self._update_buttons()

    def set_variant(self, label: str, key: str) -> None:
        """Choose what side `label` generates with (a key of `choices`)."""
        combo = self.combos[label]
        index = combo.findData(key)
        if index < 0:
            raise KeyError(f"{key} is not a choice for {label}")
        combo.setCurrentIndex(index)

    def _titles_changed(self, *_args: Any) -> None:
        for label, combo in self.combos.items():
            self.panes[label].set_title(combo.currentText() or "no variant")

    # ---------------------------------------------------------------------------- running

    def is_running(self) -> bool:
        return self.worker is not None

    def _update_buttons(self) -> None:
        running = self.is_running()
        ready = self.generative() and all(c.currentIndex() >= 0 for c in self.combos.values())
        self.generate_button.setEnabled(ready and not running)
        self.stop_button.setEnabled(running)
        for combo in self.combos.values():
            combo.setEnabled(not running)

    def request(self) -> GenerateRequest:
        sides = tuple(Side.from_key(label, self.combos[label].currentData()) for label in LABELS)
        lengths = None if self.profile_lengths is None else tuple(self.profile_lengths)
        return GenerateRequest(sides, self.prompt_edit.toPlainText(), self.tokens_spin.value(), lengths)

    def generate(self) -> bool:
        """Start the worker; False (and nothing started) when it cannot run now."""
        if self.is_running() or not self.generate_button.isEnabled():
            return False
        self.result, self.last_end, self.last_error = None, None, ""
        self.error_banner.hide()
        self._names = {label: self.combos[label].currentText() for label in LABELS}
        for pane in self.panes.values():
            pane.clear()
        self._clear_plots()
        job = generate_job(self.request(), self.document.workspace.root, trust=self.document.trusted)
        worker = WorkerProcess(job, self)
        worker.event_received.connect(self._handle_event)
        worker.ended.connect(self._ended)
        worker.failed_to_start.connect(self._failed_to_start)
        self.worker = worker
        self.status_label.setText("Starting the worker…")
        self._update_buttons()
        worker.start()
        self.started.emit()
        return True

    def cancel(self) -> None:
        """Stop: the worker's process group is terminated; the text so far stays on screen."""
        if self.worker is not None:
            self.status_label.setText("Stopping…")
            self.worker.cancel()

    def shutdown(self) -> None:
        """Stop a running worker at once (the window is closing)."""
        if self.worker is not None:
            self.worker.kill()

    def _handle_event(self, event: Event) -> None:
        if isinstance(event, Token):
            pane = self.panes.get(event.variant)
            if pane is not None:
                pane.show_token(event)
            self.status_label.setText("Generating…")
        elif isinstance(event, Metric) and event.name in ("decode_tokens_per_s", "kv_cache_bytes"):
            self.status_label.setText("Measuring decode speed and KV cache at each context length…")
            self._add_point(event)
        elif isinstance(event, Progress) and event.message:
            self.status_label.setText(event.message[:1].upper() + event.message[1:] + "…")

    def _ended(self, end: JobEnd) -> None:
        self.worker = None
        self.last_end = end
        outcome = end.outcome
        if end.cancelled:
            self.status_label.setText("Stopped.")
            self.stopped.emit()
        elif isinstance(outcome, Done):
            self.result = outcome.result
            self.status_label.setText("Done.")
            self.finished.emit(outcome.result)
        elif isinstance(outcome, Error):
            self._fail(outcome.message)
        else:
            tail = "\n".join(end.stderr[-5:])
            self._fail(f"{end.reason}" + (f"\n{tail}" if tail else ""))
        self._update_buttons()

    def _failed_to_start(self, message: str) -> None:
        self.worker = None
        self._fail(message)
        self._update_buttons()

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.status_label.setText("Failed.")
        self.error_banner.show_message(message)
        self.failed.emit(message)

    # ---------------------------------------------------------------------------- plots

    def _clear_plots(self) -> None:
        self._points.clear()
        self._curves.clear()
        for plot in (self.speed_plot, self.kv_plot):
            plot.clear()  # the legend's entries go with their curves

    def _add_point(self, event: Metric) -> None:
        label = str(event.extra.get("variant", "?"))
        key = (event.name, label)
        xs, ys = self._points.setdefault(key, ([], []))
        xs.append(float(event.extra.get("context_tokens", 0)))
        ys.append(float(event.value))
        curve = self._curves.get(key)
        if curve is None:
            plot = self.speed_plot if event.name == "decode_tokens_per_s" else self.kv_plot
            color = SIDE_COLORS.get(label, plot_colors()["foreground"])
            dashed = label == "B"  # A and B stay apart when they coincide (the same model twice)
            pen = pg.mkPen(color, width=2, style=Qt.PenStyle.DashLine if dashed else Qt.PenStyle.SolidLine)
            curve = plot.plot(
                [],
                [],
                pen=pen,
                symbol="o",
                symbolSize=7,
                symbolBrush=color,
                symbolPen=color,
                name=f"{label} · {self._names.get(label, label)}",
            )
            self._curves[key] = curve
        curve.setData(xs, ys)
        self._fit(event.name)

    def _fit(self, name: str) -> None:
        """Both axes from 0, so a plot shows how much faster or smaller, not only which is."""
        plot = self.speed_plot if name == "decode_tokens_per_s" else self.kv_plot
        series = [self._points[key] for key in self._points if key[0] == name]
        top_x = max((x for xs, _ys in series for x in xs), default=1.0)
        top_y = max((y for _xs, ys in series for y in ys), default=1.0)
        plot.setXRange(0, top_x * 1.05, padding=0)
        plot.setYRange(0, (top_y or 1.0) * 1.15, padding=0)

    def points(self, name: str, label: str) -> tuple[list[float], list[float]]:
        """The plotted (context length, value) points of metric `name` for side `label`."""
        xs, ys = self._points.get((name, label), ([], []))
        return list(xs), list(ys)


def generates(row: dict) -> bool:
    """Whether a workspace row can decode token by token: a torch variant, or an ONNX one whose recipe
    exported the graph with its KV cache (the worker checks the graph itself again)."""
    if row["kind"] == "torch":
        return True
    steps = (row.get("recipe") or {}).get("steps") or []
    return row["kind"] == "onnx" and any(
        s.get("technique") == "export.onnx" and (s.get("params") or {}).get("with_cache") for s in steps
    )
