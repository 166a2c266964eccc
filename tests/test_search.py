"""`model-studio search`: the search section's validation, a trial's concrete recipe, and real searches.

The searches run real trials (worker processes, ONNX export and quantization, evaluation) on a tiny BERT
classifier with a tiny evaluation and timing off, so the whole file stays around two minutes on 2 cores.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from studio.cli import main
from studio.errors import BadInput
from studio.pipeline import check_steps, load_recipe, parse_recipe
from studio.search import STOPPED_KEY, pareto_front, study_name, trial_recipe
from studio.search_space import validate_search
from studio.variants import Workspace

STEPS = [
    {"technique": "export.onnx", "params": {"verify": False}},
    {"technique": "onnx.optimize"},
    {"technique": "onnx.quantize_dynamic"},
]
SEARCH = {
    "objectives": ["latency_ms.b1.p50", "size_mb"],
    "constraints": {"quality.fidelity_cosine": ">= 0.99"},
    "space": {2: {"optional": True}, 3: {"per_channel": [True, False]}},
}


def _recipe(search: dict, **extra) -> dict:
    return {
        "model": "builtin:minilm",
        "steps": STEPS,
        "evaluate": {"batch_sizes": [1], "sequence_length": 16},
        "search": search,
        **extra,
    }


def _validate(data: dict) -> None:
    validate_search(parse_recipe(data, "r.yaml"), "r.yaml")


# ------------------------------------------------------------------------------------------------ validation

BAD_SPACES = [
    ({"space": {4: {"optional": True}}}, "search.space.4", "no step 4"),
    ({"space": {0: {"optional": True}}}, "search.space.0", "no step 0"),
    ({"space": {3: {"per_chanel": [True]}}}, "search.space.3.per_chanel", "no parameter 'per_chanel'"),
    (
        {"space": {3: {"mixed_precision": {"float": [0.999, 0.99]}}}},
        "search.space.3.mixed_precision.float",
        "empty",
    ),
    (
        {"space": {3: {"mixed_precision": {"float": [0.9, 1.5]}}}},
        "search.space.3.mixed_precision.float",
        "1.5",
    ),
    (
        {"space": {3: {"mixed_precision": {"float": [0.9]}}}},
        "search.space.3.mixed_precision.float",
        "[lo, hi]",
    ),
    (
        {"space": {3: {"mixed_precision": {"floaty": [0.9, 0.99]}}}},
        "search.space.3.mixed_precision",
        "expected",
    ),
    ({"space": {2: {"opt_level": [1, 3]}}}, "search.space.2.opt_level", "3 is not allowed"),
    ({"space": {3: {"per_channel": []}}}, "search.space.3.per_channel", "empty choice"),
    ({"space": {3: {}}}, "search.space.3", "nothing to search"),
    ({"space": {2: {"optional": "yes"}}}, "search.space.2.optional", "true or false"),
    ({"space": {}}, "search.space", "empty"),
    ({"alternatives": {"only": [2, 3]}}, "search.alternatives", "at least two"),
    ({"alternatives": {"a": [2], "b": [4]}}, "search.alternatives.b", "no step 4"),
    ({"alternatives": {"a": [2, 3], "b": [3]}}, "search.alternatives.b", "already in alternative 'a'"),
    ({"alternatives": {"a": [2], "b": []}}, "search.alternatives.b", "no steps"),
    ({"alternatives": {"a": [2], "2b": [3]}}, "search.alternatives.2b", "a name is a letter"),
    ({"objectives": []}, "search.objectives", "at least one"),
    ({"objectives": ["speed"]}, "search.objectives.0", "unknown metric 'speed'"),
    ({"objectives": ["size_mb", "latency_ms.b32.p50"]}, "search.objectives.1", "batch 32 is not timed"),
    ({"objectives": ["latency_ms.b1.p42"]}, "search.objectives.0", "unknown metric"),
    (
        {"constraints": {"quality.fidelity_cosine": "about 0.99"}},
        "search.constraints.quality.fidelity_cosine",
        ">=",
    ),
    ({"constraints": {"cosine": ">= 0.99"}}, "search.constraints.cosine", "unknown metric"),
    ({"sampler": "grid"}, "search.sampler", "tpe"),
    ({"budget": 3}, "search.budget", "unknown field"),
    ({"trials": 0}, "search.trials", "greater than or equal to 1"),
]


@pytest.mark.parametrize(("change", "field", "text"), BAD_SPACES)
def test_bad_search_sections_are_refused_naming_the_field(change, field, text):
    with pytest.raises(BadInput) as info:
        _validate(_recipe({**SEARCH, **change}))
    message = info.value.message
    assert message.startswith("r.yaml: ")
    assert f"'{field}'" in message and text in message


def test_latency_objective_needs_timing():
    with pytest.raises(BadInput, match=r"search\.objectives\.0.*evaluate\.latency is off"):
        _validate(_recipe(SEARCH, evaluate={"batch_sizes": [1], "latency": False}))


def test_a_good_search_section_validates_and_run_ignores_it(tmp_path):
    spec = validate_search(parse_recipe(_recipe(SEARCH)))
    assert spec.trials == 20 and spec.sampler == "tpe"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(SEARCH)))
    assert main(["run", str(path), "--dry-run"]) == 0  # `run` takes the steps as written


def test_cli_exits_2_on_a_bad_space_and_a_bad_parallel(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_recipe({**SEARCH, "space": {7: {"optional": True}}})))
    assert main(["search", str(path), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "search.space.7" in err
    assert not (tmp_path / "ws").exists()  # refused before the workspace is made
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_recipe(SEARCH)))
    assert main(["search", str(good), "--parallel", "0", "--workspace", str(tmp_path / "ws")]) == 2
    assert "--parallel must be at least 1" in capsys.readouterr().err
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"model": "builtin:minilm", "steps": STEPS}))
    assert main(["search", str(plain), "--workspace", str(tmp_path / "ws")]) == 2
    assert "no 'search:' section" in capsys.readouterr().err


def test_the_shipped_search_recipe_validates():
    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "resources/recipes/search/minilm-onnx-int8.yaml")
    spec = validate_search(recipe)
    assert spec.space[2]["optional"] is True and "mixed_precision" in spec.space[3]


# ------------------------------------------------------------------------------------------------ trials


def test_concrete_recipe_of_a_fixed_trial():
    search = {
        **SEARCH,
        "space": {
            2: {"optional": True, "opt_level": [1, 2]},
            3: {
                "per_channel": [True, False],
                "mixed_precision": {"float": [0.99, 0.999]},
                "op_types": [["MatMul"], ["MatMul", "Gather"]],
            },
        },
    }
    recipe = parse_recipe(_recipe(search))
    dropped = trial_recipe(
        recipe,
        optuna.trial.FixedTrial(
            {"2.keep": False, "3.per_channel": False, "3.mixed_precision": 0.995, "3.op_types": '["MatMul"]'}
        ),
    )
    assert [s.technique for s in dropped.steps] == ["export.onnx", "onnx.quantize_dynamic"]
    assert dropped.steps[1].params == {"per_channel": False, "mixed_precision": 0.995, "op_types": ["MatMul"]}
    assert dropped.steps[0].params == {"verify": False}  # the written params stay
    assert dropped.search is None and "search" not in dropped.to_yaml()
    assert check_steps(dropped.steps, "torch")[1] == []

    kept = trial_recipe(
        recipe,
        optuna.trial.FixedTrial(
            {
                "2.keep": True,
                "2.opt_level": 2,
                "3.per_channel": True,
                "3.mixed_precision": 0.99,
                "3.op_types": '["MatMul", "Gather"]',
            }
        ),
    )
    assert [s.technique for s in kept.steps] == ["export.onnx", "onnx.optimize", "onnx.quantize_dynamic"]
    assert kept.steps[1].params == {"opt_level": 2}
    assert kept.steps[2].params["op_types"] == ["MatMul", "Gather"]
    assert parse_recipe(yaml.safe_load(kept.to_yaml())) == kept  # round-trips as a recipe file


# export.onnx, then ONNX Runtime's INT8 or OpenVINO + NNCF: the two runtimes of the bench's search
RUNTIMES = [
    {"technique": "export.onnx", "params": {"verify": False}},
    {"technique": "onnx.optimize"},
    {"technique": "onnx.quantize_dynamic"},
    {"technique": "export.openvino"},
    {"technique": "quantize.nncf", "params": {"subset_size": 4}},
]
ALTERNATIVES = {"onnxruntime": [2, 3], "openvino": [4, 5]}


def test_an_alternative_keeps_its_steps_and_drops_the_others():
    search = {
        **SEARCH,
        "alternatives": ALTERNATIVES,
        "space": {2: {"optional": True}, 3: {"per_channel": [True, False]}, 5: {"preset": ["mixed"]}},
    }
    recipe = parse_recipe(_recipe(search, steps=RUNTIMES))
    validate_search(recipe)
    ov = trial_recipe(recipe, optuna.trial.FixedTrial({"alternative": "openvino", "5.preset": "mixed"}))
    assert [s.technique for s in ov.steps] == ["export.onnx", "export.openvino", "quantize.nncf"]
    assert ov.steps[2].params == {"subset_size": 4, "preset": "mixed"}
    assert check_steps(ov.steps, "torch")[1] == []
    # the ONNX Runtime alternative samples its own parameters only (FixedTrial refuses one not given)
    ort = trial_recipe(
        recipe,
        optuna.trial.FixedTrial({"alternative": "onnxruntime", "2.keep": False, "3.per_channel": True}),
    )
    assert [s.technique for s in ort.steps] == ["export.onnx", "onnx.quantize_dynamic"]
    assert ort.steps[1].params == {"per_channel": True}
    # alternatives alone are a space
    validate_search(
        parse_recipe(_recipe({**SEARCH, "alternatives": ALTERNATIVES, "space": {}}, steps=RUNTIMES))
    )


def test_an_alternative_that_is_no_pipeline_is_refused_naming_it(tmp_path, capsys):
    steps = [RUNTIMES[0], RUNTIMES[2], RUNTIMES[4]]  # NNCF straight after the ONNX export: no IR to quantize
    search = {**SEARCH, "alternatives": {"onnxruntime": [2], "nncf": [3]}, "space": {2: {"optional": True}}}
    data = _recipe(search, steps=steps)
    path = tmp_path / "alt.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["search", str(path), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "alt.yaml" in err and "search alternative 'nncf'" in err and "openvino" in err


def test_a_new_study_tries_every_alternative_first(bert_classifier, tmp_path, capsys):
    """Two trials on the tiny BERT: whatever the sampler would pick, one per runtime, each a real variant."""
    data = yaml.safe_load(
        _tiny_search(bert_classifier, tmp_path, {3: {"per_channel": [True, False]}}).read_text()
    )
    data["steps"] = RUNTIMES
    data["search"]["alternatives"] = ALTERNATIVES
    path = tmp_path / "runtimes.yaml"
    path.write_text(yaml.safe_dump(data))
    code, result = _search(capsys, str(path), "--workspace", str(tmp_path / "ws"))
    assert code == 0, result
    assert [t["params"]["alternative"] for t in result["trials"]] == ["onnxruntime", "openvino"]
    assert "3.per_channel" in result["trials"][0]["params"]
    assert set(result["trials"][1]["params"]) == {"alternative"}
    kinds = {r["id"]: r["kind"] for r in Workspace(tmp_path / "ws").list()}
    assert [kinds[t["variant"]] for t in result["trials"]] == ["onnx", "openvino"]


def test_a_bad_combination_is_a_concrete_recipe_that_validation_refuses():
    recipe = parse_recipe(_recipe({**SEARCH, "space": {1: {"optional": True}}}))
    concrete = trial_recipe(recipe, optuna.trial.FixedTrial({"1.keep": False}))
    problems = check_steps(concrete.steps, "torch")[1]
    assert problems and "needs an onnx model" in problems[0][1]


def test_pareto_front_is_the_feasible_non_dominated_set():
    def row(n, size, cos, feasible=True, state="COMPLETE"):
        values = {"size_mb": size, "quality.output_cosine": cos}
        return {"number": n, "values": values, "feasible": feasible, "state": state}

    rows = [
        row(0, 10, 0.99),
        row(1, 5, 0.98),
        row(2, 12, 0.98),
        row(3, 1, 1.0, feasible=False),
        row(4, 5, 0.97),
    ]
    front = pareto_front(rows, ["size_mb", "max:quality.output_cosine"], [1.0, -1.0])
    assert [r["number"] for r in front] == [0, 1]


# ------------------------------------------------------------------------------------------------ searches


def _tiny_search(model: Path, tmp_path: Path, space: dict, trials: int = 2, sampler: str = "tpe") -> Path:
    data = {
        "model": str(model),
        "data": {"calibration_examples": 4, "evaluation_examples": 4},
        "steps": STEPS,
        "evaluate": {"batch_sizes": [1], "sequence_length": 16, "latency": False},
        "search": {
            "objectives": ["size_mb", "max:quality.output_cosine"],
            "constraints": {"quality.output_cosine": ">= 0.5"},
            "trials": trials,
            "seed": 3,
            "sampler": sampler,
            "space": space,
        },
    }
    path = tmp_path / "tiny-search.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _search(capsys, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["search", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_failed_trials_are_recorded_and_the_search_goes_on(bert_classifier, tmp_path, capsys, sampler):
    space = {1: {"optional": True}, 3: {"per_channel": [True, False]}}
    path = _tiny_search(bert_classifier, tmp_path, space, sampler=sampler)
    ws = tmp_path / "ws"
    (ws / "searches").mkdir(parents=True)
    name = study_name(load_recipe(path), path)
    study = optuna.create_study(
        study_name=name, storage=f"sqlite:///{ws}/searches/{name}.db", directions=["minimize", "maximize"]
    )
    for per_channel in (True, False):  # two combinations without the export: no worker can run them
        study.enqueue_trial({"1.keep": False, "3.per_channel": per_channel})
    code, result = _search(capsys, str(path), "--workspace", str(ws))
    assert code == 1  # nothing feasible
    assert [t["state"] for t in result["trials"]] == ["FAIL", "FAIL"]
    assert all(
        "invalid combination" in t["error"] and "needs an onnx model" in t["error"] for t in result["trials"]
    )
    assert result["pareto"] == [] and result["best"] is None and result["recipe"] is None
    assert Workspace(ws).list() == []


def test_search_end_to_end_then_resume(tiny_search, tmp_path, capsys):
    """The session's finished three-trial search on the tiny BERT (tests/conftest.py: the same steps and
    space as `_tiny_search`), read, then resumed on a copy of its workspace (other tests read the study)."""
    import shutil

    path, source, result = tiny_search
    ws = tmp_path / "ws"
    shutil.copytree(source, ws)
    assert [t["number"] for t in result["trials"]] == [0, 1, 2] and result["new_trials"] == 3
    variants = {r["id"]: r for r in Workspace(ws).list()}
    done = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    assert done and all(t["variant"] in variants for t in done)
    for t in done:  # the variant's recorded recipe is the trial's concrete recipe
        steps = [s["technique"] for s in variants[t["variant"]]["recipe"]["steps"]]
        assert ("onnx.optimize" in steps) == t["params"]["2.keep"]
        assert set(t["values"]) == {"size_mb", "quality.output_cosine"} and t["feasible"]
    assert result["pareto"] and set(result["pareto"]) <= {t["variant"] for t in done}
    assert result["best"] in result["pareto"]
    best = next(t for t in done if t["variant"] == result["best"])
    on_front = [t for t in done if t["variant"] in result["pareto"]]
    assert best["values"]["size_mb"] == min(t["values"]["size_mb"] for t in on_front)
    for a in on_front:  # nothing on the front is dominated by another finished trial
        for b in done:
            better_or_equal = (
                b["values"]["size_mb"] <= a["values"]["size_mb"]
                and b["values"]["quality.output_cosine"] >= a["values"]["quality.output_cosine"]
            )
            strictly = (
                b["values"]["size_mb"] < a["values"]["size_mb"]
                or b["values"]["quality.output_cosine"] > a["values"]["quality.output_cosine"]
            )
            assert not (better_or_equal and strictly)
    chosen = load_recipe(result["recipe"])
    assert chosen.search is None
    assert [s.model_dump() for s in chosen.steps] == variants[result["best"]]["recipe"]["steps"]
    assert main(["run", result["recipe"], "--dry-run"]) == 0

    # the same recipe again with a larger budget continues the stored study: one new trial only
    code, again = _search(capsys, str(path), "--workspace", str(ws), "--trials", "4")
    assert code == 0
    assert again["study"] == result["study"] and again["new_trials"] == 1
    # (the sampler may first propose combinations already tried: they are repeats, not trials, and take
    # trial numbers the rows skip)
    numbers = [t["number"] for t in again["trials"]]
    assert numbers[:3] == [0, 1, 2] and len(numbers) == 4 and numbers[3] >= 3
    assert again["trials"][:3] == result["trials"]
    assert len(Workspace(ws).list()) == len(variants) + (again["trials"][3]["state"] == "COMPLETE")


def test_ctrl_c_keeps_the_study_and_leaves_no_half_variant(bert_classifier, tmp_path, capsys):
    path = _tiny_search(bert_classifier, tmp_path, {2: {"optional": True}, 3: {"per_channel": [True, False]}})
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "studio", "search", str(path), "--workspace", str(ws), "--trials", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # the first trial's line: the second trial's worker starts right after it
        lines.append(line)
        if line.startswith("search: trial 0"):
            break
    assert lines and lines[-1].startswith("search: trial 0"), "".join(lines)
    for _ in range(1200):  # stop the second trial while its worker works: its job folder exists
        if any(p.is_dir() for p in (ws / "tmp").iterdir()) or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait() == 130, rest
    assert "search stopped" in rest
    kept = [r for r in Workspace(ws).list() if r["kind"] != "baseline"]
    assert len(kept) == 1  # trial 0's; the stopped trial saved nothing ...
    assert not [p for p in (ws / "tmp").iterdir() if p.is_dir()]  # ... and left no work folder

    # the next run resumes: the stopped trial is recorded but does not count towards the budget
    code, result = _search(capsys, str(path), "--workspace", str(ws), "--trials", "2")
    assert code == 0
    states = [(t["number"], t["state"]) for t in result["trials"]]
    # (numbers the rows skip were repeats of trial 0: recorded with its result, never run)
    assert states[0] == (0, "COMPLETE") and [s for _, s in states[:2]] == ["COMPLETE", "FAIL"]
    assert len(states) == 3 and result["new_trials"] == 1
    assert result["trials"][1]["error"] == "stopped before the trial finished"
    assert result["trials"][0]["variant"] == kept[0]["id"]


def test_a_stop_before_the_submit_leaves_no_trial_running(bert_classifier, tmp_path):
    """Ctrl+C between study.ask() and the worker's submit: no future holds that trial, yet it must not stay
    RUNNING (the GUI would show it running for ever, and the next search would call it an earlier search's)."""
    from studio.search import run_search, study_path

    path = _tiny_search(bert_classifier, tmp_path, {3: {"per_channel": [True, False]}}, trials=3)
    recipe = load_recipe(path)
    ws = Workspace(tmp_path / "ws")
    name = study_name(recipe, path)
    asked: list[int] = []

    def stop_after_an_ask(_row: dict) -> None:  # the search's own next ask, then the stop that cuts it off
        storage = f"sqlite:///{study_path(ws, name).resolve()}"
        asked.append(optuna.load_study(study_name=name, storage=storage).ask().number)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(
            recipe, ws, recipe_path=path, parallel=1, log=lambda _line: None, on_trial=stop_after_an_ask
        )
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_path(ws, name).resolve()}")
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert asked and states[asked[0]] == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in states.values()
    assert asked[0] in study.user_attrs[STOPPED_KEY]  # recorded as stopped: it does not count


