"""The studio's own recipes (resources/recipes/*.yaml, what `model-studio bench` measures against the usual
recipes): each validates, and each runs on MiniLM at small sizes (few sentences, short sequences) into an
artifact that reopens and stays faithful. What is asserted is what a recipe must do on any machine: its
weights shrink, the exclusions it chose are honoured, and mixed precision meets its fidelity target on the
data it was tuned on. Benchmark outcomes (the 20% size share, speedups) depend on the CPU -- mixed precision
keeps a different set of layers float where INT8 arithmetic differs (VNNI or not) -- so they are left to
`model-studio bench`, which reports each target as met or missed."""

from __future__ import annotations

from pathlib import Path

import pytest

from studio.bench import REFERENCE, TARGETS, check_targets, recipe_files, target_mark
from studio.checkpoints import open_checkpoint
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.evaluation.measure import folder_weights_size, quality_batches, runner_for
from studio.evaluation.quality import QualityAccumulator
from studio.pipeline import execute_steps, load_recipe, plan, save_state
from studio.resources import resource

SEQ = 32
STUDIO_RECIPES = sorted(resource("recipes").glob("*.yaml"))
# Recipes whose full build meets its cosine target only after training that runs 8 steps here are held
# small to a floor of their own: minilm-tiny, 0.9901 at full size (64 sentences, sequence 128, 100 steps
# of distillation; the 0.99 target is met by 0.0001, so a small run cannot be held to it).
SMALL_RUN_FLOOR = {"tiny": 0.975}
TRAINING_STEPS = ("distill", "quantize.qat", "train.lora")


@pytest.fixture(scope="module")
def minilm():
    return open_checkpoint("builtin:minilm")


def _target(path: Path) -> str:
    return next(t for t in TARGETS if path.stem.endswith(t))


def test_every_target_has_a_recipe_and_the_bench_runs_them():
    assert {_target(p) for p in STUDIO_RECIPES} == set(TARGETS)
    assert set(STUDIO_RECIPES) <= set(recipe_files())
    for path in STUDIO_RECIPES:  # each says what it does and what it measured
        assert path.read_text().startswith("# ")


def _float_bytes(module) -> int:
    """Bytes of the Linear and Embedding layers still float (plain torch types, not the quantized ones)."""
    import torch

    return sum(
        sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        for m in module.modules()
        if type(m) in (torch.nn.Linear, torch.nn.Embedding)
    )


