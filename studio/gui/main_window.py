"""The main window: menus, tabs, opening models (file, folder, drop, recent, builtin), errors in the window.

Opening a checkpoint first runs `open_checkpoint` on a pool thread (the first open imports torch and
transformers, which takes seconds), then hands the source to `StudioDocument.open_model` on the GUI
thread, which is then quick. A checkpoint that can only be read by unpickling code asks first through
`ask_trust` (overridable, so tests answer without a dialog). Nothing a user opens can crash the window:
problems appear in a banner and the status bar.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings, Qt, Signal
from PySide6.QtGui import (
    QAction,
    QActionGroup,
    QCloseEvent,
    QDragEnterEvent,
    QDropEvent,
    QGuiApplication,
    QKeySequence,
)
from PySide6.QtWidgets import (
    QApplication,
    QDialog,
    QFileDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from studio.gui.about import AboutDialog, ShortcutsDialog
from studio.gui.document import StudioDocument
from studio.gui.heads_view import HeadsView
from studio.gui.model_view import ModelView
from studio.gui.widgets import (
    Banner,
    apply_theme,
    human_count,
    run_task,
    theme_setting,
)

BUILTIN = "builtin:minilm"
CHECKPOINT_FILTER = (
    "Model checkpoints (*.safetensors *.pt *.pth *.bin *.pt2 *.ckpt *.onnx);;"
    "Recipes (*.yaml *.yml);;All files (*)"
)
RECIPE_SUFFIXES = (".yaml", ".yml")


def _recipe_summary(path: Path) -> str:
    """The recipe's first comment line: what the shipped recipes say they are for."""
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                return line.lstrip("# ").strip()
            if line.strip():
                break
    except (OSError, UnicodeDecodeError):
        pass
    return ""


def shipped_recipes() -> list[tuple[str, list[tuple[Path, str]]]]:
    """(folder, [(recipe, summary)]) of resources/recipes: the top folder first (""), then subfolders."""
    from studio.resources import resources_dir

    root = resources_dir() / "recipes"
    if not root.is_dir():
        return []
    out = []
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    for folder in folders:
        paths = sorted(p for p in folder.iterdir() if p.suffix in RECIPE_SUFFIXES and p.is_file())
        if paths:
            out.append(("" if folder == root else folder.name, [(p, _recipe_summary(p)) for p in paths]))
    return out


TEXT_FAMILIES = ("feature-extraction", "text-classification", "causal-lm", "seq2seq")


def model_notice(model: Any) -> str:
    """What a user should know at once about a model the studio opened but cannot fully use ("" if none).

    A text model without tokenizer files opens (its layers and weights can be inspected) but nothing can
    feed it text: the run, the head ranking and the A/B examples would fail later with a bare error.
    """
    if model.family in TEXT_FAMILIES and model.tokenizer_dir is None:
        folder = model.path if model.path.is_dir() else model.path.parent
        return (
            f"{model.source} is a {model.family} model without tokenizer files, so it cannot be fed text: "
            "inspecting its weights works; runs and head importance do not. Copy the tokenizer files of "
            f"the model it came from (tokenizer.json, tokenizer_config.json, …) into {folder} and open it again."
        )
    return ""


# ------------------------------------------------------------------------------------------------ window


def _probe_open(source: str, trust: bool) -> str:
    """Runs on a pool thread: does the slow part of opening (imports, headers) and reports problems."""
    from studio.checkpoints import open_checkpoint

    model = open_checkpoint(source, trust=trust)
    return model.family


