"""The recipe validation contract of studio/pipeline.py: a recipe is refused before anything runs, with a
message naming the step and the field; `check_steps` reports every problem and `plan` the first; `plan`
leaves the caller's model as it is."""

from __future__ import annotations

import pytest
import yaml

from studio.checkpoints import open_checkpoint
from studio.checkpoints.stage import stage_of, stage_of_source
from studio.errors import BadInput
from studio.pipeline import Step, check_steps, load_recipe, parse_recipe, plan


@pytest.fixture
def minilm():
    """Opened fresh for every test (cheap: no weights), so a test that changed it cannot hide."""
    return open_checkpoint("builtin:minilm")


def refusal(data, path="recipe.yaml") -> BadInput:
    with pytest.raises(BadInput) as info:
        parse_recipe(data, path=path)
    assert info.value.path is not None and str(info.value.path) == path
    return info.value


# ------------------------------------------------------------------------------------------------ parsing


def test_a_recipe_that_is_not_a_mapping_is_refused():
    assert refusal([1, 2]).problem == "a recipe must be a YAML mapping (version, model, steps, ...)"


def test_a_step_without_a_technique_names_the_step():
    problem = refusal({"steps": [{"technique": "prune.magnitude"}, {"params": {}}]}).problem
    assert problem == "step 2: each step needs 'technique' (and optional 'params')"


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"foo": 1}, "foo", "unknown field"),
        ({"evaluate": {"latency": True, "speed": 2}}, "evaluate.speed", "unknown field"),
        ({"evaluate": {"batch_sizes": [0]}}, "evaluate.batch_sizes", "positive integers"),
        ({"data": {"calibration_examples": 0}}, "data.calibration_examples", "greater than or equal to 1"),
        ({"version": 2}, "version", "Input should be 1"),
    ],
)
def test_a_bad_field_is_named_by_its_path(data, field, message):
    problem = refusal(data).problem
    assert problem.startswith(f"invalid recipe: field '{field}': ") and message in problem


def test_an_unknown_task_lists_the_known_families():
    problem = refusal({"task": "vision"}).problem
    assert "unknown task 'vision'" in problem
    assert "feature-extraction" in problem and "image-classification" in problem


def test_load_recipe_refuses_yaml_that_is_not_a_recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("steps: [unclosed\n")
    with pytest.raises(BadInput, match="not valid YAML at line 2") as info:
        load_recipe(path)
    assert str(info.value.path) == str(path)


def test_the_yaml_form_round_trips_and_leaves_out_unset_sections():
    recipe = parse_recipe(
        {"model": "builtin:minilm", "steps": [{"technique": "prune.magnitude", "params": {"sparsity": 0.3}}]}
    )
    text = recipe.to_yaml()
    data = yaml.safe_load(text)
    assert not {"task", "trust", "search"} & set(data)
    assert parse_recipe(data) == recipe


# ------------------------------------------------------------------------------------------------ steps


def test_check_steps_reports_every_problem_with_its_step():
    steps = [
        Step(technique="no.such"),
        Step(technique="prune.magnitude", params={"sparsity": 2}),
        Step(technique="onnx.optimize"),
    ]
    planned, problems = check_steps(steps, "torch")
    assert [i for i, _ in problems] == [0, 1, 2]
    assert problems[0][1].startswith("step 1: unknown technique 'no.such' (known: ")
    assert "prune.magnitude" in problems[0][1]
    assert problems[1][1] == "step 2 (prune.magnitude): params field 'sparsity': Input should be less than 1"
    # an unknown step is skipped when following kinds; a step whose params fail still gives its kind
    assert (
        problems[2][1]
        == "step 3 (onnx.optimize): needs an onnx model but step 2 (prune.magnitude) gives a torch model"
    )
    assert [p.index for p in planned] == [2]  # only steps with valid params are planned


def test_torch_steps_after_the_export_are_refused_with_the_reason():
    _, problems = check_steps([Step(technique="export.onnx"), Step(technique="prune.magnitude")], "torch")
    assert problems == [
        (
            1,
            "step 2 (prune.magnitude): needs a torch model but step 1 (export.onnx) gives an onnx model "
            "(torch steps must come before export.onnx)",
        )
    ]


