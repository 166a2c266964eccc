"""ONNX Runtime session settings as a step (`runtime.onnxruntime`): recorded in the graph, used by every
session opened on it, and searchable like any step parameter. Real exports of a tiny BERT classifier."""

from __future__ import annotations

import json

import onnxruntime as ort
import optuna
import pytest
import torch
import yaml

from studio.checkpoints import open_checkpoint
from studio.checkpoints.onnx_graph import read_metadata
from studio.cli import main
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.evaluation.ort_settings import SETTINGS_KEY
from studio.evaluation.runners import OnnxRunner, make_runner
from studio.families import family_for
from studio.pipeline import parse_recipe
from studio.search import trial_recipe
from studio.search_space import validate_search
from studio.techniques.base import RunContext, get_technique, initial_state
from studio.variants import Workspace

SEQ = 16
LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}


def run_step(state, technique_id, workdir, index=0, **params):
    ctx = RunContext(
        original=state.model,
        workdir=workdir,
        calibration=load_examples("builtin:sentences", 4),
        sequence_length=SEQ,
        step_index=index,
        emit=lambda event: None,
    )
    cls = get_technique(technique_id)
    return cls().run(state, cls.Params(**params), ctx)


@pytest.fixture(scope="module")
def exported(bert_classifier, tmp_path_factory):
    model = open_checkpoint(bert_classifier)
    work = tmp_path_factory.mktemp("ort-settings")
    return model, work, run_step(initial_state(model), "export.onnx", work, verify=False)


def _options(runner: OnnxRunner):
    return runner.session.get_session_options()


@pytest.mark.parametrize(
    ("threads", "level", "mode"),
    [(1, "basic", "parallel"), (2, "disabled", "sequential"), (None, "extended", "parallel")],
)
def test_the_step_records_the_settings_and_the_runner_uses_them(exported, threads, level, mode):
    model, work, graph = exported
    index = list(LEVELS).index(level) + 1
    state = run_step(
        graph, "runtime.onnxruntime", work, index=index,
        intra_op_threads=threads, graph_optimization_level=level, execution_mode=mode,
    )  # fmt: skip
    assert state.kind == "onnx" and state.path != graph.path and state.path.is_file()
    recorded = json.loads(read_metadata(state.path)[SETTINGS_KEY])
    assert recorded == {
        "intra_op_threads": threads,
        "graph_optimization_level": level,
        "execution_mode": mode,
    }
    assert SETTINGS_KEY not in read_metadata(graph.path)  # the input graph is left as it was
    assert read_metadata(state.path)["studio.family"] == read_metadata(graph.path)["studio.family"]

    runner = make_runner("onnx", model, artifact=state.path, threads=3)  # the graph's threads win
    opts = _options(runner)
    assert opts.intra_op_num_threads == (threads or 3)
    assert opts.graph_optimization_level == LEVELS[level] and opts.execution_mode == MODES[mode]
    plain = _options(make_runner("onnx", model, artifact=graph.path, threads=3))
    assert plain.graph_optimization_level == LEVELS["all"] and plain.execution_mode == MODES["sequential"]

    batch = family_for(model).batch(model, load_examples("builtin:sentences", 4), SEQ)
    torch.testing.assert_close(runner(batch), make_runner("onnx", model, artifact=graph.path)(batch))


def test_bad_settings_are_refused():
    cls = get_technique("runtime.onnxruntime")
    for bad in ({"graph_optimization_level": "fast"}, {"execution_mode": "async"}, {"intra_op_threads": 0}):
        with pytest.raises(ValueError):
            cls.Params(**bad)


SPACE = {
    "graph_optimization_level": ["disabled", "basic", "extended", "all"],
    "execution_mode": ["sequential", "parallel"],
    "intra_op_threads": {"int": [1, 2]},
}


def _recipe(model, space) -> dict:
    return {
        "model": str(model),
        "data": {"calibration_examples": 4, "evaluation_examples": 4},
        "steps": [
            {"technique": "export.onnx", "params": {"verify": False}},
            {"technique": "runtime.onnxruntime"},
        ],
        "evaluate": {"batch_sizes": [1], "sequence_length": SEQ, "latency": False},
        "search": {
            "objectives": ["size_mb", "max:quality.output_cosine"],
            "trials": 2,
            "seed": 2,
            "space": {2: space},
        },
    }


def test_a_search_space_over_the_settings_validates(bert_classifier):
    recipe = parse_recipe(_recipe(bert_classifier, SPACE), "r.yaml")
    validate_search(recipe, "r.yaml")
    concrete = trial_recipe(
        recipe,
        optuna.trial.FixedTrial(
            {"2.graph_optimization_level": "basic", "2.execution_mode": "parallel", "2.intra_op_threads": 2}
        ),
    )
    assert concrete.steps[1].params == {
        "graph_optimization_level": "basic", "execution_mode": "parallel", "intra_op_threads": 2,
    }  # fmt: skip
    with pytest.raises(BadInput, match=r"search\.space\.2\.graph_optimization_level.*'fast' is not allowed"):
        validate_search(
            parse_recipe(_recipe(bert_classifier, {"graph_optimization_level": ["fast"]})), "r.yaml"
        )


def test_searched_settings_travel_with_each_variant(bert_classifier, tmp_path, capsys):
    path = tmp_path / "ort-search.yaml"
    path.write_text(yaml.safe_dump(_recipe(bert_classifier, SPACE)))
    ws = tmp_path / "ws"
    capsys.readouterr()
    assert main(["search", str(path), "--workspace", str(ws), "--parallel", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model = open_checkpoint(bert_classifier)
    variants = {r["id"]: r for r in Workspace(ws).list()}
    assert [t["state"] for t in result["trials"]] == ["COMPLETE", "COMPLETE"]
    for trial in result["trials"]:
        params = trial["params"]
        variant = variants[trial["variant"]]
        graph = next(p for p in sorted(Workspace(ws).root.glob(f"variants/{variant['id']}/**/*.onnx")))
        settings = json.loads(read_metadata(graph)[SETTINGS_KEY])
        assert settings == {k.split(".", 1)[1]: v for k, v in params.items()}
        opts = _options(make_runner("onnx", model, artifact=graph))  # a later session: compare, bench
        assert opts.intra_op_num_threads == params["2.intra_op_threads"]
        assert opts.graph_optimization_level == LEVELS[params["2.graph_optimization_level"]]
        assert opts.execution_mode == MODES[params["2.execution_mode"]]


def test_the_shipped_runtime_search_recipe_validates():
    from pathlib import Path

    from studio.pipeline import load_recipe

    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "resources/recipes/search/minilm-onnx-runtime.yaml")
    spec = validate_search(recipe)
    assert recipe.steps[2].technique == "runtime.onnxruntime"
    assert set(spec.space[3]) == {"intra_op_threads", "graph_optimization_level", "execution_mode"}
