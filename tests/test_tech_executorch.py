"""export.executorch and the ExecuTorch runner: real programs lowered to XNNPACK and run by ExecuTorch's
Python runtime, checked against torch on a small CNN and on MiniLM, and one full `model-studio run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from studio.checkpoints import open_checkpoint
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.evaluation.executorch_runner import NO_RUNTIME, PROGRAM_FILE
from studio.evaluation.runners import make_runner
from studio.families import ImageClassification, family_for
from studio.techniques.base import RunContext, StageState, get_technique, initial_state
from studio.variants import Workspace
from tests.conftest import SmallCNN

ROOT = Path(__file__).resolve().parents[1]


def _export(model, workdir: Path, state=None, seq: int = 16, **params):
    events: list = []
    ctx = RunContext(
        original=model,
        workdir=workdir,
        calibration=load_examples("builtin:sentences", 8),
        sequence_length=seq,
        emit=events.append,
    )
    technique = get_technique("export.executorch")
    out = technique().run(state or initial_state(model), technique.Params(**params), ctx)
    return out, events


def _metric(events, name):
    return next(e.value for e in events if getattr(e, "type", "") == "metric" and e.name == name)


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cnn") / "cnn.pt"
    torch.save(SmallCNN.make(), path)  # a pickled whole module: opened with trust
    return path


@pytest.fixture(scope="module")
def cnn(cnn_file):
    return open_checkpoint(str(cnn_file), trust=True)


@pytest.fixture(scope="module")
def cnn_programs(cnn, tmp_path_factory):
    return {
        q: _export(
            cnn,
            tmp_path_factory.mktemp(f"cnn-{q}"),
            quantize=q,
            calibration_batches=4,
            **({"activations": "static"} if q == "int8" else {}),  # convolutions quantized too
        )
        for q in ("none", "int8")
    }


def test_cnn_programs_match_torch_and_report_delegation(cnn, cnn_programs):
    family = family_for(cnn)
    batch = family.batch(cnn, [None] * 3, 16)  # 3 rows through a batch-1 program: three calls
    with torch.no_grad():
        reference = family.forward(cnn.module, batch)
    outputs = {}
    for q, (state, events) in cnn_programs.items():
        assert state.kind == "executorch" and state.path.suffix == ".pte"
        outputs[q] = make_runner(state)(batch)
        assert outputs[q].shape == reference.shape
        facts = json.loads((state.path.parent / PROGRAM_FILE).read_text())
        assert facts["inputs"][0]["shape"] == [1, 3, 224, 224]
        assert facts["quantize"] == q
        delegated = facts["delegation"]["delegated"]
        assert delegated.get("aten_convolution_default") == 2 and delegated.get("aten_linear_default") == 1
        assert _metric(events, "delegated_ops") == facts["delegation"]["delegated_ops"] > 0
        assert any("XNNPACK took" in getattr(e, "message", "") for e in events)
    torch.testing.assert_close(outputs["none"], reference, atol=1e-5, rtol=1e-4)
    int8 = outputs["int8"]
    assert not torch.allclose(int8, reference, atol=1e-6)  # really quantized
    assert torch.nn.functional.cosine_similarity(int8, reference, dim=-1).min() > 0.99
    int8_facts = json.loads((cnn_programs["int8"][0].path.parent / PROGRAM_FILE).read_text())
    assert any("quantize_per_tensor" in op for op in int8_facts["delegation"]["delegated"])
    sizes = {q: s.path.stat().st_size for q, (s, _e) in cnn_programs.items()}
    assert sizes["int8"] < sizes["none"]


def test_runner_refuses_an_image_of_another_size(cnn, cnn_programs):
    state, _events = cnn_programs["none"]
    runner = make_runner(state)
    small = ImageClassification((3, 32, 32)).batch(cnn, [None], 16)
    with pytest.raises(BadInput, match=r"shape \[3, 32, 32\] per row .*\[3, 224, 224\]"):
        runner(small)


class Branchy(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


def test_dynamic_control_flow_is_refused_naming_the_line(cnn, tmp_path):
    state = StageState("torch", cnn, module=Branchy())
    with pytest.raises(BadInput) as caught:
        _export(cnn, tmp_path, state=state)
    message = caught.value.message
    assert "torch.export cannot capture the model at test_tech_executorch.py:" in message
    assert "if x.sum() > 0" in message and "data-dependent" in message
    assert not list(tmp_path.rglob("*.pte"))


def test_minilm_program_matches_torch_on_shorter_padded_batches(tmp_path):
    minilm = open_checkpoint("builtin:minilm")
    state, events = _export(minilm, tmp_path, seq=16)
    facts = json.loads((state.path.parent / PROGRAM_FILE).read_text())
    assert [i["shape"] for i in facts["inputs"]] == [[1, 16]] * len(facts["inputs"])
    assert facts["delegation"]["delegated"].get("aten_linear_default", 0) >= 36  # 6 layers x 6 Linear
    assert 0 < _metric(events, "delegated_fraction") <= 1
    family = family_for(minilm)
    sentences = [e for e in load_examples("builtin:sentences", 8)][:3]
    batch = family.batch(minilm, sentences, 16)  # padded to the longest of the three, at most 16
    with torch.no_grad():
        reference = family.forward(minilm.module, batch)
    got = make_runner(state)(batch)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-3)
    # the memory probe runs the program in a fresh process, fed as the model it came from
    from studio.evaluation.measure import peak_memory

    memory = peak_memory("executorch", state.path, minilm, family.batch(minilm, sentences[:1], 16), 1)
    assert "error" not in memory, memory
    assert memory["total_mb"] >= memory["loaded_mb"] > 10  # 90 MB of float32 weights, memory-mapped
    longer = family.batch(minilm, [load_examples("builtin:sentences", 64)[-1]] * 1, 64)
    if longer.inputs["input_ids"].shape[1] > 16:
        with pytest.raises(BadInput, match="sequence_length >= "):
            make_runner(state)(longer)


def _python(code: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def test_missing_runtime_is_unavailable_and_refused(cnn_file, cnn_programs, tmp_path):
    """In a process where the executorch package cannot be imported (its sys.modules entry is None,
    which makes every import of it fail as for an absent package)."""
    recipe = tmp_path / "edge.yaml"
    recipe.write_text("version: 1\nmodel: builtin:minilm\nsteps:\n  - technique: export.executorch\n")
    done = _python(
        """
        import sys
        sys.modules["executorch"] = None
        from studio.checkpoints import open_checkpoint
        from studio.cli import main
        from studio.errors import BadInput
        from studio.evaluation.runners import make_runner
        from studio.techniques.base import get_technique

        print("available", get_technique("export.executorch")().availability())
        model = open_checkpoint(sys.argv[1], trust=True)
        try:
            make_runner("executorch", model, artifact=sys.argv[2])
        except BadInput as exc:  # asked to run a .pte: an input this installation cannot use (exit 2)
            print("runner", exc.kind, exc.message)
        sys.stdout.flush()
        sys.exit(main(["run", sys.argv[3], "--dry-run"]))
        """,
        str(cnn_file),
        str(cnn_programs["none"][0].path),
        str(recipe),
    )
    assert f"available (False, {NO_RUNTIME!r})" in done.stdout
    assert (
        f"runner bad-input {cnn_programs['none'][0].path}: this ExecuTorch program cannot run here: {NO_RUNTIME}"
        in done.stdout
    )
    assert done.returncode == 2, done.stderr
    assert NO_RUNTIME in done.stderr


def test_model_studio_run_prunes_quantizes_and_measures_the_program(cnn_file, tmp_path):
    recipe = tmp_path / "edge.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            version: 1
            model: {cnn_file}
            data: {{evaluation_examples: 8, calibration_examples: 8}}
            steps:
              - technique: prune.structured
                params: {{fraction: 0.5}}
              - technique: export.executorch
                params: {{quantize: int8, calibration_batches: 4}}
            evaluate: {{batch_sizes: [1], sequence_length: 16}}
            """
        )
    )
    ws = tmp_path / "ws"
    done = subprocess.run(
        [sys.executable, "-m", "studio", "run", str(recipe), "--json", "--trust", "--workspace", str(ws)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (variant,) = json.loads(done.stdout)["variants"]
    assert variant["kind"] == "executorch"
    assert Path(variant["artifact"]).name == "model.pte"
    metrics = variant["metrics"]
    assert metrics["runtime"] == "executorch"
    assert 0 < metrics["size_bytes"] < Path(cnn_file).stat().st_size  # half the channels, INT8
    assert metrics["latency_ms"]["1"]["p50"] > 0
    assert 0.0 < metrics["quality"]["output_cosine"] < 1.0  # pruned and quantized: not the original
    assert Workspace(ws).get(variant["id"])["kind"] == "executorch"
    # (no peak memory here: the probe process is not given the person's trust to open the pickled CNN it
    # would feed the program as; the MiniLM program's probe is checked above)

    # the A/B of the Compare tab: the program runs beside the original; it lists no weights by name
    from studio.compare import disagreements, open_row, tensor_refs

    rows = Workspace(ws).get(variant["parent"]), Workspace(ws).get(variant["id"])
    models = open_row(rows[0], trust=True), open_row(rows[1], trust=True)
    assert tensor_refs(models[1]) == {} and "ExecuTorch program (model.pte)" in models[1].notes[-1]
    worst = disagreements(rows, models, "builtin:sentences", 4, 16, k=2)
    assert len(worst) == 2 and all("variant class" in w["detail"] for w in worst)  # both sides ran


def test_minilm_int8_program_stays_close_to_torch(tmp_path):
    """prepare_pt2e turns `arange(n) + 0` in transformers' mask code into float indices unless the
    integer arithmetic is protected (keep_integer_arithmetic): calibration then failed on MiniLM."""
    minilm = open_checkpoint("builtin:minilm")
    state, events = _export(minilm, tmp_path, seq=16, quantize="int8", calibration_batches=4)  # dynamic
    family = family_for(minilm)
    batch = family.batch(minilm, load_examples("builtin:sentences", 3), 16)
    with torch.no_grad():
        reference = family.forward(minilm.module, batch)
    got = make_runner(state)(batch)
    cosine = torch.nn.functional.cosine_similarity(got, reference, dim=-1)
    # dynamic INT8 activations (each Linear's input range per call): close, and really quantized
    assert cosine.min() > 0.99 and not torch.allclose(got, reference, atol=1e-5)
    facts = json.loads((state.path.parent / PROGRAM_FILE).read_text())
    assert facts["activations"] == "dynamic"
    # INT8 Linear weights; the 47 MB word-embedding table stays float (the quantizer leaves lookups)
    assert _metric(events, "pte_size_bytes") < 68e6  # float32's program: 90 MB


def test_int8_layers_of_an_earlier_step_are_carried_to_the_xnnpack_int8_program(cnn, tmp_path):
    """quantize.dynamic_int8 / quantize.qat leave FBGEMM-packed layers that torch.export cannot capture:
    the INT8 program re-quantizes their dequantized weights; a float32 program is refused naming them."""
    ctx = RunContext(
        original=cnn,
        workdir=tmp_path / "q",
        calibration=load_examples("builtin:sentences", 8),
        emit=lambda e: None,
    )
    technique = get_technique("quantize.dynamic_int8")
    quantized = technique().run(initial_state(cnn), technique.Params(), ctx)
    (name,) = [n for n, m in quantized.module.named_modules() if type(m).__name__ == "DynamicInt8Linear"]
    with pytest.raises(
        BadInput, match=rf"holds 1 INT8 layers from an earlier step \({name}\).*quantize: int8"
    ):
        _export(cnn, tmp_path / "none", state=quantized, quantize="none")
    state, events = _export(cnn, tmp_path / "int8", state=quantized, quantize="int8", calibration_batches=4)
    facts = json.loads((state.path.parent / PROGRAM_FILE).read_text())
    assert facts["carried_int8_layers"] == [name]
    assert facts["delegation"]["delegated"].get("aten_linear_default") == 1
    assert any("INT8 layers of earlier steps carried over" in getattr(e, "message", "") for e in events)
    family = family_for(cnn)
    batch = family.batch(cnn, [None] * 2, 16)
    with torch.no_grad():
        reference = family.forward(quantized.module, batch)
    got = make_runner(state)(batch)
    assert torch.nn.functional.cosine_similarity(got, reference, dim=-1).min() > 0.99
    assert (
        type(quantized.module.get_submodule(name)).__name__ == "DynamicInt8Linear"
    )  # the input is untouched


@pytest.mark.parametrize(
    "name", ["minilm-fp32", "minilm-int8", "minilm-pruned-int8", "minilm-pruned-qat-int8"]
)
def test_the_shipped_executorch_recipes_plan_on_minilm(name):
    from studio.pipeline import load_recipe, plan
    from studio.resources import resource

    recipe = load_recipe(resource("recipes", "executorch", f"{name}.yaml"))
    steps = [s.technique.id for s in plan(recipe, open_checkpoint("builtin:minilm")).steps]
    assert steps[-1] == "export.executorch"
    if name == "minilm-pruned-qat-int8":
        assert steps == ["prune.structured", "quantize.qat", "export.executorch"]
