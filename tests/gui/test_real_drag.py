"""One real mouse drag from the palette into the pipeline, under Xvfb with the xcb platform.

Offscreen Qt cannot run a QDrag, so this test starts an X server (Xvfb picks a free display itself with
-displayfd) and runs the drag in a subprocess on it: press on a palette item, move past the drag
distance (QDrag.exec starts its own event loop), then, from timers inside that loop, move the real X
pointer over the pipeline and release. Qt's xcb drag manager turns those into drag-enter/move/drop
events; the step must be added. Skipped with the reason when no X server can be started here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gui

DRAG_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from PySide6.QtCore import QPoint, Qt, QTimer
    from PySide6.QtGui import QCursor
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QApplication

    app = QApplication(sys.argv[:1])
    from studio.gui.document import StudioDocument
    from studio.gui.pipeline_editor import PipelineEditor
    from studio.variants import Workspace

    doc = StudioDocument(workspace=Workspace(sys.argv[1]))
    editor = PipelineEditor(doc)
    editor.resize(1280, 760)
    editor.move(0, 0)
    editor.show()
    ok = QTest.qWaitForWindowExposed(editor)
    editor.activateWindow()
    QTest.qWaitForWindowActive(editor, 3000)

    palette = editor.palette_view.viewport()
    item = editor.palette_view.items_by_id()["prune.magnitude"]
    start = editor.palette_view.visualItemRect(item).center()
    target = editor.list.viewport()
    drop_at = QPoint(target.width() // 2, 40)
    seen = {"drops": [], "platform": QApplication.platformName(), "exposed": ok, "in_drag_loop": False}
    editor.list.technique_dropped.connect(lambda tid, row: seen["drops"].append([tid, row]))

    def pointer(widget, pos):
        QCursor.setPos(widget.mapToGlobal(pos))  # the real X pointer
        QTest.mouseMove(widget, pos)

    path = [QPoint(start.x() + dx, start.y()) for dx in (40, 80, 120)]

    def step(i=0):
        seen["in_drag_loop"] = True  # timers fire inside QDrag.exec's event loop
        if i < len(path):
            pointer(palette, path[i])
            QTimer.singleShot(30, lambda: step(i + 1))
        elif i < len(path) + 4:
            pointer(target, QPoint(drop_at.x(), drop_at.y() + (i - len(path)) * 2))
            QTimer.singleShot(30, lambda: step(i + 1))
        else:
            QTest.mouseRelease(target, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, drop_at)

    # a watchdog: a drag that never ends must not hang the test
    QTimer.singleShot(20000, lambda: (print(json.dumps({**seen, "timeout": True})), sys.stdout.flush(), app.exit(3)))

    pointer(palette, start)
    QTest.mousePress(palette, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, start)
    QTimer.singleShot(50, step)
    pointer(palette, QPoint(start.x() + 20, start.y()))  # past the drag distance: QDrag.exec runs here
    app.processEvents()
    seen["steps"] = [s.technique for s in doc.pipeline.steps()]
    print(json.dumps(seen))
    """
)


@pytest.fixture(scope="module")
def xvfb_display():
    """A fresh Xvfb on a free display; skips when there is none to be had."""
    if sys.platform != "linux":
        pytest.skip("the real-drag test needs Linux and Xvfb")
    exe = shutil.which("Xvfb")
    if exe is None:
        pytest.skip(
            "Xvfb is not installed (apt-get install xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0)"
        )
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [exe, "-displayfd", str(write_fd), "-screen", "0", "1400x900x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as reader:
        number = reader.readline().strip()  # Xvfb writes the display number once it accepts clients
    if not number.isdigit():
        proc.kill()
        err = proc.communicate(timeout=10)[1].decode(errors="replace")[-500:]
        pytest.skip(f"Xvfb could not start: {err.strip() or 'no display number'}")
    yield f":{number}"
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_real_mouse_drag_adds_a_step(xvfb_display, tmp_path):
    script = tmp_path / "drag.py"
    script.write_text(DRAG_SCRIPT)
    env = {
        **os.environ,
        "QT_QPA_PLATFORM": "xcb",
        "DISPLAY": xvfb_display,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),  # QSettings of the child stay in the test folder
        "XDG_RUNTIME_DIR": str(tmp_path),
    }
    env.pop("WAYLAND_DISPLAY", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ws")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.getcwd(),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines and "could not connect to display" in proc.stderr.lower():
        pytest.skip(f"the xcb platform cannot use Xvfb here: {proc.stderr[-400:]}")
    if not lines and 'could not load the qt platform plugin "xcb"' in proc.stderr.lower():
        pytest.skip(f"Qt's xcb platform plugin cannot load (missing system libraries): {proc.stderr[-400:]}")
    assert lines, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
    seen = json.loads(lines[-1])
    assert seen["platform"] == "xcb"
    assert not seen.get("timeout"), seen
    assert seen["in_drag_loop"], "the drag never started"
    assert seen["drops"] == [["prune.magnitude", 0]], seen
    assert seen["steps"] == ["prune.magnitude"], seen
