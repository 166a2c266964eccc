"""File > Export on real variants of MiniLM (a bfloat16 torch variant and an ONNX variant, built once by the
worker): formats that do not fit are disabled with the reason, exports run off the GUI thread and write
the files, and errors are shown in the dialog rather than raised."""

from __future__ import annotations

import json

import pytest
from PySide6.QtCore import QPoint, QRect, QThreadPool
from PySide6.QtWidgets import QApplication, QLabel

from studio.gui.compare.view import CompareView
from studio.gui.document import StudioDocument
from studio.gui.export_dialog import ExportDialog, open_export_dialog, tensorrt_availability
from studio.gui.widgets import work_pool
from studio.variants import Workspace

pytestmark = pytest.mark.gui


@pytest.fixture
def document(built, settings):
    yield StudioDocument(workspace=Workspace(built[0]))
    for pool in (work_pool(), QThreadPool.globalInstance()):
        assert pool.waitForDone(120000), "a background task never ended"


def _dialog(qtbot, document, vid):
    dialog = ExportDialog(document, vid)
    qtbot.addWidget(dialog)
    dialog.show()
    return dialog


def test_formats_that_do_not_fit_are_disabled_with_the_reason(qtbot, document, built):
    _root, ids = built
    dialog = _dialog(qtbot, document, ids["bf16"])
    assert dialog.variant()["id"] == ids["bf16"]
    assert dialog.format_enabled("hf") and dialog.selected_format() == "hf"
    assert not dialog.format_enabled("onnx")
    assert "torch variant" in dialog.format_reason("onnx") and "export.onnx" in dialog.format_reason("onnx")
    assert not dialog.format_enabled("tensorrt")
    ok, reason = tensorrt_availability()
    if not ok:  # the machine's own reason is shown, not just the wrong kind
        assert reason in dialog.format_reason("tensorrt")
        assert reason in dialog.reason_labels["tensorrt"].text()
    assert "needs a TensorRT variant" in dialog.format_reason("tensorrt")

    assert dialog.set_variant(ids["onnx"])
    assert dialog.format_enabled("onnx") and dialog.selected_format() == "onnx"
    assert not dialog.format_enabled("hf") and "onnx variant" in dialog.format_reason("hf")

    assert dialog.set_variant(ids["original"])
    assert not any(dialog.format_enabled(f) for f in ("onnx", "tensorrt", "hf"))
    assert "original model" in dialog.format_reason("hf")
    assert not dialog.export_button.isEnabled()


def test_transformers_folder_export_of_the_bfloat16_variant(qtbot, document, built, tmp_path):
    _root, ids = built
    dialog = _dialog(qtbot, document, ids["bf16"])
    out = tmp_path / ("a-long-folder-name-that-wraps-" * 5) / "minilm-bf16"  # a message of several lines
    dialog.set_output_folder(out)
    assert dialog.export_button.isEnabled()
    with qtbot.waitSignal(dialog.exported, timeout=120000) as done:
        dialog.export()
    assert done.args[0]["out"] == str(out)
    assert (out / "config.json").is_file() and (out / "manifest.json").is_file()
    assert "studio_transforms" not in json.loads((out / "config.json").read_text())  # plain transformers
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert str(out) in dialog.message.text()
    assert dialog.export_button.isEnabled()
    _assert_nothing_overlaps(dialog)


def _assert_nothing_overlaps(dialog: ExportDialog) -> None:
    """Every visible line of the dialog has the height its text needs, and none is drawn over another."""
    qapp = QApplication.instance()
    qapp.processEvents()
    widgets = [*dialog.format_buttons.values(), *dialog.reason_labels.values(), dialog.message]
    shown = [w for w in widgets if w.isVisible()]
    rects = [QRect(w.mapTo(dialog, QPoint(0, 0)), w.size()) for w in shown]
    for i, a in enumerate(rects):
        for j in range(i + 1, len(rects)):
            assert not a.intersects(rects[j]), (shown[i], shown[j])
    for w in shown:
        if isinstance(w, QLabel) and w.text():
            assert w.height() >= w.heightForWidth(w.width()), w.text()[:40]


def test_onnx_export_writes_the_graph_and_manifest(qtbot, document, built, tmp_path):
    _root, ids = built
    dialog = _dialog(qtbot, document, ids["onnx"])
    out = tmp_path / "minilm-onnx"
    dialog.set_output_folder(out)
    with qtbot.waitSignal(dialog.exported, timeout=120000):
        dialog.export()
    assert (out / "model.onnx").stat().st_size > 80_000_000
    assert json.loads((out / "manifest.json").read_text())["id"] == ids["onnx"]


def test_an_error_is_shown_in_the_dialog_not_raised(qtbot, document, built, tmp_path):
    _root, ids = built
    dialog = _dialog(qtbot, document, ids["onnx"])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    dialog.set_output_folder(taken)
    with qtbot.waitSignal(dialog.failed, timeout=60000) as failed:
        dialog.export()
    assert "not empty" in failed.args[0]
    assert "not empty" in dialog.message.text() and dialog.message.text().startswith("Export failed")
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]  # nothing written into it


def test_html_report_of_the_selected_variants(qtbot, document, built, tmp_path):
    _root, ids = built
    dialog = ExportDialog(document, ids["bf16"], report_ids=[ids["bf16"], ids["onnx"]])
    qtbot.addWidget(dialog)
    assert [r["id"] for r in dialog.report_rows()] == [ids["bf16"], ids["onnx"]]
    with qtbot.waitSignal(dialog.report_written, timeout=120000):
        dialog.write_report_to(tmp_path / "report.html")
    text = (tmp_path / "report.html").read_text()
    variants_table = text.split("<h2>Variants</h2>")[1].split("</table>")[0]
    assert variants_table.count("<tr>") == 1 + 2  # header + the two selected variants
    assert ids["bf16"][-6:] in variants_table and ids["onnx"][-6:] in variants_table


def test_open_export_dialog_takes_the_compare_selection_or_the_newest(qtbot, document, built):
    _root, ids = built
    newest = open_export_dialog(document, None)
    qtbot.addWidget(newest)
    assert newest.variant()["id"] == ids["onnx"]  # the newest variant (not the original)

    compare = CompareView(document)
    qtbot.addWidget(compare)
    compare.select_variant(ids["bf16"])
    dialog = open_export_dialog(document, compare)
    qtbot.addWidget(dialog)
    assert dialog.variant()["id"] == ids["bf16"] and dialog.report_ids == [ids["bf16"]]
