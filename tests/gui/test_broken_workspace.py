"""The app's start on a workspace it cannot open (damaged studio.db, linked tmp/): a message box that says what
is wrong and how to recover, the same line on stderr, and no file touched; never a traceback."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication, QMessageBox

from studio.gui.app import open_workspace

pytestmark = pytest.mark.gui


def answer_message_box(seen: list[str]) -> None:
    """Read and close the modal box once it is up (it blocks the test until then)."""
    box = QApplication.activeModalWidget()
    if not isinstance(box, QMessageBox):
        QTimer.singleShot(20, lambda: answer_message_box(seen))
        return
    seen.append(box.text())
    box.accept()


@pytest.mark.parametrize("damage", ["corrupt-db", "linked-tmp"])
def test_a_broken_workspace_at_start_is_a_message_not_a_crash(qapp, tmp_path, capsys, damage):
    root = tmp_path / "ws"
    root.mkdir()
    if damage == "corrupt-db":
        (root / "studio.db").write_bytes(b"not sqlite at all " * 100)
        expected = "move studio.db aside"
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "keep.txt").write_text("mine")
        (root / "tmp").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        expected = "symbolic link"
    seen: list[str] = []
    QTimer.singleShot(0, lambda: answer_message_box(seen))
    assert open_workspace(root) is None
    assert len(seen) == 1 and expected in seen[0], seen
    err = capsys.readouterr().err.strip()
    assert err.startswith("model-studio: error:") and expected in err and "\n" not in err
    if damage == "corrupt-db":
        assert (root / "studio.db").read_bytes() == b"not sqlite at all " * 100
    else:
        assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "mine"


def test_a_sound_workspace_opens_without_a_message(qapp, tmp_path):
    ws = open_workspace(tmp_path / "new")
    assert ws is not None and (tmp_path / "new" / "studio.db").is_file()
