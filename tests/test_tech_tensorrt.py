"""TensorRT export: honest availability everywhere, real engine builds where TensorRT and a GPU exist."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from studio.errors import BadInput, Unavailable
from studio.evaluation.tensorrt_runner import NO_GPU, NO_TENSORRT, tensorrt_availability

AVAILABLE, REASON = tensorrt_availability()
needs_engine = pytest.mark.skipif(not AVAILABLE, reason=f"TensorRT engine builds need it: {REASON}")


def _gpu_present() -> bool:
    """Checked independently of the code under test: torch, the driver's /proc entry, nvidia-smi."""
    import torch

    if torch.cuda.is_available():
        return True
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    return shutil.which("nvidia-smi") is not None


def _ctx(model, tmp_path, examples=()):
    from studio.techniques.base import RunContext

    events: list[dict] = []
    return RunContext(
        original=model, workdir=tmp_path, calibration=list(examples), emit=events.append
    ), events


def test_availability_names_exactly_what_is_missing():
    from studio.techniques.base import get_technique

    has_package = importlib.util.find_spec("tensorrt") is not None
    has_gpu = _gpu_present()
    ok, reason = get_technique("export.tensorrt")().availability()
    assert ok == (has_package and has_gpu)
    if not has_package:
        assert NO_TENSORRT in reason
        assert (
            NO_TENSORRT == "TensorRT Python package not installed (pip install tensorrt from NVIDIA's index)"
        )
    else:
        assert not reason or NO_TENSORRT not in reason
    if not has_gpu:
        assert NO_GPU in reason
    elif reason:
        assert NO_GPU not in reason
    described = get_technique("export.tensorrt").describe()
    assert described["available"] == ok
    assert (described.get("reason") == reason) if not ok else ("reason" not in described)
    assert (described["input_kind"], described["output_kind"], described["category"]) == (
        "onnx",
        "tensorrt",
        "export",
    )


@pytest.mark.skipif(AVAILABLE, reason="TensorRT and a GPU are present here")
def test_run_raises_unavailable_with_the_reason(tiny_onnx, tmp_path):
    from studio.checkpoints import open_checkpoint
    from studio.techniques.base import get_technique, initial_state

    model = open_checkpoint(tiny_onnx)
    technique = get_technique("export.tensorrt")
    ctx, _ = _ctx(model, tmp_path)
    with pytest.raises(Unavailable) as err:
        technique().run(initial_state(model), technique.Params(), ctx)
    assert err.value.problem.startswith(REASON)
    assert err.value.exit_code == 3
    assert not list(tmp_path.rglob("model.engine"))


@pytest.mark.skipif(AVAILABLE, reason="TensorRT and a GPU are present here")
def test_runner_raises_unavailable(tmp_path, tiny_onnx):
    from studio.checkpoints import open_checkpoint
    from studio.evaluation.tensorrt_runner import TensorRTRunner
    from studio.families import family_for

    model = open_checkpoint(tiny_onnx)
    with pytest.raises(Unavailable, match=r"not installed|no NVIDIA GPU"):
        TensorRTRunner(tmp_path / "model.engine", family_for(model), model)


@pytest.mark.parametrize(
    "bad",
    [
        {"min_batch": 16, "opt_batch": 16, "max_batch": 8},
        {"min_batch": 4, "opt_batch": 2},
        {"opt_batch": 64},  # above the default max_batch 32
        {"min_seq": 256, "opt_seq": 128},
        {"opt_seq": 1024},  # above the default max_seq 512
        {"min_batch": 0},
        {"workspace_mb": 0},
        {"precision": "fp16"},
    ],
)
def test_params_refused(bad):
    from pydantic import ValidationError

    from studio.techniques.tensorrt import TensorRTParams

    with pytest.raises(ValidationError):
        TensorRTParams(**bad)


