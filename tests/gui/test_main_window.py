"""The main window: opening (builtin, missing path, trusted pickle, dropped folder), errors in the window,
layout restored from QSettings, the About box, shortcuts, and the offscreen screenshots."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys

import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QThreadPool, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent, QImage
from PySide6.QtWidgets import QApplication

from studio.gui.document import StudioDocument
from studio.gui.main_window import MainWindow
from studio.variants import Workspace

pytestmark = pytest.mark.gui

OPEN_TIMEOUT = 120000


@pytest.fixture
def make_window(qtbot, tmp_path, settings):
    windows: list[MainWindow] = []

    def make() -> MainWindow:
        document = StudioDocument(workspace=Workspace(tmp_path / "workspace"))
        window = MainWindow(document)
        qtbot.addWidget(window)
        window.show()
        windows.append(window)
        return window

    yield make
    for window in windows:
        window.close()
    QThreadPool.globalInstance().waitForDone(30000)


def _open(window: MainWindow, qtbot, source: str) -> bool:
    with qtbot.waitSignal(window.open_finished, timeout=OPEN_TIMEOUT) as finished:
        window.open_source(source)
    return finished.args[0]


def test_opens_builtin_minilm_with_its_tree_and_recent_entry(make_window, qtbot):
    window = make_window()
    assert window.size().width() == 1280 and window.size().height() == 800  # first run default
    assert [window.tabs.tabText(i) for i in range(window.tabs.count())] == ["Model", "Heads"]
    assert _open(window, qtbot, "builtin:minilm")
    assert window.document.model.source == "builtin:minilm"
    assert "builtin:minilm" in window.windowTitle() and "22.7 M parameters" in window.model_label.text()
    assert window.model_view.tree_model.rowCount() == 3  # embeddings, encoder.layer, pooler.dense
    assert window.model_view.hint.isVisible()
    window._fill_recent()
    assert window.recent_menu.actions()[0].text() == "builtin:minilm"


def test_errors_show_in_the_window_and_it_stays_usable(make_window, qtbot, tmp_path):
    window = make_window()
    assert not _open(window, qtbot, str(tmp_path / "missing.safetensors"))
    assert window.error_banner.isVisible() and "no such file" in window.error_banner.text()
    assert window.document.model is None
    assert _open(window, qtbot, "builtin:minilm")
    assert not window.error_banner.isVisible()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert not _open(window, qtbot, str(bad))
    assert str(bad) in window.error_banner.text()
    assert window.document.model.source == "builtin:minilm"  # the open model is kept
    assert "builtin:minilm" in window.model_view.tree_summary.text()


def test_a_pickled_module_asks_for_trust_first(make_window, qtbot, tmp_path):
    import torch

    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(3, 2), path)
    window = make_window()
    asked: list[str] = []
    window.ask_trust = lambda p: asked.append(p) or False
    assert not _open(window, qtbot, str(path))
    assert asked == [str(path)] and "Not opened" in window.error_banner.text()
    assert window.document.model is None

    window.ask_trust = lambda p: asked.append(p) or True
    with qtbot.waitSignal(window.document.model_changed, timeout=OPEN_TIMEOUT):
        window.open_source(str(path))
    assert len(asked) == 2 and window.document.model.format == "pickled-module"
    assert window.document.recipe().trust is True


def test_dropping_a_folder_opens_it(make_window, qtbot, bert_classifier):
    window = make_window()
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(bert_classifier))])
    args = (
        QPointF(200, 200),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    try:
        enter = QDragEnterEvent(*args)  # Qt >= 6.12 takes a QPointF
    except TypeError:
        enter = QDragEnterEvent(QPoint(200, 200), *args[1:])
    QApplication.sendEvent(window, enter)
    assert enter.isAccepted()
    drop = QDropEvent(*args)
    with qtbot.waitSignal(window.open_finished, timeout=OPEN_TIMEOUT) as finished:
        QApplication.sendEvent(window, drop)
    assert finished.args == [True] and drop.isAccepted()
    assert window.document.source == str(bert_classifier)
    assert window.document.model.family == "text-classification"


def test_layout_and_hint_are_restored_from_settings(make_window, qtbot):
    first = make_window()
    first.resize(780, 560)  # inside the offscreen screen (800x600): restoreGeometry keeps windows on screen
    assert (first.width(), first.height()) == (780, 560)
    first.tabs.setCurrentIndex(1)
    first.model_view.bins_spin.setValue(64)
    first.model_view.hint.close_button.click()
    first.close()
    second = make_window()
    assert (second.width(), second.height()) == (780, 560)
    second.restore_current_tab()
    assert second.tabs.currentIndex() == 1
    assert second.model_view.bins_spin.value() == 64
    assert not second.model_view.hint.isVisible()


def test_about_lists_versions_without_importing_torch(make_window, qtbot):
    window = make_window()
    dialog = window.show_about()
    qtbot.waitUntil(dialog.isVisible)
    text = dialog.text()
    for line in (
        f"PyTorch (torch): {importlib.metadata.version('torch')}",
        f"ONNX Runtime: {importlib.metadata.version('onnxruntime')}",
        f"Transformers: {importlib.metadata.version('transformers')}",
        f"pyqtgraph: {importlib.metadata.version('pyqtgraph')}",
        "CUDA GPU: ",
        "TensorRT: ",
    ):
        assert line in text
    dialog.close()
    code = (
        "import sys; from studio.gui.about import environment_info; info = dict(environment_info()); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(info['Qt'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("6.")


def test_menu_actions_and_shortcuts(make_window, qtbot):
    window = make_window()
    assert window.open_file_action.shortcut().toString() == "Ctrl+O"
    assert window.run_action.shortcut().toString() == "Ctrl+R"
    assert window.save_pipeline_action.shortcut().toString() == "Ctrl+S"
    assert [s.toString() for s in window.cancel_action.shortcuts()] == ["Esc", "Ctrl+."]
    with qtbot.waitSignal(window.run_requested, timeout=1000):
        window.run_action.trigger()
    with qtbot.waitSignal(window.cancel_requested, timeout=1000):
        window.cancel_action.trigger()
    window._tab_actions[1].trigger()
    assert window.tabs.currentWidget() is window.heads_view
    window.document.add_step("precision.half", {})
    assert len(window.document.pipeline) == 1
    window.undo_action.trigger()
    assert len(window.document.pipeline) == 0
    window.redo_action.trigger()
    assert len(window.document.pipeline) == 1


def test_screenshots_render_every_tab(qtbot, tmp_path, settings):
    from studio.gui.screenshots import render_all

    files = render_all(tmp_path / "shots", workspace_root=tmp_path / "workspace", demo=False)
    assert [f.name for f in files] == [
        "model.png",
        "heads.png",
        "pipeline.png",
        "run.png",
        "compare.png",
        "search.png",
        "generate.png",
    ]
    for f in files:
        image = QImage(str(f))
        assert (image.width(), image.height()) == (1280, 800)
        colours = {image.pixel(x, y) for x in range(0, 1280, 7) for y in range(0, 800, 7)}
        assert len(colours) > 50, f"{f.name} looks blank"


def test_shipped_pipelines_and_the_shortcuts_are_in_the_menus(make_window, qtbot):
    window = make_window()
    opened: list[str] = []
    window.open_pipeline_requested.connect(opened.append)
    window._fill_shipped()
    top = {a.text(): a for a in window.shipped_menu.actions()}
    assert {"minilm-small", "minilm-low-latency", "starter", "bench"} <= set(top)
    assert (
        "4-bit" in top["minilm-small"].toolTip() or "20%" in top["minilm-small"].toolTip()
    )  # what it is for
    starter = top["starter"].menu().actions()[0]
    assert starter.text() == "onnx-int8"
    starter.trigger()
    assert opened and opened[0].endswith("starter/onnx-int8.yaml")
    assert window.shortcuts_action.shortcut().toString() == "F1"
    dialog = window.show_shortcuts()
    qtbot.waitUntil(dialog.isVisible)
    keys = [dialog.table.item(r, 0).text() for r in range(dialog.table.rowCount())]
    assert "Ctrl+R" in keys and "Ctrl+Shift+P" in keys and "F1" in keys
    dialog.close()


def test_opening_another_model_leaves_nothing_of_the_old_one(make_window, qtbot, gpt2):
    window = make_window()
    assert _open(window, qtbot, "builtin:minilm")
    view = window.model_view
    module = view.proxy.index(0, 0)  # embeddings: a module, described in the centre
    view.tree.setCurrentIndex(module)
    assert "embeddings: a module" in view.placeholder.text()
    view.filter_edit.setText("no-such-layer")
    assert "No layer or tensor matches “no-such-layer”" in view.tree_summary.text()  # an empty tree says why
    view.filter_edit.setText("attention.self")
    assert view.proxy.rowCount() > 0
    assert _open(window, qtbot, str(gpt2))
    assert view.filter_edit.text() == "" and view.proxy.rowCount() == view.tree_model.rowCount() > 0
    assert "embeddings" not in view.placeholder.text() and "Select a weight tensor" in view.placeholder.text()
    assert str(gpt2) in view.tree_summary.text()
    assert window.heads_view.hover_label.text().startswith("Hover a cell")


def test_a_text_model_without_a_tokenizer_says_what_it_cannot_do(make_window, qtbot, gpt2, tmp_path):
    bare = tmp_path / "gpt2-no-tokenizer"
    bare.mkdir()
    for f in gpt2.iterdir():
        if f.is_file() and not f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, bare / f.name)
    window = make_window()
    assert _open(window, qtbot, str(bare))
    notice = window.notice_banner.text()
    assert window.notice_banner.isVisible() and "without tokenizer files" in notice and str(bare) in notice
    assert _open(window, qtbot, str(gpt2))  # the same model with its tokenizer: nothing to say
    assert not window.notice_banner.isVisible()
