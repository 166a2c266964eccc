"""The Search tab: run `model-studio search` on a recipe with a `search:` section and watch its study fill
in — every finished trial on a scatter of the first two objectives, the Pareto front as a step line, and a
table of all trials.

The search runs as its own process (the same command line as in a terminal), in its own session; this view
only reads the study it writes (studio.search_progress), once a second. Stop sends the search what Ctrl+C
sends: it cancels the running trial's worker, records that trial as stopped and keeps the study, so the next
Search on the same recipe resumes it. A search that does not end within `STOP_GRACE_S` is killed.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from PySide6.QtCore import QProcess, QProcessEnvironment, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QVBoxLayout,
    QWidget,
)

from studio.errors import BadInput, StudioError
from studio.gui.document import StudioDocument
from studio.gui.search_plot import SearchPlot, axis_label
from studio.gui.widgets import fill_table, fmt, make_table
from studio.jobs import StderrTail, signal_group
from studio.pipeline import Recipe, load_recipe
from studio.resources import resources_dir
from studio.search import SEARCHES_FOLDER, study_name
from studio.search_progress import (
    COMPLETE,
    INFEASIBLE,
    SearchProgress,
    StudyBusy,
    StudyReader,
)
from studio.search_space import validate_search

POLL_MS = 1000  # how often the study is read while the search runs
STOP_GRACE_S = 15.0  # after Stop: time for the search to cancel its trial's worker before it is killed
CURRENT_PIPELINE = "Current pipeline"
UNIX = sys.platform != "win32"
LOG_LINES = 200
NO_FEASIBLE = "no trial met the constraints"  # the search's last line when it ends with exit status 1


def search_command(recipe: Path, workspace: Path, trials: int, trust: bool = False) -> list[str]:
    """The command line of `model-studio search` from this Python (or this bundle's executable)."""
    head = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "studio"]
    tail = ["--trust"] if trust else []
    return [*head, "search", str(recipe), "--workspace", str(workspace), "--trials", str(trials), *tail]


def shipped_recipes() -> list[Path]:
    return sorted((resources_dir() / "recipes" / "search").glob("*.yaml"))


