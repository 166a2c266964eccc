"""Reading a search study while it runs: the Pareto front by hand, trial states, a locked or missing study,
and the progress of a real search read back against what `model-studio search --json` reported."""

from __future__ import annotations

import sqlite3

import optuna
import pytest

from studio.errors import BadInput
from studio.pipeline import load_recipe
from studio.search import STOPPED_KEY, study_name, study_path
from studio.search_progress import (
    COMPLETE,
    FAILED,
    INFEASIBLE,
    RUNNING,
    STOPPED_ERROR,
    StudyBusy,
    StudyReader,
    dominates,
    load_progress,
    pareto_indices,
)


def test_pareto_of_five_points_by_hand():
    # (latency ms, size MB), both minimized:
    #   0 (10, 5)  front: nothing is faster at size <= 5
    #   1 (8, 7)   front: the fastest
    #   2 (12, 5)  dominated by 0 (slower, same size)
    #   3 (9, 9)   dominated by 1 (slower, larger)
    #   4 (20, 2)  front: the smallest
    points = [(10, 5), (8, 7), (12, 5), (9, 9), (20, 2)]
    assert pareto_indices(points, ["minimize", "minimize"]) == [0, 1, 4]
    # size minimized, cosine maximized: (size, cosine)
    quality = [(10, 0.99), (5, 0.98), (12, 0.98), (1, 0.90), (5, 0.97)]
    assert pareto_indices(quality, ["minimize", "maximize"]) == [0, 1, 3]
    assert pareto_indices([(1, 1), (1, 1)], ["minimize", "minimize"]) == [0, 1]  # a tie dominates neither
    assert not dominates((1, 1), (1, 1), ["minimize", "minimize"])
    assert dominates((1, 2), (1, 3), ["minimize", "minimize"])
    assert pareto_indices([], ["minimize"]) == []


def _study(root, name="hand-made"):
    db = study_path(root, name)
    db.parent.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name=name, storage=f"sqlite:///{db}", directions=["minimize", "maximize"]
    ), name


def _finish(study, values, constraints, variant):
    trial = study.ask()
    trial.suggest_categorical("3.per_channel", [True, False])
    trial.set_user_attr("variant", variant)
    trial.set_user_attr("metrics", {"size_mb": values[0], "quality.output_cosine": values[1]})
    trial.set_user_attr("constraint_values", constraints)
    study.tell(trial, list(values))
    return trial


def test_every_state_the_search_leaves(tmp_path):
    study, name = _study(tmp_path)
    _finish(study, (10.0, 0.99), [-0.1], "v-big")
    _finish(study, (5.0, 0.98), [-0.1], "v-small")
    _finish(study, (1.0, 0.5), [0.3], "v-broken")  # dominates everything but breaks its constraint
    failed = study.ask()
    failed.set_user_attr("error", "invalid combination: step 2 needs an onnx model")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    stopped = study.ask()
    study.tell(stopped, state=optuna.trial.TrialState.FAIL)
    study.set_user_attr(STOPPED_KEY, [stopped.number])
    study.ask()  # the trial running now

    progress = load_progress(tmp_path, name)
    assert progress.objectives == ("size_mb", "quality.output_cosine")  # from the recorded metrics
    assert progress.directions == ("minimize", "maximize")
    assert [t.state for t in progress.trials] == [COMPLETE, COMPLETE, INFEASIBLE, FAILED, FAILED, RUNNING]
    assert progress.pareto == (0, 1)  # trial 2 is infeasible: off the front although nothing beats it
    assert [t.variant for t in progress.front] == ["v-big", "v-small"]
    assert progress.trials[2].values == (1.0, 0.5) and not progress.trials[2].feasible
    assert "needs an onnx model" in progress.trials[3].error
    assert progress.trials[4].error == STOPPED_ERROR
    assert progress.trials[5].values is None and progress.trials[5].variant is None
    assert set(progress.trials[0].params) == {"3.per_channel"}
    assert progress.count(COMPLETE, INFEASIBLE) == 3
    named = load_progress(tmp_path, name, ["latency_ms.b1.p50", "max:quality.fidelity_cosine"])
    assert named.objectives == ("latency_ms.b1.p50", "quality.fidelity_cosine")


def test_a_locked_study_is_busy_until_the_lock_goes(tmp_path):
    study, name = _study(tmp_path)
    _finish(study, (10.0, 0.99), [-0.1], "v")
    holder = sqlite3.connect(study_path(tmp_path, name), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # what a writer holds while it commits
    try:
        with pytest.raises(StudyBusy):
            load_progress(tmp_path, name)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert len(load_progress(tmp_path, name).trials) == 1  # the next poll reads it


def test_a_reader_reads_again_only_what_the_search_wrote(tmp_path):
    study, name = _study(tmp_path)
    reader = StudyReader(tmp_path, name)
    first = reader.read()
    assert first.trials == () and first.exists
    assert reader.read() is first  # the file has not changed: the same reading, nothing queried
    _finish(study, (10.0, 0.99), [-0.1], "v")
    second = reader.read()
    assert [t.variant for t in second.trials] == ["v"] and second.pareto == (0,)
    assert reader.read(force=True) is not second and reader.read(force=True).trials == second.trials


def test_no_study_yet_and_a_damaged_file(tmp_path):
    progress = load_progress(tmp_path, "not-started")
    assert not progress.exists and progress.trials == ()
    assert not study_path(tmp_path, "not-started").exists()  # reading never creates the file
    damaged = study_path(tmp_path, "damaged")
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a database at all" * 100)
    with pytest.raises(BadInput, match=r"damaged\.db"):
        load_progress(tmp_path, "damaged")


def test_progress_of_a_real_search_matches_its_result(tiny_search):
    path, ws, result = tiny_search
    recipe = load_recipe(path)
    name = study_name(recipe, path)
    assert name == result["study"]
    progress = load_progress(ws, name, recipe.search.objectives)
    assert progress.objectives == ("size_mb", "quality.output_cosine")
    assert [t.number for t in progress.trials] == [t["number"] for t in result["trials"]]
    for mine, theirs in zip(progress.trials, result["trials"], strict=True):
        assert mine.params == theirs["params"] and mine.variant == theirs["variant"]
        assert mine.feasible == theirs["feasible"]
        if theirs["state"] == "COMPLETE":
            assert mine.values == (theirs["values"]["size_mb"], theirs["values"]["quality.output_cosine"])
    assert [t.variant for t in progress.front] == result["pareto"]


def test_the_search_names_its_objectives_in_the_study(tiny_search):
    """Optuna's own tools (optuna-dashboard) label the axes with the study's metric names, and the reader
    takes them from there when no recipe is given."""
    _path, ws, result = tiny_search
    db = study_path(ws, result["study"])
    assert result["storage"] == str(db)
    study = optuna.load_study(study_name=result["study"], storage=f"sqlite:///{db}")
    assert study.metric_names == ["size_mb", "quality.output_cosine"]
    assert load_progress(ws, result["study"]).objectives == ("size_mb", "quality.output_cosine")
