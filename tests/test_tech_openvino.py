"""export.openvino, quantize.nncf and the OpenVINO runner on builtin:minilm: real IRs converted from the
studio's ONNX export, quantized by NNCF, run by OpenVINO's CPU runtime, judged against torch, saved,
reopened, loaded by plain OpenVINO, and one full `model-studio run` through the CLI (on a tiny encoder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest
import torch

from studio.checkpoints import open_checkpoint
from studio.checkpoints.openvino_ir import NO_OPENVINO
from studio.checkpoints.stage import stage_of, stage_of_source
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.evaluation.measure import folder_weights_size, quality_batches
from studio.evaluation.quality import QualityAccumulator
from studio.evaluation.runners import make_runner
from studio.families import family_for
from studio.pipeline import check_steps, load_recipe, plan, save_state
from studio.resources import resource
from studio.techniques.base import RunContext, StageState, get_technique, initial_state
from studio.techniques.nncf_quantize import NO_NNCF
from studio.variants import Workspace

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _ctx(model, workdir: Path, events: list, calibration=None) -> RunContext:
    return RunContext(
        original=model,
        workdir=workdir,
        calibration=load_examples("builtin:sentences", 8) if calibration is None else calibration,
        sequence_length=SEQ,
        emit=events.append,
    )


def _step(technique_id: str, state: StageState, ctx: RunContext, **params) -> StageState:
    technique = get_technique(technique_id)
    return technique().run(state, technique.Params(**params), ctx)


def _metric(events, name):
    return next(e.value for e in events if getattr(e, "type", "") == "metric" and e.name == name)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


@pytest.fixture(scope="module")
def minilm():
    return open_checkpoint("builtin:minilm")


@pytest.fixture(scope="module")
def batch(minilm):
    return family_for(minilm).batch(minilm, load_examples("builtin:sentences", 6), SEQ)


@pytest.fixture(scope="module")
def reference(minilm, batch):
    with torch.no_grad():
        return family_for(minilm).forward(minilm.module, batch)


@pytest.fixture(scope="module")
def states(minilm, tmp_path_factory):
    """The ONNX graph, its FP32 IR and the NNCF INT8 IR, each with the events its step sent."""
    workdir = tmp_path_factory.mktemp("ov")
    events: dict[str, list] = {"onnx": [], "fp32": [], "int8": []}
    onnx_state = _step("export.onnx", initial_state(minilm), _ctx(minilm, workdir, events["onnx"]))
    fp32 = _step("export.openvino", onnx_state, _ctx(minilm, workdir, events["fp32"]))
    int8 = _step("quantize.nncf", fp32, _ctx(minilm, workdir, events["int8"]), subset_size=8)
    return {"onnx": onnx_state, "fp32": fp32, "int8": int8}, events


def test_fp32_ir_matches_torch(states, batch, reference):
    found, events = states
    fp32 = found["fp32"]
    assert fp32.kind == "openvino" and fp32.path.name == "model.xml"
    assert fp32.path.with_suffix(".bin").stat().st_size > 80e6  # MiniLM's float32 weights
    assert not list(fp32.path.parent.glob(".partial*"))  # written under temporary names, then renamed
    got = make_runner(fp32)(batch)
    assert got.shape == reference.shape
    assert _cosine(got, reference) > 0.999
    assert _metric(events["fp32"], "openvino_cosine") > 0.999  # the step's own check against ONNX Runtime
    assert _metric(events["fp32"], "ir_size_bytes") == folder_weights_size(fp32.path.parent)


def test_nncf_int8_is_quantized_close_and_not_larger(states, batch, reference):
    found, events = states
    fp32, int8 = found["fp32"], found["int8"]
    assert int8.kind == "openvino" and int8.path != fp32.path
    got = make_runner(int8)(batch)
    assert _cosine(got, reference) > 0.9
    assert not torch.allclose(got, make_runner(fp32)(batch), atol=1e-5)  # really changed by INT8
    assert folder_weights_size(int8.path.parent) <= folder_weights_size(fp32.path.parent)
    ops = [op.get_type_name() for op in ov.Core().read_model(str(int8.path)).get_ops()]
    assert ops.count("FakeQuantize") == _metric(events["int8"], "fake_quantize_ops") > 0
    assert "FakeQuantize" not in [op.get_type_name() for op in ov.Core().read_model(str(fp32.path)).get_ops()]
    assert int8.info["nncf"]["model_type"] == "transformer"  # a text model: NNCF's transformer scheme
    assert int8.info["nncf"]["calibration_examples"] == 8


def test_smooth_quant_alpha_reaches_nncf(minilm, states, tmp_path):
    """smooth_quant_alpha -1 turns NNCF's SmoothQuant off: none of the scales it inserts by default."""

    def smoothed(state):
        ir = ov.Core().read_model(str(state.path))
        return sum("nncf_smooth_quant" in op.get_friendly_name() for op in ir.get_ops())

    plain = _step(
        "quantize.nncf", states[0]["fp32"], _ctx(minilm, tmp_path, []), subset_size=8, smooth_quant_alpha=-1
    )
    assert smoothed(states[0]["int8"]) > 0 and smoothed(plain) == 0
    assert plain.info["nncf"]["settings"]["smooth_quant_alpha"] == -1


