"""File > Export offers the OpenVINO IR that `model-studio export --format openvino` writes: enabled for an
OpenVINO variant (a small BERT classifier converted by export.onnx and export.openvino), disabled with the
CLI's reason for any other kind, and the export copies model.xml, model.bin and the manifest, checked
against their sha256 as the CLI's export does."""

from __future__ import annotations

import json
import shutil

import pytest
from PySide6.QtCore import QThreadPool

from studio.checkpoints import open_checkpoint
from studio.gui.document import StudioDocument
from studio.gui.export_dialog import ExportDialog
from studio.gui.widgets import work_pool
from studio.techniques.base import initial_state
from studio.variants import Workspace
from tests.conftest import run_step

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def workspace(bert_classifier, tmp_path_factory):
    """The classifier as a torch variant and its OpenVINO IR as an openvino variant."""
    root = tmp_path_factory.mktemp("ov-export")
    model = open_checkpoint(str(bert_classifier))
    state = run_step(model, initial_state(model), "export.onnx", root / "work", verify=False)
    state = run_step(model, state, "export.openvino", root / "work", verify=False, step_index=1)
    ws = Workspace(root / "ws")
    rows = {}
    for kind, folder in (("torch", bert_classifier), ("openvino", state.path.parent)):
        with ws.job_folder() as job:
            shutil.copytree(folder, job / kind)
            rows[kind] = ws.commit_variant(
                job / kind, kind=kind, parent=None, model=str(bert_classifier), recipe={}, metrics={}
            )
    return ws, rows


@pytest.fixture
def dialog(qtbot, workspace, settings):
    ws, rows = workspace
    dialog = ExportDialog(StudioDocument(workspace=ws), rows["openvino"]["id"])
    qtbot.addWidget(dialog)
    dialog.show()
    yield dialog
    for pool in (work_pool(), QThreadPool.globalInstance()):
        assert pool.waitForDone(120000), "a background task never ended"


def test_an_openvino_variant_exports_its_ir(dialog, workspace, tmp_path, qtbot):
    _ws, rows = workspace
    assert dialog.format_enabled("openvino") and dialog.selected_format() == "openvino"
    for other in ("onnx", "tensorrt", "hf"):
        assert not dialog.format_enabled(other)
    assert "an openvino variant" in dialog.format_reason("hf")
    out = tmp_path / "bert-ir"
    dialog.set_output_folder(out)
    with qtbot.waitSignal(dialog.exported, timeout=120000) as done:
        dialog.export()
    result = done.args[0]
    assert result["format"] == "openvino" and result["artifact"] == str(out / "model.xml")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.bin", "model.xml"]
    assert json.loads((out / "manifest.json").read_text())["id"] == rows["openvino"]["id"]
    assert (out / "model.bin").read_bytes() == (_ws.folder(rows["openvino"]["id"]) / "model.bin").read_bytes()
    assert str(out) in dialog.message.text()


def test_other_kinds_cannot_choose_openvino_and_say_why(dialog, workspace):
    _ws, rows = workspace
    assert dialog.set_variant(rows["torch"]["id"])
    assert dialog.format_enabled("hf") and not dialog.format_enabled("openvino")
    reason = dialog.format_reason("openvino")
    assert "a torch variant" in reason and "export.openvino" in reason
    assert reason in dialog.reason_labels["openvino"].text()
    assert not dialog.set_format("openvino")