def test_a_damaged_study_file_is_bad_input(bert_classifier, tmp_path, capsys):
    path = _tiny_search(bert_classifier, tmp_path, {3: {"per_channel": [True, False]}})
    ws = tmp_path / "ws"
    (ws / "searches").mkdir(parents=True)
    name = study_name(load_recipe(path), path)
    (ws / "searches" / f"{name}.db").write_bytes(b"not a database at all" * 100)
    assert main(["search", str(path), "--workspace", str(ws)]) == 2
    err = capsys.readouterr().err
    assert f"{name}.db" in err and "damaged or not an Optuna study" in err
    assert Workspace(ws).list() == []


def test_a_combination_tried_before_is_not_run_again(bert_classifier, tmp_path, capsys):
    """A one-point space: the first trial runs; every later proposal repeats it, reuses its result without
    a worker and does not count, and the search stops once the sampler proposes nothing new."""
    from studio.search import MAX_REPEATS, REPEAT_KEY
    from studio.search_progress import load_progress

    path = _tiny_search(bert_classifier, tmp_path, {3: {"per_channel": [True]}}, trials=3)
    ws = tmp_path / "ws"
    capsys.readouterr()
    code = main(["search", str(path), "--workspace", str(ws), "--json"])
    captured = capsys.readouterr()
    result, err = json.loads(captured.out), captured.err
    assert code == 0
    assert [t["number"] for t in result["trials"]] == [0] and result["new_trials"] == 1
    assert f"the last {MAX_REPEATS} trials the sampler proposed were all combinations already tried" in err
    assert [r["kind"] for r in Workspace(ws).list()] == ["baseline", "onnx"]  # the repeats ran nothing
    name = study_name(load_recipe(path), path)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{ws}/searches/{name}.db")
    repeats = study.trials[1:]
    assert len(repeats) == MAX_REPEATS
    assert all(t.user_attrs[REPEAT_KEY] == 0 and t.values == study.trials[0].values for t in repeats)
    assert [t.number for t in load_progress(ws, name).trials] == [0]  # the GUI shows the one real trial
    # resumed with a larger budget: still nothing new to run, and the repeats still do not count
    code, again = _search(capsys, str(path), "--workspace", str(ws), "--trials", "4")
    assert code == 0 and again["new_trials"] == 0 and [t["number"] for t in again["trials"]] == [0]