def test_an_onnx_start_takes_onnx_passes_and_refuses_torch_steps():
    assert check_steps([Step(technique="onnx.optimize")], "onnx")[1] == []
    (problem,) = check_steps([Step(technique="prune.magnitude")], "onnx")[1]
    assert problem[1].startswith(
        "step 1 (prune.magnitude): needs a torch model but the model gives an onnx model"
    )


def test_a_technique_that_does_not_apply_to_the_family_is_refused(minilm):
    recipe = parse_recipe(
        {
            "task": "image-classification",
            "steps": [{"technique": "prune.heads", "params": {"fraction": 0.25}}],
        }
    )
    with pytest.raises(
        BadInput, match=r"step 1 \(prune.heads\): prune.heads does not apply to image-classification"
    ):
        plan(recipe, minilm)


# ------------------------------------------------------------------------------------------------ plan


def test_plan_validates_params_and_gives_the_final_kind(minilm):
    recipe = parse_recipe(
        {
            "steps": [
                {"technique": "prune.magnitude", "params": {"sparsity": 0.3}},
                {"technique": "export.onnx"},
                {"technique": "onnx.optimize"},
            ]
        }
    )
    planned = plan(recipe, minilm)
    assert [p.label for p in planned.steps] == [
        "step 1 (prune.magnitude)",
        "step 2 (export.onnx)",
        "step 3 (onnx.optimize)",
    ]
    assert planned.steps[0].params.sparsity == 0.3 and planned.steps[0].params.scope == "global"
    assert planned.final_kind == "onnx"
    assert plan(parse_recipe({"steps": []}), minilm).final_kind == "torch"


def test_plan_raises_the_first_problem_naming_the_recipe(minilm, tmp_path):
    recipe = parse_recipe({"steps": [{"technique": "onnx.optimize"}, {"technique": "no.such"}]})
    with pytest.raises(BadInput) as info:
        plan(recipe, minilm, path=tmp_path / "r.yaml")
    assert info.value.problem.startswith("step 1 (onnx.optimize): needs an onnx model")
    assert str(info.value.path) == str(tmp_path / "r.yaml")


def test_plan_leaves_the_callers_model_as_it_is(minilm):
    config = minilm.config  # built before planning: the plan's copy shares it instead of building another
    recipe = parse_recipe({"task": "text-classification", "steps": []})
    planned = plan(recipe, minilm)
    assert planned.model.family == "text-classification"
    assert minilm.family == "feature-extraction"
    assert planned.model is not minilm and planned.model.config is config
    assert planned.model.path == minilm.path

    refused = parse_recipe(
        {
            "task": "image-classification",
            "steps": [{"technique": "prune.heads", "params": {"fraction": 0.25}}],
        }
    )
    with pytest.raises(BadInput):
        plan(refused, minilm)
    assert minilm.family == "feature-extraction"  # a refused plan does not change it either


def test_plan_without_a_task_or_with_the_same_one_uses_the_model_itself(minilm):
    assert plan(parse_recipe({"steps": []}), minilm).model is minilm
    assert plan(parse_recipe({"task": "feature-extraction", "steps": []}), minilm).model is minilm


# ------------------------------------------------------------------------------------------------ stage kind


def test_the_stage_kind_of_a_checkpoint_and_of_a_recipes_model_text(minilm, tiny_onnx):
    onnx_model = open_checkpoint(tiny_onnx)
    assert (stage_of(minilm), stage_of(onnx_model)) == ("torch", "onnx")
    assert plan(parse_recipe({"steps": [{"technique": "onnx.optimize"}]}), onnx_model).final_kind == "onnx"
    assert stage_of_source(str(tiny_onnx)) == "onnx" and stage_of_source("models/BERT.ONNX") == "onnx"
    assert stage_of_source("builtin:minilm") == "torch" and stage_of_source("models/bert") == "torch"