def test_nncf_writes_nothing_on_standard_output(minilm, states, tmp_path, capfd):
    """NNCF's log lines and progress bars go to stderr: stdout is where `bench --json` and `run --json` write."""
    from nncf.common.logging import nncf_logger

    def streams():
        return [h.stream for h in nncf_logger.handlers if type(h).__name__ == "StreamHandler"]

    fp32, before = states[0]["fp32"], streams()
    capfd.readouterr()
    _step("quantize.nncf", fp32, _ctx(minilm, tmp_path, []), subset_size=4, verify=False)
    out, err = capfd.readouterr()
    assert out == ""
    assert "Statistics collection" in err  # NNCF's own progress, kept for the person watching
    assert streams() == before  # its logger writes where it did once the call is over


def test_saved_ir_reopens_with_the_same_outputs(minilm, states, batch, tmp_path):
    found, _events = states
    int8 = found["int8"]
    files = save_state(int8, tmp_path / "artifact", [], SEQ)
    assert {"model.xml", "model.bin", "tokenizer.json"} <= {p.name for p in files}
    reopened = open_checkpoint(tmp_path / "artifact" / "model.xml")
    assert (reopened.format, reopened.family, reopened.pooling) == ("openvino", "feature-extraction", "mean")
    assert stage_of(reopened) == "openvino" and initial_state(reopened).kind == "openvino"
    assert open_checkpoint(tmp_path / "artifact").format == "openvino"  # the folder opens as its IR
    again = make_runner("openvino", reopened)(family_for(reopened).batch(reopened, _examples(6), SEQ))
    torch.testing.assert_close(again, make_runner(int8)(batch), atol=1e-6, rtol=1e-5)


def _examples(n: int):
    return load_examples("builtin:sentences", n)


