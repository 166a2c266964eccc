"""export.openvino straight from a torch model (a small random BERT classifier and a small random Llama
from conftest): the torch model is exported to ONNX on the way, so the IR carries the studio's metadata,
matches the IR of the export.onnx route and is verified against torch itself; recipes may put
export.openvino right after torch steps."""

from __future__ import annotations

import openvino as ov
import pytest
import torch

from studio.checkpoints import open_checkpoint
from studio.evaluation.data import load_examples
from studio.evaluation.runners import make_runner
from studio.families import family_for
from studio.pipeline import Step, check_steps
from studio.techniques.base import initial_state
from tests.conftest import run_step

SEQ = 16


def _metric(events, name):
    return next(e.value for e in events if getattr(e, "type", "") == "metric" and e.name == name)


@pytest.mark.parametrize("fixture", ["bert_classifier", "llama"])
def test_a_torch_model_becomes_the_same_ir_as_through_export_onnx(fixture, request, tmp_path):
    model = open_checkpoint(str(request.getfixturevalue(fixture)))
    events: list = []
    direct = run_step(model, initial_state(model), "export.openvino", tmp_path / "direct", events)
    assert direct.kind == "openvino" and direct.path.name == "model.xml"
    assert direct.info["openvino"]["from"] == "torch"
    # verified against torch itself (a high cosine on the calibration examples)
    assert _metric(events, "openvino_cosine") > 0.9999
    assert any("exporting the torch model to ONNX first" in getattr(e, "message", "") for e in events)
    fractions = [e.fraction for e in events if getattr(e, "type", "") == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # one step's progress, never backwards

    onnx_state = run_step(model, initial_state(model), "export.onnx", tmp_path / "route", verify=False)
    routed = run_step(model, onnx_state, "export.openvino", tmp_path / "route", verify=False, step_index=1)
    # the studio's metadata travels into the IR: it reopens as the same family
    reopened = open_checkpoint(str(direct.path))
    assert reopened.family == model.family and reopened.format == "openvino"
    core = ov.Core()
    a, b = core.read_model(str(direct.path)), core.read_model(str(routed.path))
    assert [p.get_any_name() for p in a.inputs] == [p.get_any_name() for p in b.inputs]
    batch = family_for(model).batch(model, load_examples("builtin:sentences", 3), SEQ)
    with torch.no_grad():
        reference = family_for(model).forward(model.module, batch)
    ours, theirs = make_runner(direct)(batch), make_runner(routed)(batch)
    assert torch.equal(ours, theirs)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_recipes_may_put_export_openvino_after_torch_steps():
    steps = [Step(technique="precision.half", params={"dtype": "float16"}), Step(technique="export.openvino")]
    _planned, problems = check_steps(steps, "torch")
    assert problems == []
    _planned, problems = check_steps([Step(technique="export.openvino")], "openvino")
    assert problems == [
        (0, "step 1 (export.openvino): needs an onnx or a torch model but the model gives an openvino model")
    ]
