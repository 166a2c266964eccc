"""Screenshots of every main view, rendered offscreen at 1280x800 on the builtin MiniLM (`model-studio
screenshots DIR`, and the README's pictures).

The window is put in a state a user would reach in a minute: a real layer selected so its histogram
shows, head importance computed and the least important heads switched off, so every tab shows real
content rather than an empty state. Settings and the workspace are temporary unless a workspace is given.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SIZE = (1280, 800)
TENSOR = "encoder.layer.0.attention.self.query.weight"
HEADS_METHOD = "gradient"
HEADS_EXAMPLES = 16
HEADS_SEQUENCE_LENGTH = 32
HEADS_OFF = 12


def _wait(condition: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
    from PySide6.QtCore import QEventLoop, QTimer

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"screenshots: gave up waiting for {what} after {timeout:.0f} s")
        loop = QEventLoop()
        QTimer.singleShot(20, loop.quit)
        loop.exec()


def _settle(ms: int = 150) -> None:
    from PySide6.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def tab_file_name(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") + ".png"


def render_all(out_dir: Path, workspace_root: Path | None = None) -> list[Path]:
    """Render each tab of the main window to `<out_dir>/<tab>.png`; returns the files written."""
    from studio.gui.app import ensure_platform

    ensure_platform()
    from PySide6.QtCore import QCoreApplication, QSettings
    from PySide6.QtWidgets import QApplication

    from studio.gui.app import build_main_window, create_app
    from studio.gui.document import StudioDocument
    from studio.variants import Workspace

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="model-studio-shots-")
    if QApplication.instance() is None:
        # A fresh process: keep the user's settings (window layout, recent files) out of it.
        QSettings.setDefaultFormat(QSettings.Format.IniFormat)
        QSettings.setPath(
            QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(Path(scratch.name) / "settings")
        )
        QCoreApplication.setOrganizationName("model-studio-screenshots")
    app = create_app()
    workspace = Workspace(Path(workspace_root) if workspace_root else Path(scratch.name) / "workspace")
    document = StudioDocument(workspace=workspace)
    window = build_main_window(document)
    written: list[Path] = []
    try:
        window.resize(*SIZE)
        window.show()
        window.tabs.setCurrentIndex(0)
        window.open_source("builtin:minilm")
        _wait(lambda: not window.opening, "builtin:minilm to open")
        if document.model is None:
            raise RuntimeError(f"screenshots: builtin:minilm did not open: {window.last_error}")

        view = window.model_view
        view.select_tensor(TENSOR)
        _wait(
            lambda: view.current is not None and view.current.stats.name == TENSOR,
            f"the histogram of {TENSOR}",
        )

        heads = window.heads_view
        heads.method_combo.setCurrentText(HEADS_METHOD)
        heads.examples_spin.setValue(HEADS_EXAMPLES)
        heads.seq_spin.setValue(HEADS_SEQUENCE_LENGTH)
        failures: list[str] = []
        heads.compute_failed.connect(failures.append)
        heads.compute()
        _wait(lambda: heads.importance is not None or bool(failures), "head importance")
        if failures:
            raise RuntimeError(f"screenshots: head importance failed: {failures[0]}")
        heads.mask_least_important(HEADS_OFF)
        _wait(lambda: heads.fidelity is not None and heads.fidelity < 1.0, "the fidelity of the masked model")

        for index in range(window.tabs.count()):
            window.tabs.setCurrentIndex(index)
            _settle()
            app.processEvents()
            path = out_dir / tab_file_name(window.tabs.tabText(index))
            if not window.grab().save(str(path)):
                raise RuntimeError(f"screenshots: could not write {path}")
            written.append(path)
        window.tabs.setCurrentIndex(0)
    finally:
        window.close()
        window.deleteLater()
        _settle(50)
        scratch.cleanup()
    return written


if __name__ == "__main__":
    import sys

    for p in render_all(Path(sys.argv[1] if len(sys.argv) > 1 else "screenshots")):
        print(p)
