"""A pipeline checked against the model it will run on: names of heads and layers that are not there."""

from __future__ import annotations

import pytest

from studio.checkpoints import open_checkpoint
from studio.pipeline import parse_recipe
from studio.recipe_check import UNKNOWN, check_recipe, model_layout


def recipe(*steps, **extra):
    return parse_recipe({"version": 1, "steps": list(steps), **extra})


def heads(mapping):
    return {"technique": "prune.heads", "params": {"heads": mapping}}


@pytest.fixture(scope="module")
def minilm():
    return open_checkpoint("builtin:minilm")


@pytest.fixture
def small_gpt2(gpt2):
    return open_checkpoint(str(gpt2))  # 2 blocks of 4 heads


def test_layout_of_minilm_without_loading_weights(minilm):
    layout = model_layout(minilm)
    assert "module" not in minilm.__dict__  # built on the meta device, not loaded
    assert layout.attention is not None and len(layout.attention) == 6
    assert layout.attention[0] == ("encoder.layer.0.attention", 12)
    assert "encoder.layer.5.output.dense" in layout.modules


def test_layout_from_meta_matches_the_built_module(gpt2):
    unbuilt = open_checkpoint(str(gpt2))
    built = open_checkpoint(str(gpt2))
    _ = built.module
    assert model_layout(unbuilt) == model_layout(built)
    assert [h for _, h in model_layout(built).attention] == [4, 4]


def test_heads_of_another_model_are_refused_naming_step_and_field(minilm, small_gpt2):
    # heads picked on MiniLM (12 heads per block) applied to the small GPT-2 (4 heads per block)
    r = recipe({"technique": "precision.half"}, heads({0: [7, 9], 1: [2]}))
    assert check_recipe(r, minilm) == []
    problems = check_recipe(r, small_gpt2)
    assert len(problems) == 1
    (p,) = problems
    assert (p.step, p.field) == (1, "heads")
    assert "step 2 (prune.heads)" in p.message
    assert "block 0 (transformer.h.0.attn) has 4 heads" in p.message and "no head 7, 9" in p.message


def test_a_block_the_model_does_not_have(small_gpt2):
    (p,) = check_recipe(recipe(heads({5: [0]})), small_gpt2)
    assert p.field == "heads" and "attention block 5" in p.message and "has 2 (0-1)" in p.message


def test_removing_every_head_of_a_block(small_gpt2):
    (p,) = check_recipe(recipe(heads({1: [0, 1, 2, 3]})), small_gpt2)
    assert "removes all 4 heads of block 1" in p.message


def test_count_larger_than_the_model_allows(minilm, small_gpt2):
    r = recipe({"technique": "prune.heads", "params": {"count": 10}})
    assert check_recipe(r, minilm) == []  # 72 heads, 66 may go
    (p,) = check_recipe(r, small_gpt2)  # 8 heads, 6 may go
    assert p.field == "count" and "at most 6" in p.message


def test_exclude_patterns_that_match_no_layer(minilm, small_gpt2):
    bert_names = {"technique": "quantize.dynamic_int8", "params": {"exclude": ["pooler", "*.output.dense"]}}
    assert check_recipe(recipe(bert_names), minilm) == []
    (p,) = check_recipe(recipe(bert_names), small_gpt2)
    assert (p.step, p.field) == (0, "exclude")
    assert "'pooler', '*.output.dense'" in p.message and "no layer of this model" in p.message


def test_default_exclude_patterns_are_not_problems(small_gpt2):
    # prune.magnitude's default names classifier heads too; a model without one is fine
    assert (
        check_recipe(recipe({"technique": "prune.magnitude", "params": {"sparsity": 0.5}}), small_gpt2) == []
    )
    r = recipe(
        {"technique": "prune.magnitude", "params": {"sparsity": 0.5, "exclude": ["*lm_head*", "bert.*"]}}
    )
    (p,) = check_recipe(r, small_gpt2)
    assert "'bert.*' matches no layer" in p.message


def test_family_and_stage_problems_come_from_check_steps(cnn_torchscript, minilm):
    cnn = open_checkpoint(str(cnn_torchscript))
    (p,) = check_recipe(recipe(heads({0: [0]})), cnn)
    assert p.step == 0 and p.field is None and "does not apply to image-classification" in p.message
    problems = check_recipe(recipe({"technique": "export.onnx"}, heads({0: [99]})), minilm)
    assert len(problems) == 1  # the stage problem; the head names of a step that cannot run are not checked
    assert "torch steps must come before export.onnx" in problems[0].message


def test_unknown_layout_skips_the_structural_checks(small_gpt2):
    assert check_recipe(recipe(heads({0: [7]})), small_gpt2, layout=UNKNOWN) == []


def test_run_refuses_heads_the_model_lacks_before_a_worker_starts(tmp_path):
    import subprocess
    import sys

    recipe = tmp_path / "heads.yaml"
    recipe.write_text(
        "version: 1\nmodel: builtin:minilm\nsteps:\n"
        "  - technique: prune.heads\n    params: {heads: {0: [15]}}\n",
        encoding="utf-8",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "studio",
            "run",
            str(recipe),
            "--dry-run",
            "--workspace",
            str(tmp_path / "ws"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no head 15" in proc.stderr, proc.stderr


def test_the_generator_runtime_needs_the_builder_export_before_it():
    tinylm = open_checkpoint("builtin:tinylm")
    runtime = {"technique": "runtime.onnxruntime_genai"}
    (p,) = check_recipe(recipe({"technique": "export.onnx", "params": {"with_cache": True}}, runtime), tinylm)
    assert p.step == 1 and "put export.onnx_genai before it" in p.message
    assert check_recipe(recipe({"technique": "export.onnx_genai"}, runtime), tinylm) == []