class SearchView(QWidget):
    variant_selected = Signal(str)  # the variant id of the trial the person clicked (point or row)
    trial_selected = Signal(int)  # the trial's number
    started = Signal()
    ended = Signal(str)  # finished, stopped or failed

    def __init__(self, document: StudioDocument, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.process: QProcess | None = None
        self.progress: SearchProgress | None = None
        self.recipe: Recipe | None = None
        self.recipe_path: Path | None = None
        self.study: str | None = None
        self.reader: StudyReader | None = None  # reads the chosen recipe's study
        self.stopping = False
        self.outcome = ""  # "", running, finished, stopped, failed
        self._stderr = StderrTail()
        self._refill = False  # the recipe list changed while a search ran
        self._rows: list[int] = []  # trial number of each table row

        self.recipe_combo = QComboBox()
        self.recipe_combo.setMinimumContentsLength(28)
        self.recipe_combo.setToolTip("A recipe with a search: section (objectives, constraints, space)")
        self.open_button = QPushButton("Open…")
        self.open_button.setToolTip("Choose a recipe file with a search: section")
        self.trials_spin = QSpinBox()
        self.trials_spin.setRange(1, 100_000)
        self.trials_spin.setToolTip("Trials in the study: a resumed study counts the ones it has")
        self.search_button = QPushButton("Search")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.setToolTip("Stop the search; the finished trials stay, and Search resumes it")
        self.status_label = QLabel("Choose a recipe with a search: section")
        self.status_label.setWordWrap(True)

        bar = QHBoxLayout()
        bar.addWidget(QLabel("Recipe:"))
        bar.addWidget(self.recipe_combo, 1)
        bar.addWidget(self.open_button)
        bar.addWidget(QLabel("Trials:"))
        bar.addWidget(self.trials_spin)
        bar.addWidget(self.search_button)
        bar.addWidget(self.stop_button)

        self.plot = SearchPlot(self)
        self.table = make_table(["trial", "state"])
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(LOG_LINES)
        self.log.setPlaceholderText("The search's own lines (one per trial) appear here")
        lower = QSplitter(Qt.Orientation.Horizontal)
        lower.addWidget(self.table)
        lower.addWidget(self.log)
        lower.setStretchFactor(0, 4)
        lower.setStretchFactor(1, 1)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.plot.plot)
        split.addWidget(lower)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.addLayout(bar)
        layout.addWidget(split, 1)
        layout.addWidget(self.status_label)

        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        self.recipe_combo.currentIndexChanged.connect(lambda _i: self._recipe_chosen())
        self.open_button.clicked.connect(self.open_dialog)
        self.search_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.plot.trial_clicked.connect(self.select_trial)
        self.table.itemSelectionChanged.connect(self._row_selected)
        # after the event: a document sets the recipe's path only once the pipeline has been replaced
        document.pipeline.reset.connect(lambda: QTimer.singleShot(0, self, self.fill_recipes))
        self.fill_recipes()

    def apply_theme(self) -> None:
        self.plot.apply_theme()

    # ---------------------------------------------------------------------------- recipes

    def _pipeline_recipe(self) -> Recipe | None:
        try:
            recipe = self.document.recipe()
        except (StudioError, ValueError):
            return None
        return recipe if recipe.search is not None else None

    def fill_recipes(self) -> None:
        """The current pipeline (when it has a search section), the shipped search recipes, the chosen files."""
        if self.process is not None:  # the running search's recipe stays chosen; the list is refilled after
            self._refill = True
            return
        self._refill = False
        chosen = self.recipe_combo.currentData()
        files = [self.recipe_combo.itemData(i) for i in range(self.recipe_combo.count())]
        extra = [p for p in files if p not in (CURRENT_PIPELINE, *shipped_recipes())]
        self.recipe_combo.blockSignals(True)
        self.recipe_combo.clear()
        if self._pipeline_recipe() is not None:
            self.recipe_combo.addItem(CURRENT_PIPELINE, CURRENT_PIPELINE)
        for path in [*shipped_recipes(), *extra]:
            self.recipe_combo.addItem(Path(path).name, path)
            self.recipe_combo.setItemData(
                self.recipe_combo.count() - 1, str(path), Qt.ItemDataRole.ToolTipRole
            )
        index = self.recipe_combo.findData(chosen)
        self.recipe_combo.setCurrentIndex(max(0, index))
        self.recipe_combo.blockSignals(False)
        if index < 0 or chosen == CURRENT_PIPELINE:  # another recipe now, or the pipeline changed
            self._recipe_chosen()

    def set_recipe(self, path: str | Path) -> bool:
        """Choose a recipe file (added to the list); False, with the reason shown, when it cannot search."""
        path = Path(path).resolve()
        if self.recipe_combo.findData(path) < 0:
            self.recipe_combo.addItem(path.name, path)
        self.recipe_combo.setCurrentIndex(self.recipe_combo.findData(path))
        return self.recipe is not None and self.recipe_path == path

    def open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a search recipe", "", "Recipes (*.yaml *.yml)")
        if path:
            self.set_recipe(path)

    def _recipe_chosen(self) -> None:
        data = self.recipe_combo.currentData()
        previous, self.recipe, self.recipe_path, self.study = self.study, None, None, None
        self.reader = None
        try:
            if data == CURRENT_PIPELINE:
                recipe = self._pipeline_recipe()
                if recipe is None:
                    raise BadInput("the current pipeline has no search: section")
                path = Path(self.document.recipe_path or "pipeline.yaml")
                path = self.document.workspace.root / SEARCHES_FOLDER / f"{path.stem}.yaml"
            elif data is not None:
                path = Path(data)
                recipe = load_recipe(path)
            else:
                self._show_status("Choose a recipe with a search: section")
                return
            spec = validate_search(recipe, path)
        except StudioError as exc:
            self._show_status(exc.message)
            self._show_progress(None)
            self.search_button.setEnabled(False)
            return
        self.recipe, self.recipe_path, self.study = recipe, path, study_name(recipe, path)
        self.reader = StudyReader(self.document.workspace, self.study, spec.objectives)
        self.trials_spin.setValue(spec.trials)
        self.search_button.setEnabled(self.process is None)
        if self.study != previous:
            self.outcome = ""  # what happened to the last search belongs to the other study
        self._show_progress(None)
        self.poll()

    # ---------------------------------------------------------------------------- the search process

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self) -> bool:
        """Start (or resume) the chosen recipe's search in its own process; False when it cannot start."""
        if self.process is not None or self.recipe is None or self.recipe_path is None:
            return False
        if self.recipe_combo.currentData() == CURRENT_PIPELINE:  # the search reads a file: write it
            self._recipe_chosen()  # the pipeline as it is now, edits since it was chosen included
            if self.recipe is None or self.recipe_path is None:
                return False
            self.recipe_path.parent.mkdir(parents=True, exist_ok=True)
            self.recipe_path.write_text(self.recipe.to_yaml(), encoding="utf-8")
        trust = self.document.trusted and self.recipe.model == self.document.source
        command = search_command(
            self.recipe_path, self.document.workspace.root, self.trials_spin.value(), trust
        )
        process = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        process.setProcessEnvironment(env)
        if UNIX:
            params = QProcess.UnixProcessParameters()
            params.flags = QProcess.UnixProcessFlag.CreateNewSession  # its own group: Stop reaches it alone
            process.setUnixProcessParameters(params)
        process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        process.readyReadStandardOutput.connect(self._read_output)
        process.finished.connect(self._finished)
        process.errorOccurred.connect(self._error)
        self.process, self.stopping, self.outcome = process, False, "running"
        self._stderr = StderrTail()
        self.log.appendPlainText("$ " + " ".join(command[1:] if len(command) > 1 else command))
        process.start(command[0], command[1:])
        self._set_running(True)
        self.timer.start()
        self._show_status()
        self.started.emit()
        return True

    def stop(self) -> None:
        """Ask the search to stop as Ctrl+C does (its trial's worker cancelled, the study kept); kill it if it
        is still there after the grace period."""
        if self.process is None or self.stopping:
            return
        self.stopping = True
        self._signal(signal.SIGINT)
        self.stop_button.setEnabled(False)
        self._show_status()
        process = self.process
        QTimer.singleShot(round(STOP_GRACE_S * 1000), self, lambda: self._kill_if_alive(process))

    def shutdown(self, wait_ms: int = 5000) -> None:
        """The window closes: stop the search and wait a little for it to keep its study sound."""
        process = self.process
        if process is None:
            return
        self.stopping = True
        self._signal(signal.SIGINT)
        if not process.waitForFinished(wait_ms):
            self._signal(signal.SIGKILL)
            process.waitForFinished(2000)

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        pid = self.process.processId()
        if UNIX and pid > 0:
            signal_group(pid, sig)
        else:
            self.process.kill()

    def _kill_if_alive(self, process: QProcess) -> None:
        if process is self.process and process.state() != QProcess.ProcessState.NotRunning:
            self.log.appendPlainText("the search did not stop: killing it")
            self._signal(signal.SIGKILL)

    def _read_output(self) -> None:
        if self.process is None:
            return
        data = bytes(self.process.readAllStandardOutput().data())
        self._stderr.feed(data)
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                self.log.appendPlainText(line.rstrip())

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart and self.process is not None:
            message = f"Could not start the search: {self.process.errorString()}"
            self.process.deleteLater()
            self.process = None
            self._ended("failed", message)

    def _finished(self, code: int, _status: QProcess.ExitStatus) -> None:
        self._read_output()
        self._stderr.close()
        process, self.process = self.process, None
        if process is not None:
            process.deleteLater()
        last = self._stderr.lines[-1] if self._stderr.lines else f"exit status {code}"
        if self.stopping:
            self._ended("stopped")
        elif code == 0:
            self._ended("finished")
        elif code == 1 and NO_FEASIBLE in last:  # every trial ran; none met the constraints
            self._ended("finished", NO_FEASIBLE)
        else:
            self._ended("failed", last)

    def _ended(self, outcome: str, message: str = "") -> None:
        self.timer.stop()
        self.outcome = outcome
        self._set_running(False)
        self.poll(force=True)  # the last write may share the file time of the read before it
        self._show_status(message)
        if self._refill:
            self.fill_recipes()
        self.ended.emit(outcome)
        if outcome in ("finished", "stopped"):
            self.document.variants_changed.emit()

    def _set_running(self, running: bool) -> None:
        self.search_button.setEnabled(not running and self.recipe is not None)
        self.stop_button.setEnabled(running)
        self.recipe_combo.setEnabled(not running)
        self.open_button.setEnabled(not running)
        self.trials_spin.setEnabled(not running)

    # ---------------------------------------------------------------------------- the study

    def poll(self, force: bool = False) -> None:
        """Read the study once; a locked study keeps what is shown until the next poll."""
        if self.reader is None or self.study is None:
            return
        try:
            progress = self.reader.read(force=force)
        except StudyBusy:
            return
        except StudioError as exc:
            self._show_status(exc.message)
            return
        self._show_progress(progress)
        self._show_status()

    def _show_progress(self, progress: SearchProgress | None) -> None:
        self.progress = progress
        if progress is None or not progress.exists:
            self.table.setRowCount(0)
            self._rows = []
            if progress is not None:
                self.plot.show(progress)
            return
        self.plot.show(progress)
        selected = self.selected_trial()
        params = sorted({k for t in progress.trials for k in t.params})
        names = list(progress.objectives)
        headers = ["trial", "state", *params, *(axis_label(n) for n in names), "feasible", "front", "variant"]
        front = set(progress.pareto)
        rows = []
        for t in progress.trials:
            values = [fmt(v) for v in t.values] if t.values is not None else ["-"] * len(names)
            state = t.state if not t.error or t.state in (COMPLETE, INFEASIBLE) else f"{t.state}: {t.error}"
            rows.append(
                [
                    t.number,
                    state,
                    *(t.params.get(k, "-") for k in params),
                    *values,
                    "yes" if t.feasible else "no",
                    "*" if t.number in front else "",
                    t.variant or "-",
                ]
            )
        self.table.blockSignals(True)
        self.table.setColumnCount(len(headers))
        self.table.setHorizontalHeaderLabels(headers)
        fill_table(self.table, rows, align_right_from=2)
        self.table.resizeColumnsToContents()
        self._rows = [t.number for t in progress.trials]
        if selected in self._rows:
            self.table.selectRow(self._rows.index(selected))
        self.table.blockSignals(False)

    def _show_status(self, message: str = "") -> None:
        """'N trials, M on the front, running|stopping…|stopped|finished|failed — why (study NAME)'."""
        parts = []
        if self.progress is not None and self.progress.exists:
            parts.append(f"{len(self.progress.trials)} trials, {len(self.progress.pareto)} on the front")
        elif self.study is not None:
            parts.append("no trials yet")
        state = "stopping…" if self.outcome == "running" and self.stopping else self.outcome
        text = ", ".join([*parts, state] if state else parts)
        if message:
            text = f"{text} — {message}" if text else message
        if self.study is not None:
            text += f" (study {self.study})"
        self.status_label.setText(text)

    # ---------------------------------------------------------------------------- selection

    def selected_trial(self) -> int | None:
        rows = self.table.selectionModel().selectedRows()
        return self._rows[rows[0].row()] if rows and rows[0].row() < len(self._rows) else None

    def select_trial(self, number: int) -> None:
        """Select a trial's row (a click on its point), ring its point, and say which variant it saved."""
        if number in self._rows:
            self.table.selectRow(self._rows.index(number))  # -> _row_selected

    def _row_selected(self) -> None:
        number = self.selected_trial()
        self.plot.select(number)
        trial = self.plot.trial(number)
        if trial is None:
            return
        self.trial_selected.emit(trial.number)
        if trial.variant:
            self.variant_selected.emit(trial.variant)