def test_params_defaults_and_descriptions():
    from studio.techniques.tensorrt import TensorRTParams

    p = TensorRTParams()
    assert (p.fp16, p.int8, p.timing_cache) == (True, False, True)
    assert p.min_batch <= p.opt_batch <= p.max_batch and p.min_seq <= p.opt_seq <= p.max_seq
    schema = TensorRTParams.model_json_schema()["properties"]
    assert all(field["description"] for field in schema.values())
    with pytest.raises(ValueError, match="min_seq <= opt_seq <= max_seq"):
        TensorRTParams(min_seq=8, opt_seq=4, max_seq=16)


def test_profile_shapes_batch_and_sequence_axes():
    from studio.techniques.tensorrt import profile_shapes

    batch, seq = (1, 8, 32), (1, 128, 512)
    assert profile_shapes("input_ids", (-1, -1), batch, seq) == ((1, 1), (8, 128), (32, 512))
    assert profile_shapes("pixels", (-1, 3, 32, 32), batch, seq) == (
        (1, 3, 32, 32),
        (8, 3, 32, 32),
        (32, 3, 32, 32),
    )
    assert profile_shapes("fixed", (2, 16), batch, seq) == ((2, 16), (2, 16), (2, 16))
    assert profile_shapes("embeds", (-1, -1, 384), batch, seq)[2] == (32, 512, 384)
    with pytest.raises(BadInput, match="dynamic axis 2"):
        profile_shapes("pixels", (-1, 3, -1, -1), batch, seq)


def test_engine_feed_maps_batches_onto_engine_inputs(marian):
    import torch

    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples
    from studio.evaluation.tensorrt_runner import engine_feed
    from studio.families import Batch, family_for

    ids = torch.tensor([[101, 7592, 102]])
    text = Batch(inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    fed = engine_feed(["input_ids", "attention_mask", "token_type_ids"], text)
    assert torch.equal(fed["token_type_ids"], torch.zeros_like(ids))
    assert set(engine_feed(["input_ids"], text)) == {"input_ids"}

    image = Batch(inputs={"x": torch.randn(2, 3, 8, 8)})
    assert engine_feed(["pixels"], image)["pixels"] is image.inputs["x"]
    with pytest.raises(BadInput, match="past_key_values"):
        engine_feed(["input_ids", "past_key_values"], text)

    model = open_checkpoint(marian)
    family = family_for(model)
    b = family.batch(model, load_examples("builtin:translation-en-de", 2), 16)
    fed = engine_feed(["input_ids", "attention_mask", "decoder_input_ids"], b, model.config)
    assert fed["decoder_input_ids"].shape == b.labels.shape
    assert int(fed["decoder_input_ids"][0, 0]) == model.config.decoder_start_token_id


# ------------------------------------------------------------------------------- real builds (GPU only)


def _export_cnn(path: Path) -> Path:
    import torch

    from tests.conftest import SmallCNN

    batch = torch.export.Dim("batch", max=64)
    program = torch.onnx.export(
        SmallCNN.make(),
        (torch.randn(2, 3, 32, 32),),
        dynamo=True,
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
    )
    program.save(str(path))
    return path


def _export_minilm(model, path: Path) -> Path:
    import torch

    from studio.evaluation.data import load_examples
    from studio.families import family_for

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    b = family_for(model).batch(model, load_examples("builtin:sentences", 4), 32)
    names = ("input_ids", "attention_mask", "token_type_ids")
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("sequence", max=512)
    program = torch.onnx.export(
        Encoder(model.module),
        tuple(b.inputs[n] for n in names),
        dynamo=True,
        input_names=list(names),
        output_names=["last_hidden_state"],
        dynamic_shapes={n: {0: batch, 1: seq} for n in names},
    )
    program.save(str(path))
    return path


def _onnxruntime(path: Path, feed: dict):
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, {n: feed[n].cpu().numpy() for n in names})[0]
    return torch.from_numpy(out)


