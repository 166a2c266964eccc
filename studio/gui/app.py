"""The desktop app: `model-studio` without a verb.

The window appears at once; the model (builtin:minilm unless a path is given) opens in the background,
because the first open imports torch and transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ORGANIZATION = "model-studio"
APPLICATION = "Model Studio"


def ensure_platform() -> None:
    """Render offscreen where there is no display (CI, ssh), unless the user chose a platform."""
    if (
        not os.environ.get("QT_QPA_PLATFORM")
        and sys.platform.startswith("linux")
        and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    ):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"


QUIET_QT_MESSAGES = ("This plugin does not support propagateSizeHints()",)


def install_message_filter() -> None:
    """Drop Qt's offscreen-plugin notices (harmless, printed for every window); keep everything else."""
    from PySide6.QtCore import QtMsgType, qInstallMessageHandler

    def handler(kind: QtMsgType, _context: object, message: str) -> None:
        if message in QUIET_QT_MESSAGES:
            return
        sys.stderr.write(message + "\n")

    qInstallMessageHandler(handler)


def app_icon():
    """The application icon: every PNG size rendered from resources/icons/model-studio.svg."""
    from PySide6.QtGui import QIcon

    from studio.resources import resources_dir

    icon = QIcon()
    for png in sorted((resources_dir() / "icons").glob("model-studio-*.png")):
        icon.addFile(str(png))
    return icon


def create_app(argv: list[str] | None = None):
    """The QApplication (made once), with the names QSettings uses and the light/dark theme applied."""
    ensure_platform()
    from PySide6.QtWidgets import QApplication

    from studio.gui.widgets import apply_theme

    app = QApplication.instance()
    if app is None:
        install_message_filter()
        app = QApplication(argv if argv is not None else sys.argv[:1])
        if not app.organizationName():
            app.setOrganizationName(ORGANIZATION)
        app.setApplicationName(APPLICATION)
        app.setApplicationDisplayName(APPLICATION)
        app.setDesktopFileName("model-studio")
        app.setWindowIcon(app_icon())
        # Collect reference cycles on the GUI thread only: a collection on a work thread that frees Qt
        # objects deadlocks with the GUI thread (Qt's lock vs the GIL).
        from pyqtgraph.util.garbage_collector import GarbageCollector

        app._studio_gc = GarbageCollector(interval=1.0)  # type: ignore[attr-defined]
    apply_theme(app)
    return app


def load_starter_pipeline(document) -> None:
    """First impression: a sensible pipeline ready to run (not on the undo stack: there is nothing to undo)."""
    from studio.pipeline import load_recipe
    from studio.resources import resource

    if len(document.pipeline) == 0:
        document.pipeline.load(load_recipe(resource("recipes", "starter", "onnx-int8.yaml")))


def build_main_window(document):
    """The main window with every tab: Model and Heads come with MainWindow; Pipeline, Run, Compare,
    Generate, Search and Graph are plugged in here and answer the window's menu requests."""
    from PySide6.QtWidgets import QApplication

    from studio.gui.main_window import MainWindow
    from studio.gui.pipeline_editor import PipelineEditor
    from studio.gui.run_panel import RunPanel

    window = MainWindow(document)
    editor = PipelineEditor(document)
    panel = RunPanel(document)
    window.pipeline_editor, window.run_panel = editor, panel
    window.add_tab(editor, "Pipeline")
    window.add_tab(panel, "Run")
    from studio.gui.compare.view import CompareView

    compare = CompareView(document)
    window.compare_view = compare
    window.add_tab(compare, "Compare")
    from studio.gui.generate_view import GenerateView

    window.generate_view = GenerateView(document)
    window.add_tab(window.generate_view, "Generate")
    from studio.gui.search_view import SearchView

    window.search_view = SearchView(document)
    window.add_tab(window.search_view, "Search")
    # a clicked trial's variant is selected in the Compare tab (refreshed first when it is new there)
    window.search_view.variant_selected.connect(
        lambda vid: compare.select_variant(vid) or (compare.refresh(), compare.select_variant(vid))
    )
    from studio.gui.graph_view import GraphView

    window.graph_view = GraphView(document)
    window.add_tab(window.graph_view, "Graph")
    panel.compare_requested.connect(lambda: window.tabs.setCurrentWidget(compare))  # offered, not forced
    window.run_requested.connect(lambda: (window.tabs.setCurrentWidget(panel), panel.run()))
    window.cancel_requested.connect(panel.cancel)
    window.cancel_requested.connect(
        lambda: compare.cancel() if window.tabs.currentWidget() is compare else None
    )
    from studio.gui.export_dialog import open_export_dialog

    window.export_requested.connect(lambda: open_export_dialog(document, window))
    window.save_pipeline_requested.connect(editor.save)
    window.save_pipeline_as_requested.connect(editor.save_as)
    window.open_pipeline_requested.connect(
        lambda path: editor.open_from(path) if path else editor.open_dialog()
    )
    panel.started.connect(lambda: window.statusBar().showMessage("Running the pipeline in a worker process…"))
    panel.failed.connect(lambda message: window.statusBar().showMessage(f"Run failed: {message}", 10000))
    panel.cancelled.connect(lambda: window.statusBar().showMessage("Run cancelled; nothing was saved", 5000))
    editor.saved.connect(lambda path: window.statusBar().showMessage(f"Saved the pipeline to {path}", 5000))
    app = QApplication.instance()
    if app is not None:
        app.aboutToQuit.connect(panel.shutdown)
        app.aboutToQuit.connect(window.search_view.shutdown)
    load_starter_pipeline(document)
    window.restore_current_tab()
    return window


def open_workspace(root: Path | None) -> Any:
    """The workspace, or None after telling the user why it cannot be opened (a damaged or read-only
    studio.db, a linked tmp/): a message box with the way to recover, and the same line on stderr."""
    from PySide6.QtWidgets import QMessageBox

    from studio.errors import StudioError
    from studio.variants import Workspace

    try:
        return Workspace(root)
    except StudioError as exc:
        print(f"model-studio: error: {exc.message}", file=sys.stderr)
        if os.environ.get("MODEL_STUDIO_SMOKE_TEST"):
            return None  # an unattended start never waits on a dialog
        QMessageBox.critical(None, f"{APPLICATION}: cannot open the workspace", exc.message)
        return None


def run_app(args: argparse.Namespace) -> int:
    app = create_app()
    from studio.gui.document import StudioDocument

    workspace_arg = getattr(args, "workspace", None)
    workspace = open_workspace(Path(workspace_arg) if workspace_arg else None)
    if workspace is None:
        return 2
    document = StudioDocument(workspace=workspace)
    window = build_main_window(document)
    window.show()
    if os.environ.get("MODEL_STUDIO_SMOKE_TEST"):
        # CI runs the README's start command with this set: the app starts, opens its model, and exits.
        def report(ok: bool) -> None:
            print(f"model-studio: window up, {window.windowTitle()!r}, model open: {ok}", flush=True)
            app.exit(0 if ok else 1)

        window.open_finished.connect(report)
    window.open_source(getattr(args, "open", None) or "builtin:minilm")
    code = app.exec()
    from studio.gui.widgets import finish_tasks

    finish_tasks()
    return code