@pytest.mark.parametrize("path", STUDIO_RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_small_and_stays_faithful(path, minilm, tmp_path):
    from studio.events import Metric

    recipe = load_recipe(path)
    plan(recipe, minilm)  # validates as shipped
    small = recipe.model_copy(
        update={
            "data": recipe.data.model_copy(update={"calibration_examples": 16}),
            "evaluate": recipe.evaluate.model_copy(update={"sequence_length": SEQ}),
            # training steps (distill around_quantized) shortened too: 100 take minutes on a busy CPU
            "steps": [
                s.model_copy(update={"params": {**s.params, "steps": min(s.params.get("steps", 100), 8)}})
                if s.technique in TRAINING_STEPS
                else s
                for s in recipe.steps
            ],
        }
    )
    planned = plan(small, minilm)
    calibration = load_examples(small.data.calibration, small.data.calibration_examples)
    events: list = []
    if any(step.technique in ("quantize.gptq", "quantize.awq") for step in recipe.steps):
        # GPTQ on MiniLM needs its full calibration (1536 tokens for the FFN output layers' Hessians) and
        # minutes of CPU: too long here. Small, it must refuse naming the tokens it needs; the bench builds it.
        from studio.errors import BadInput

        with pytest.raises(BadInput, match="needs at least 1536 calibration tokens"):
            execute_steps(planned, tmp_path / "work", calibration, events.append)
        return
    state, _ = execute_steps(planned, tmp_path / "work", calibration, events.append)
    artifact = tmp_path / "artifact"
    save_state(state, artifact, calibration, SEQ)

    # reopened from disk like any variant, and compared with the original on sentences it never saw
    target = open_checkpoint(artifact).module if state.kind == "torch" else artifact / state.path.name
    runner = runner_for(state.kind, target, minilm)
    reference = runner_for("torch", minilm.module, minilm)
    evaluation = load_examples("builtin:sentences", 16)
    acc = QualityAccumulator(minilm.family, evaluation)
    for batch in quality_batches(minilm, evaluation, SEQ):
        acc.add(batch, reference(batch), runner(batch))
    cosine = acc.results()[1]["fidelity_cosine"]
    assert cosine >= SMALL_RUN_FLOOR.get(_target(path), TARGETS[_target(path)]["min_cosine"] - 0.002)

    metrics = [e for e in events if isinstance(e, Metric)]
    # every quantizing step made the layers it touched smaller, and the whole artifact is smaller
    shrunk = {e.step: e.value for e in metrics if e.name == "quantized_weight_bytes_after"}
    for e in metrics:
        if e.name == "quantized_weight_bytes_before" and e.value:
            assert shrunk[e.step] < e.value, (e.step, shrunk[e.step], e.value)
    size = folder_weights_size(artifact)
    original = folder_weights_size(minilm.path)
    assert size < 0.5 * original
    # mixed precision met its target on the data it chose its float layers on (the calibration examples)
    tuned = [e for e in metrics if e.name == "mixed_precision_fidelity"]
    assert len(tuned) == sum(1 for s in recipe.steps if s.params.get("mixed_precision"))
    for e in tuned:
        assert e.value >= e.extra["target"], (e.value, e.extra)
    if state.kind == "torch":
        _assert_torch_choices_honoured(path, recipe, state, size, original)


def _assert_torch_choices_honoured(path: Path, recipe, state, size: int, original: int) -> None:
    """The exclusions a torch recipe configured (or mixed precision chose) are the layers each step left
    alone; and the size is the 20% target plus exactly what mixed precision chose to keep float."""
    records = [t for t in state.transforms if t["technique"].startswith("quantize.")]
    assert len(records) == len([s for s in recipe.steps if s.technique.startswith("quantize.")])
    touched = [set(r.get("modules", [])) | set(r.get("embeddings", [])) for r in records]
    for i, step in enumerate(s for s in recipe.steps if s.technique.startswith("quantize.")):
        for pattern in step.params.get("exclude", []):
            assert not any(n == pattern or n.startswith(pattern + ".") for n in touched[i]), (i, pattern)
    for i, a in enumerate(touched):  # no layer is quantized twice
        for b in touched[i + 1 :]:
            assert not a & b
    if _target(path) == "small":
        assert size <= TARGETS["small"]["max_size_share_of_fp32"] * original + _float_bytes(state.module)


def test_check_targets_marks_met_and_missed():
    fp32 = {"size_bytes": 100, "quality": {"fidelity_cosine": 1.0}}
    row = {
        "size_bytes": 19,
        "quality": {"fidelity_cosine": 0.991},
        "speedup_vs_fp32": {"1": 2.0, "32": 5.5},
        "speedup_vs_usual_int8": {"1": 1.7, "32": 1.2},
    }
    assert check_targets("x-small", row, fp32)["met"]
    assert check_targets("x-high-throughput", row, fp32) | {"need": ""} == {
        "target": "high-throughput",
        "cosine_ok": False,
        "speed_ok": True,
        "met": False,
        "need": "",
        "got": "cosine 0.9910, b32 5.50x",
    }
    missed = check_targets("x-small", {**row, "size_bytes": 21}, fp32)
    assert (
        target_mark(missed) == "MISSED (cosine >= 0.99, size <= 20% of FP32; got cosine 0.9910, size 21.0%)"
    )
    assert target_mark(check_targets("x-small", row, fp32)).startswith("MET (")
    assert target_mark({}) == ""
    assert check_targets("x-small", row, {})["got"].endswith("size share unknown (FP32 not built)")
    assert check_targets("x-low-latency", {**row, "quality": {"fidelity_cosine": 0.996}}, fp32)["met"]
    assert not check_targets("x-small", {**row, "size_bytes": 21}, fp32)["met"]
    assert check_targets(REFERENCE, row, fp32) == {}


# ---------------------------------------------------------------------------------------------- levers


def test_compile_inductor_same_outputs_and_recompiles_when_reopened(bert_classifier, tmp_path):
    import torch

    from studio.families import family_for
    from studio.techniques.base import RunContext, get_technique, initial_state
    from studio.techniques.torch_io import save_torch_variant

    model = open_checkpoint(bert_classifier)
    family = family_for(model)
    examples = load_examples("builtin:sentences", 4)
    batch = family.batch(model, examples, 16)
    with torch.inference_mode():
        eager = family.forward(model.module, batch)
    events: list[dict] = []
    technique = get_technique("compile.inductor")()
    ctx = RunContext(
        original=model, workdir=tmp_path, calibration=examples, sequence_length=16, emit=events.append
    )
    state = technique.run(initial_state(model), technique.Params(), ctx)
    assert state.transforms[-1]["technique"] == "compile.inductor"
    assert any(e["type"] == "metric" and e["name"] == "compile_seconds" for e in events)
    with torch.inference_mode():
        compiled = family.forward(state.module, batch)
    assert torch.allclose(compiled, eager, atol=1e-4)

    folder = tmp_path / "variant"
    save_torch_variant(state.module, state.transforms, folder, model.path)
    reopened = open_checkpoint(folder).module
    assert reopened._compiled_call_impl is not None  # compiled again on reopening
    with torch.inference_mode():
        assert torch.allclose(family.forward(reopened, batch), eager, atol=1e-4)

    later = RunContext(original=model, workdir=tmp_path, later_steps=["quantize.dynamic_int8"])
    with pytest.raises(BadInput, match="last step"):
        technique.run(initial_state(model), technique.Params(warm_up=False), later)


def test_split_skip_layer_norm_and_blockwise_keep_outputs(minilm, tmp_path):
    import onnx

    from studio.checkpoints.onnx_graph import op_counts
    from studio.pipeline import Recipe

    recipe = Recipe.model_validate(
        {
            "steps": [
                {"technique": "export.onnx"},
                {"technique": "onnx.optimize", "params": {"skip_layer_norm": "split"}},
                {"technique": "onnx.quantize_blockwise", "params": {"bits": 8, "exclude_nodes": []}},
            ],
            "evaluate": {"sequence_length": SEQ},
        }
    )
    calibration = load_examples("builtin:sentences", 8)
    events: list = []
    state, _ = execute_steps(plan(recipe, minilm), tmp_path, calibration, events.append)
    ops = op_counts(state.path)
    assert "SkipLayerNormalization" not in ops
    assert ops["LayerNormalization"] == 12 and ops["Sum"] == 12
    assert ops["MatMulNBits"] == 18 and "MatMul" not in ops  # every FFN and output projection
    assert onnx.load(str(state.path)).graph.node  # a valid graph
    runner = runner_for("onnx", state.path, minilm)
    reference = runner_for("torch", minilm.module, minilm)
    evaluation = load_examples("builtin:sentences", 8)
    acc = QualityAccumulator(minilm.family, evaluation)
    for batch in quality_batches(minilm, evaluation, SEQ):
        acc.add(batch, reference(batch), runner(batch))
    assert acc.results()[1]["fidelity_cosine"] >= 0.999  # 8-bit blocks with per-block activations