@pytest.mark.tensorrt
@needs_engine
def test_cnn_engine_matches_onnxruntime_and_reuses_timing_cache(tmp_path):
    import torch

    from studio.checkpoints import open_checkpoint
    from studio.evaluation.tensorrt_runner import TensorRTRunner
    from studio.families import Batch, family_for
    from studio.techniques.base import get_technique, initial_state
    from studio.techniques.tensorrt import TIMING_CACHE_NAME

    onnx_path = _export_cnn(tmp_path / "cnn.onnx")
    model = open_checkpoint(onnx_path)
    technique = get_technique("export.tensorrt")
    work = tmp_path / "job"
    work.mkdir()
    ctx, events = _ctx(model, work)
    params = technique.Params(fp16=False, min_batch=1, opt_batch=4, max_batch=8, workspace_mb=256)
    out = technique().run(initial_state(model), params, ctx)

    assert out.kind == "tensorrt" and out.path.name == "model.engine" and out.path.stat().st_size > 0
    build = json.loads((out.path.parent / "build.json").read_text())
    assert build["profile"]["pixels"] == {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}
    assert build["tensorrt_version"] and build["gpu"] and build["build_seconds"] > 0
    assert build["settings"]["max_batch"] == 8 and build["timing_cache"]["reused"] is False
    assert (work / TIMING_CACHE_NAME).stat().st_size > 0
    assert any(e["type"] == "progress" and e["fraction"] == 1.0 for e in events)

    runner = TensorRTRunner(out.path, family_for(model), model)
    for n in (1, 5, 8):
        batch = Batch(inputs={"x": torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))})
        got = runner(batch)
        ref = _onnxruntime(onnx_path, {"pixels": batch.inputs["x"]})
        assert got.shape == ref.shape == (n, 10)
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    with pytest.raises(BadInput, match="outside the engine's profile"):
        runner(Batch(inputs={"x": torch.randn(9, 3, 32, 32)}))

    # A second build in the same job reuses the timing cache written by the first.
    ctx2 = dataclasses.replace(ctx, step_index=1)
    again = technique().run(initial_state(model), params, ctx2)
    assert json.loads((again.path.parent / "build.json").read_text())["timing_cache"]["reused"] is True


@pytest.mark.tensorrt
@needs_engine
@pytest.mark.parametrize("int8", [False, True])
def test_minilm_engine_matches_onnxruntime(tmp_path, int8):
    import torch
    import torch.nn.functional as F

    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples
    from studio.evaluation.tensorrt_runner import TensorRTRunner
    from studio.families import family_for
    from studio.techniques.base import StageState, get_technique

    trt = pytest.importorskip("tensorrt")
    if int8 and not hasattr(trt.BuilderFlag, "INT8"):
        pytest.skip(f"TensorRT {trt.__version__} has no INT8 calibration (QDQ graphs only)")
    model = open_checkpoint("builtin:minilm")
    family = family_for(model)
    onnx_path = _export_minilm(model, tmp_path / "minilm.onnx")
    data = load_examples("builtin:sentences", 80)
    technique = get_technique("export.tensorrt")
    ctx, _ = _ctx(model, tmp_path, examples=data[:32])
    params = technique.Params(
        fp16=True, int8=int8, min_batch=1, opt_batch=8, max_batch=16, min_seq=1, opt_seq=32, max_seq=64
    )
    out = technique().run(StageState("onnx", model, path=onnx_path), params, ctx)
    build = json.loads((out.path.parent / "build.json").read_text())
    assert build["profile"]["input_ids"]["max"] == [16, 64]
    assert build["precision"]["fp16"]
    assert bool(build["precision"]["int8"]) == int8

    runner = TensorRTRunner(out.path, family, model)
    batch = family.batch(model, data[40:52], 64)
    got = runner(batch)
    ref = family.from_primary(_onnxruntime(onnx_path, batch.inputs), batch)
    cosine = F.cosine_similarity(got, ref, dim=-1)
    assert got.shape == ref.shape == (12, 384)
    assert float(cosine.min()) > (0.9 if int8 else 0.995), cosine
    assert got.dtype == torch.float32