class MainWindow(QMainWindow):
    # Requests the Pipeline / Run views answer (wired in app.build_main_window).
    run_requested = Signal()
    cancel_requested = Signal()
    save_pipeline_requested = Signal()
    save_pipeline_as_requested = Signal()
    open_pipeline_requested = Signal(
        str
    )  # a recipe path; "" asks the pipeline editor to show its file dialog
    export_requested = Signal()
    open_finished = Signal(bool)  # an open (started by open_source) succeeded or failed

    def __init__(self, document: StudioDocument, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self._open_task = None
        self._opening: tuple[str, bool] | None = None
        self.last_error = ""
        self.setWindowTitle("Model Studio")
        self.setAcceptDrops(True)

        self.error_banner = Banner("error")
        self.notice_banner = Banner("info")  # something about the open model that limits what runs
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.model_view = ModelView(document)
        self.heads_view = HeadsView(document)
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.setContentsMargins(4, 4, 4, 0)
        layout.addWidget(self.error_banner)
        layout.addWidget(self.notice_banner)
        layout.addWidget(self.tabs, 1)
        self.setCentralWidget(central)

        self.model_label = QLabel("no model")
        self.statusBar().addPermanentWidget(self.model_label)
        self.statusBar().showMessage("Ready", 3000)

        self._tab_actions: list[QAction] = []
        self._build_menus()
        self.add_tab(self.model_view, "Model")
        self.add_tab(self.heads_view, "Heads")

        document.error.connect(self.show_error)
        document.status.connect(lambda text: self.statusBar().showMessage(text, 10000))
        document.model_changed.connect(self._on_model_changed)
        if hasattr(QGuiApplication.styleHints(), "colorSchemeChanged"):
            QGuiApplication.styleHints().colorSchemeChanged.connect(lambda _scheme: self._apply_theme())
        self.restore_layout()

    # ---------------------------------------------------------------------------- menus

    def _action(self, menu: Any, text: str, slot: Any, shortcut: Any = None, tip: str = "") -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            if isinstance(shortcut, list):
                action.setShortcuts([QKeySequence(s) for s in shortcut])
            else:
                action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setStatusTip(tip)
            action.setToolTip(tip)
        action.triggered.connect(slot)
        menu.addAction(action)
        return action

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file = bar.addMenu("&File")
        self.open_file_action = self._action(
            file, "&Open File…", self.choose_file, QKeySequence.StandardKey.Open, "Open a checkpoint file"
        )
        self.open_folder_action = self._action(
            file,
            "Open &Folder…",
            self.choose_folder,
            "Ctrl+Shift+O",
            "Open a Hugging Face or safetensors folder",
        )
        self.recent_menu = file.addMenu("Open &Recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent)
        self.open_builtin_action = self._action(
            file,
            "Open &Built-in MiniLM",
            lambda: self.open_source(BUILTIN),
            tip="Open all-MiniLM-L6-v2, the model shipped with the studio",
        )
        file.addSeparator()
        self.open_pipeline_action = self._action(
            file, "Open &Pipeline…", lambda: self.open_pipeline_requested.emit(""), "Ctrl+Shift+P"
        )
        self.shipped_menu = file.addMenu("Open S&hipped Pipeline")
        self.shipped_menu.setToolTipsVisible(True)
        self.shipped_menu.aboutToShow.connect(self._fill_shipped)
        self._fill_shipped()
        self.save_pipeline_action = self._action(
            file, "&Save Pipeline", self.save_pipeline_requested.emit, QKeySequence.StandardKey.Save
        )
        self.save_pipeline_as_action = self._action(
            file, "Save Pipeline &As…", self.save_pipeline_as_requested.emit, "Ctrl+Shift+S"
        )
        self.export_action = self._action(
            file, "&Export…", self.export_requested.emit, "Ctrl+E", "Export a variant (ONNX, TensorRT, HF)"
        )
        file.addSeparator()
        self.quit_action = self._action(file, "&Quit", self.close, QKeySequence.StandardKey.Quit)

        edit = bar.addMenu("&Edit")
        self.undo_action = self.document.undo_stack.createUndoAction(self, "&Undo")
        self.undo_action.setShortcuts(QKeySequence.StandardKey.Undo)
        self.redo_action = self.document.undo_stack.createRedoAction(self, "&Redo")
        self.redo_action.setShortcuts([QKeySequence("Ctrl+Shift+Z"), QKeySequence("Ctrl+Y")])
        edit.addAction(self.undo_action)
        edit.addAction(self.redo_action)
        edit.addSeparator()
        self.find_action = self._action(
            edit, "&Filter Layers", self._focus_filter, QKeySequence.StandardKey.Find
        )

        self.view_menu = bar.addMenu("&View")
        theme_menu = self.view_menu.addMenu("&Theme")
        group = QActionGroup(self)
        self.theme_actions: dict[str, QAction] = {}
        for theme in ("system", "light", "dark"):
            action = QAction(theme.capitalize() if theme != "system" else "Follow the system", self)
            action.setCheckable(True)
            action.setChecked(theme == theme_setting())
            action.triggered.connect(lambda _c=False, t=theme: self.set_theme(t))
            group.addAction(action)
            theme_menu.addAction(action)
            self.theme_actions[theme] = action
        self._action(self.view_menu, "Show the “Try this” hint", self.model_view.hint.show)
        self.view_menu.addSeparator()

        run = bar.addMenu("&Run")
        self.run_action = self._action(run, "&Run Pipeline", self.run_requested.emit, "Ctrl+R")
        self.compute_heads_action = self._action(
            run, "Compute &Head Importance", self._compute_heads, "Ctrl+H"
        )
        self.cancel_action = self._action(run, "&Cancel", self.cancel, ["Esc", "Ctrl+."])

        help_menu = bar.addMenu("&Help")
        self.shortcuts_action = self._action(
            help_menu,
            "&Keyboard Shortcuts",
            self.show_shortcuts,
            "F1",
            "Every keyboard shortcut of the window",
        )
        self.about_action = self._action(help_menu, "&About Model Studio", self.show_about)

    def _fill_shipped(self) -> None:
        """The recipes that come with the studio (resources/recipes), by folder: read when the menu opens,
        so recipes added later appear without a code change."""
        self.shipped_menu.clear()
        for folder, paths in shipped_recipes():
            menu = self.shipped_menu if not folder else self.shipped_menu.addMenu(folder)
            menu.setToolTipsVisible(True)
            for path, summary in paths:
                action = menu.addAction(path.stem)
                action.setToolTip(summary or str(path))
                action.setStatusTip(summary or str(path))
                action.triggered.connect(lambda _c=False, p=str(path): self.open_pipeline_requested.emit(p))
        if self.shipped_menu.isEmpty():
            self.shipped_menu.addAction("(none found)").setEnabled(False)

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        recent = self.document.recent()
        for source in recent:
            action = self.recent_menu.addAction(source)
            action.triggered.connect(lambda _c=False, s=source: self.open_source(s))
        if not recent:
            self.recent_menu.addAction("(none yet)").setEnabled(False)
        else:
            self.recent_menu.addSeparator()
            self.recent_menu.addAction("Clear list").triggered.connect(
                lambda: QSettings().setValue("recent", [])
            )

    def stateful_views(self) -> list[QWidget]:
        """Views whose layout (splitters, options) is saved and restored with the window."""
        views = [self.model_view, self.heads_view]
        compare = getattr(self, "compare_view", None)
        return [*views, compare] if compare is not None else views

    def add_tab(self, widget: QWidget, title: str) -> int:
        index = self.tabs.addTab(widget, title)
        if index < 9:
            action = QAction(f"&{index + 1} {title}", self)
            action.setShortcut(QKeySequence(f"Ctrl+{index + 1}"))
            action.triggered.connect(lambda _c=False, w=widget: self.tabs.setCurrentWidget(w))
            self.view_menu.addAction(action)
            self._tab_actions.append(action)
        return index

    def tab(self, title: str) -> QWidget | None:
        for i in range(self.tabs.count()):
            if self.tabs.tabText(i) == title:
                return self.tabs.widget(i)
        return None

    def _focus_filter(self) -> None:
        self.tabs.setCurrentWidget(self.model_view)
        self.model_view.filter_edit.setFocus()
        self.model_view.filter_edit.selectAll()

    def _compute_heads(self) -> None:
        self.tabs.setCurrentWidget(self.heads_view)
        self.heads_view.compute()

    def cancel(self) -> None:
        """Esc / Ctrl+.: cancel what the current tab is doing (and tell the Run view)."""
        current = self.tabs.currentWidget()
        if current is not None and callable(getattr(current, "cancel", None)):
            current.cancel()
        self.cancel_requested.emit()

    # ---------------------------------------------------------------------------- opening

    @property
    def opening(self) -> bool:
        return self._opening is not None

    def choose_file(self) -> None:
        source = self.document.source
        start = str(Path(source).parent) if source and not source.startswith("builtin:") else ""
        path, _ = QFileDialog.getOpenFileName(self, "Open a checkpoint", start, CHECKPOINT_FILTER)
        if path:
            self.open_path(path)

    def choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open a checkpoint folder")
        if path:
            self.open_path(path)

    def open_path(self, path: str) -> None:
        """A path from a dialog or a drop: recipes go to the pipeline editor, anything else is a checkpoint."""
        if Path(path).suffix.lower() in RECIPE_SUFFIXES and Path(path).is_file():
            self.statusBar().showMessage(f"Opening pipeline {path}", 5000)
            self.open_pipeline_requested.emit(path)
            return
        self.open_source(path)

    def open_source(self, source: str, *, trust: bool = False) -> None:
        source = str(source)
        if self._open_task is not None:
            self._open_task.cancel()  # the answer of an earlier open is ignored
        self._opening = (source, trust)
        self.error_banner.hide()
        self.statusBar().showMessage(f"Opening {source}…")
        self.model_view.show_opening(source)
        if QApplication.overrideCursor() is None:
            QApplication.setOverrideCursor(Qt.CursorShape.BusyCursor)
        self._open_task = run_task(
            lambda: _probe_open(source, trust), on_done=self._on_probe_done, on_error=self._on_probe_failed
        )

    def _finish_open(self) -> None:
        self._open_task = None
        self._opening = None
        while QApplication.overrideCursor() is not None:
            QApplication.restoreOverrideCursor()

    def _on_probe_done(self, token: int, _family: str) -> None:
        if self._open_task is None or token != self._open_task.token or self._opening is None:
            return
        source, trust = self._opening
        self._finish_open()
        ok = self.document.open_model(source, trust=trust)
        if not ok:
            self.model_view.show_opening(None)
        self.open_finished.emit(ok)

    def _on_probe_failed(self, token: int, message: str) -> None:
        if self._open_task is None or token != self._open_task.token or self._opening is None:
            return
        source, trust = self._opening
        self._finish_open()
        if not trust and "--trust" in message:
            if self.ask_trust(source):
                self.open_source(source, trust=True)
                return
            message = f"Not opened: {message}"
        self.show_error(message)
        self.model_view.show_opening(None)
        self.statusBar().showMessage(f"Error: {message}", 15000)
        self.open_finished.emit(False)

    def ask_trust(self, path: str) -> bool:
        """Whether to unpickle `path`, which runs code from the file. Tests replace this method.

        A smoke start (MODEL_STUDIO_SMOKE_TEST, run unattended by CI and packaging) answers no: a modal
        question nobody can click would keep it from ever exiting, and no smoke start runs pickled code."""
        if os.environ.get("MODEL_STUDIO_SMOKE_TEST"):
            return False
        answer = QMessageBox.warning(
            self,
            "Open a pickled model?",
            f"<b>{path}</b> holds a pickled Python object (a whole module), not plain weights.<br><br>"
            "Loading it runs code stored in the file. Open it only if you trust where it came from.",
            QMessageBox.StandardButton.Open | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        return answer == QMessageBox.StandardButton.Open

    def show_error(self, message: str) -> None:
        self.last_error = message
        self.error_banner.show_message(message)
        self.statusBar().showMessage(f"Error: {message}", 15000)

    def _on_model_changed(self) -> None:
        model = self.document.model
        if model is None:
            self.notice_banner.hide()
            self.model_label.setText("no model")
            self.setWindowTitle("Model Studio")
            return
        params = sum(r.numel for r in model.tensors())
        self.model_label.setText(f"{model.source} · {model.family} · {human_count(params)} parameters")
        self.setWindowTitle(f"{model.source} — Model Studio")
        self.error_banner.hide()
        notice = model_notice(model)
        if notice:
            self.notice_banner.show_message(notice)
        else:
            self.notice_banner.hide()

    # ---------------------------------------------------------------------------- drag and drop

    @staticmethod
    def _local_paths(event: Any) -> list[str]:
        mime = event.mimeData()
        if mime is None or not mime.hasUrls():
            return []
        return [url.toLocalFile() for url in mime.urls() if url.isLocalFile() and url.toLocalFile()]

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if self._local_paths(event):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragMoveEvent(self, event: Any) -> None:
        if self._local_paths(event):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        paths = self._local_paths(event)
        if not paths:
            event.ignore()
            return
        event.acceptProposedAction()
        self.open_path(paths[0])
        if len(paths) > 1:
            self.statusBar().showMessage(f"Opened the first of {len(paths)} dropped items", 5000)

    # ---------------------------------------------------------------------------- theme, about

    def set_theme(self, theme: str) -> None:
        QSettings().setValue("theme", theme)
        app = QApplication.instance()
        if isinstance(app, QApplication):
            apply_theme(app, theme)
        self._apply_theme()

    def _apply_theme(self) -> None:
        app = QApplication.instance()
        if isinstance(app, QApplication) and theme_setting() == "system":
            apply_theme(app, "system")
        self.error_banner.restyle()
        self.notice_banner.restyle()
        for i in range(self.tabs.count()):
            widget = self.tabs.widget(i)
            if callable(getattr(widget, "apply_theme", None)):
                widget.apply_theme()

    def show_shortcuts(self) -> QDialog:
        dialog = ShortcutsDialog(self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()
        return dialog

    def show_about(self) -> AboutDialog:
        dialog = AboutDialog(self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()  # window-modal, does not block the event loop
        return dialog

    # ---------------------------------------------------------------------------- layout persistence

    def restore_layout(self) -> None:
        settings = QSettings()
        geometry = settings.value("main_window/geometry")
        if geometry is None or not self.restoreGeometry(geometry):
            self.resize(1280, 800)
        state = settings.value("main_window/state")
        if state is not None:
            self.restoreState(state)
        for view in self.stateful_views():
            view.restore_state(settings)

    def restore_current_tab(self) -> None:
        """Called once all tabs are added (app.build_main_window): also restores views added late."""
        compare = getattr(self, "compare_view", None)
        if compare is not None:
            compare.restore_state(QSettings())
        index = QSettings().value("main_window/tab")
        if index is not None and 0 <= int(index) < self.tabs.count():
            self.tabs.setCurrentIndex(int(index))

    def save_layout(self) -> None:
        settings = QSettings()
        settings.setValue("main_window/geometry", self.saveGeometry())
        settings.setValue("main_window/state", self.saveState())
        settings.setValue("main_window/tab", self.tabs.currentIndex())
        for view in self.stateful_views():
            view.save_state(settings)

    def closeEvent(self, event: QCloseEvent) -> None:
        self.save_layout()
        for i in range(self.tabs.count()):
            widget = self.tabs.widget(i)
            if callable(getattr(widget, "shutdown", None)):
                widget.shutdown()
        while QApplication.overrideCursor() is not None:
            QApplication.restoreOverrideCursor()
        super().closeEvent(event)