def test_plain_openvino_loads_the_saved_ir(minilm, states, tmp_path, batch, reference):
    """Another tool's view: OpenVINO's own API reads and runs the saved IR (no studio code in between)."""
    found, _events = states
    save_state(found["fp32"], tmp_path / "artifact", [], SEQ)
    core = ov.Core()
    model = core.read_model(str(tmp_path / "artifact" / "model.xml"))
    assert model.get_rt_info(["model_studio", "family"]).astype(str) == "feature-extraction"
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    feeds = {i.get_any_name(): batch.inputs[i.get_any_name()].numpy() for i in compiled.inputs}
    hidden = torch.from_numpy(compiled(feeds)[compiled.outputs[0]].copy())
    mask = batch.inputs["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert _cosine(pooled, reference) > 0.999


def test_bad_input_is_refused_clearly(minilm, states, tmp_path):
    found, _events = states
    with pytest.raises(BadInput, match="needs calibration data"):
        _step("quantize.nncf", found["fp32"], _ctx(minilm, tmp_path, [], calibration=[]))

    node = onnx.helper.make_node("NoSuchOperator", ["x"], ["y"], domain="com.example")
    graph = onnx.helper.make_graph(
        [node],
        "strange",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = tmp_path / "strange.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(BadInput, match="OpenVINO cannot convert the ONNX graph") as caught:
        _step("export.openvino", StageState("onnx", minilm, path=path), _ctx(minilm, tmp_path, []))
    assert "NoSuchOperator" in caught.value.message
    assert not list(tmp_path.rglob("*.xml"))

    with pytest.raises(BadInput, match=r"quantize\.nncf: .*no-such-op"):
        _step("quantize.nncf", found["fp32"], _ctx(minilm, tmp_path, []), ignored_names=["no-such-op"])

    from studio.pipeline import Step

    _planned, problems = check_steps([Step(technique="quantize.nncf")], "torch")
    assert problems == [
        (0, "step 1 (quantize.nncf): needs an openvino model but the model gives a torch model")
    ]


def test_bench_recipes_parse_and_plan(minilm):
    names = {"08-openvino-fp32": "OpenVINO FP32", "09-openvino-nncf-int8": "OpenVINO + NNCF default INT8"}
    for name, peer in names.items():
        path = resource("recipes", "bench") / f"{name}.yaml"
        assert f"Peer: {peer}." in path.read_text()
        planned = plan(load_recipe(path), minilm)
        assert planned.final_kind == "openvino"
        assert [p.technique.id for p in planned.steps][:2] == ["export.onnx", "export.openvino"]
    from studio.bench import recipe_files

    assert {p.stem for p in recipe_files(include_studio=False)} >= set(names)
    assert stage_of_source("models/bert/model.xml") == "openvino"


def _python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The studio's Python in a fresh process; a failure shows its stderr's end."""
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_missing_openvino_or_nncf_says_so(tmp_path):
    """In processes where openvino (or only nncf) cannot be imported (a None sys.modules entry makes every
    import of it fail, as for an absent package)."""
    code = """
        import json, sys
        for name in sys.argv[1].split(","):
            sys.modules[name] = None
        from studio.techniques.base import get_technique
        print(json.dumps({t: get_technique(t)().availability() for t in ("export.openvino", "quantize.nncf")}))
        """
    out = {}
    for missing in ("openvino", "nncf"):
        done = _python("-c", textwrap.dedent(code), missing)
        out[missing] = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["openvino"] == {"export.openvino": [False, NO_OPENVINO], "quantize.nncf": [False, NO_OPENVINO]}
    assert out["nncf"] == {"export.openvino": [True, None], "quantize.nncf": [False, NO_NNCF]}

    listed = _python("-m", "studio", "techniques", "--json")
    ids = {t["id"]: t for t in json.loads(listed.stdout)}
    assert ids["export.openvino"]["output_kind"] == ids["quantize.nncf"]["input_kind"] == "openvino"


def test_model_studio_run_exports_quantizes_measures_and_reloads(bert_encoder, tmp_path):
    """The CLI's whole path (worker, measurement, workspace, reopening, export) on the tiny BERT encoder of
    tests/conftest.py: the tests above convert and quantize MiniLM itself; here MiniLM only made it slow."""
    encoder = open_checkpoint(str(bert_encoder))
    recipe = tmp_path / "peer.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            version: 1
            model: {bert_encoder}
            data: {{evaluation_examples: 6, calibration_examples: 8}}
            steps:
              - technique: export.onnx
              - technique: export.openvino
              - technique: quantize.nncf
                params: {{subset_size: 8}}
            evaluate: {{batch_sizes: [1], sequence_length: {SEQ}}}
            """
        )
    )
    ws = tmp_path / "ws"
    done = _python("-m", "studio", "run", str(recipe), "--json", "--workspace", str(ws), timeout=1500)
    result = json.loads(done.stdout)
    (variant,) = result["variants"]
    assert variant["kind"] == "openvino" and Path(variant["artifact"]).name == "model.xml"
    metrics = variant["metrics"]
    assert metrics["runtime"] == "openvino"
    assert 0 < metrics["size_bytes"] < result["baseline"]["metrics"]["size_bytes"]
    assert metrics["latency_ms"]["1"]["p50"] > 0
    assert metrics["peak_memory_mb"] > 0  # the memory probe opened and ran the saved IR
    assert 0.9 < metrics["quality"]["fidelity_cosine"] < 1.0

    # The variant folder reopened: its runner, rebuilt from the saved IR, gives the outputs it was judged on.
    row = Workspace(ws).get(variant["id"])
    reopened = open_checkpoint(row["artifact"])
    runner = make_runner("openvino", reopened)
    acc = QualityAccumulator(encoder.family, _examples(6))
    for b in quality_batches(encoder, _examples(6), SEQ):
        with torch.no_grad():
            acc.add(b, family_for(encoder).forward(encoder.module, b), runner(b))
    again = acc.results()[1]["fidelity_cosine"]
    assert again == pytest.approx(metrics["quality"]["fidelity_cosine"], abs=1e-4)

    from studio.cli import main

    out = tmp_path / "exported"
    assert (
        main(["export", variant["id"], "--format", "openvino", "--out", str(out), "--workspace", str(ws)])
        == 0
    )
    assert {"model.xml", "model.bin", "manifest.json"} <= {p.name for p in out.iterdir()}
    assert np.array_equal(
        np.fromfile(out / "model.bin", dtype=np.uint8),
        np.fromfile(Path(row["artifact"]).with_suffix(".bin"), dtype=np.uint8),
    )
