"""`model-studio search`: a multi-objective Optuna study over a recipe's `search:` space (Qt-free core).

Every trial is a normal run in its own worker process (the client `model-studio run` uses), so a trial that
crashes or exhausts memory cannot take the search down, and every finished trial is a variant in the
workspace with its recipe. Several trials may run at once (`--parallel N`, studio/search_runner.py, or
the tasks of a Ray cluster, studio/search_ray.py), but a trial's timing never overlaps another's on the
same machine: each run holds a file lock while it times (studio/evaluation/timing_lock.py) and records
the window it timed in, which each trial row carries as `timing_window`.

The study lives in the workspace (`searches/<name>.db`, Optuna's SQLite storage) under a name derived
from the recipe's content without its trial count, so running the same recipe again resumes it: raising
`trials` (or `--trials`) adds only the missing trials. Constraints go to the sampler as Optuna's
`constraints_func`; a trial whose combination fails (refused by validation, or an error in a step) is
recorded as failed with its error and the search goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from studio.errors import BadInput
from studio.search_runner import LocalTrials, Outcome, TrialRunner, Trials, default_parallel
from studio.search_space import (
    ALTERNATIVE_PARAM,
    alternative_data,
    metric_of,
    parse_constraint,
    trial_steps,
    validate_search,
    violation,
)

Log = Callable[[str], None]
STOPPED_KEY = "stopped_trials"  # study user attribute: numbers of the trials a stop cut short
REPEAT_KEY = "repeat_of"  # trial user attribute: the earlier trial with the same concrete recipe
# The search ends early when the sampler proposes only combinations already tried this many times in a row
# (a small, categorical space is exhausted before the budget is).
MAX_REPEATS = 50
_REUSED_ATTRS = ("variant", "metrics", "constraint_values", "timing_window", "error")
SEARCHES_FOLDER = "searches"  # under the workspace root: one Optuna SQLite file per study


def study_path(workspace: Any, name: str) -> Path:
    """Where the study `name` is stored: `searches/<name>.db` under the workspace (a Workspace or its root
    folder). The search writes it; the GUI's Search view reads the same file while the search runs."""
    root = Path(workspace) if isinstance(workspace, (str, Path)) else Path(workspace.root)
    return root / SEARCHES_FOLDER / f"{name}.db"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def study_name(recipe: Any, recipe_path: str | Path | None) -> str:
    """`<recipe stem>-<hash>`: the hash covers everything but the trial count, so a longer run resumes."""
    data = recipe.model_dump(mode="json")
    data["search"].pop("trials", None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(recipe_path).stem if recipe_path else "recipe").strip("-")
    return f"{stem or 'recipe'}-{digest}"


def trial_recipe(recipe: Any, trial: Any) -> Any:
    """The concrete Recipe of one Optuna trial (`optuna.Trial` or `FixedTrial`), which runs with `model-studio
    run`. Raises BadInput when the combination is not a valid recipe (validated like any recipe file)."""
    from studio.pipeline import parse_recipe

    return parse_recipe(trial_steps(recipe, trial))


def plan_search(recipe: Any, recipe_path: str | Path | None, trust: bool) -> Any:
    """Validate the recipe's pipelines before any trial runs and return the Plan whose opened model every
    trial's check reuses: the recipe itself, or, with `search.alternatives`, each alternative's pipeline
    (the others' steps removed), a problem naming the alternative."""
    from studio.pipeline import parse_recipe, plan

    spec = recipe.search
    if not spec.alternatives:
        return plan(recipe, path=recipe_path, trust=trust)
    planned = None
    for name in spec.alternatives:
        try:
            planned = plan(
                parse_recipe(alternative_data(recipe, name)),
                None if planned is None else planned.model,
                trust=trust,
            )
        except BadInput as exc:
            raise BadInput(f"search alternative '{name}': {exc.problem}", path=recipe_path) from None
    return planned


def _sampler(kind: str, seed: int | None, concurrent: bool = False) -> Any:
    import optuna

    def constraints(trial: Any) -> list[float]:
        return list(trial.user_attrs.get("constraint_values", []))

    with warnings.catch_warnings():  # constraints_func is marked experimental in Optuna 4
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints)
        # with trials in flight, TPE treats them as bad results ("constant liar") so that two trials asked
        # for at once are not the same point
        return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints, constant_liar=concurrent)


def _dominates(a: list[float], b: list[float], signs: list[float]) -> bool:
    """a dominates b: no worse in every objective and better in one (signs turn maxima into minima)."""
    pa = [s * v for s, v in zip(signs, a, strict=True)]
    pb = [s * v for s, v in zip(signs, b, strict=True)]
    return all(x <= y for x, y in zip(pa, pb, strict=True)) and any(
        x < y for x, y in zip(pa, pb, strict=True)
    )


def pareto_front(
    rows: list[dict[str, Any]], objectives: list[str], signs: list[float]
) -> list[dict[str, Any]]:
    """The feasible, completed trials no other feasible trial dominates."""
    ok = [r for r in rows if r["state"] == "COMPLETE" and r["feasible"]]
    vec = {r["number"]: [r["values"][metric_of(o)] for o in objectives] for r in ok}
    return [r for r in ok if not any(_dominates(vec[o["number"]], vec[r["number"]], signs) for o in ok)]


def _row(trial: Any, stopped: set[int]) -> dict[str, Any]:
    attrs = dict(trial.user_attrs)
    if trial.number in stopped:
        attrs["error"] = "stopped before the trial finished"
    cons = attrs.get("constraint_values")
    return {
        "number": trial.number,
        "params": trial.params,
        "variant": attrs.get("variant"),
        "values": attrs.get("metrics", {}),
        "feasible": bool(cons is not None and all(c <= 0 for c in cons))
        if trial.state.name == "COMPLETE"
        else False,
        "violation": None if cons is None else sum(max(0.0, c) for c in cons),
        "state": trial.state.name,
        "error": attrs.get("error"),
        "timing_window": attrs.get("timing_window"),
    }


def recipe_key(concrete: Any) -> str:
    return json.dumps(concrete.model_dump(mode="json"), sort_keys=True)


def counted(trial: Any, stopped: set[int]) -> bool:
    """Whether a finished trial counts towards the budget: not cut short by a stop, not a repeat."""
    return trial.number not in stopped and REPEAT_KEY not in trial.user_attrs


def tried_recipes(recipe: Any, study: Any, stopped: set[int]) -> dict[str, int]:
    """Concrete recipe (as recipe_key) -> the trial that ran it, over the study's counted finished trials."""
    from optuna.trial import FixedTrial, TrialState

    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        if not counted(t, stopped):
            continue
        with contextlib.suppress(BadInput, ValueError):  # an invalid combination: no recipe to repeat
            out.setdefault(recipe_key(trial_recipe(recipe, FixedTrial(t.params, t.number))), t.number)
    return out


def repeat(study: Any, trial: Any, earlier: Any, log: Log) -> None:
    """Record `trial`, whose concrete recipe `earlier` already ran, with the earlier trial's result: the
    sampler learns the point is known, no worker runs it again, and it does not count towards the budget
    (a TPE search of a small categorical space draws the same combination often)."""
    from optuna.trial import TrialState

    for key in _REUSED_ATTRS:
        if key in earlier.user_attrs:
            trial.set_user_attr(key, earlier.user_attrs[key])
    trial.set_user_attr(REPEAT_KEY, earlier.number)
    if earlier.state == TrialState.COMPLETE:
        study.tell(trial, list(earlier.values))
    else:
        study.tell(trial, state=TrialState.FAIL)
    log(f"search: trial {trial.number} repeats trial {earlier.number}: its result reused, not run again")


def _tell(
    study: Any,
    trial: Any,
    variant: dict[str, Any] | None,
    error: str | None,
    objectives: list[str],
    constraints: list[tuple[str, str, float]],
    wanted: list[str],
    recipe_path: str | Path | None,
) -> tuple[dict[str, float], list[float]] | None:
    """Record a finished trial in the study (this thread is its one writer): failed with its error, or its
    objective values, constraint values, variant and timing window. Returns (values, constraint values)."""
    from optuna.trial import TrialState

    from studio.compare import flat_metrics

    if error is not None:
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
        return None
    assert variant is not None
    flat = flat_metrics(variant["metrics"])
    missing = [m for m in wanted if m not in flat]
    trial.set_user_attr("variant", variant["id"])
    if variant["metrics"].get("timing_window"):
        trial.set_user_attr("timing_window", variant["metrics"]["timing_window"])
    if missing:
        trial.set_user_attr("error", f"not measured: {', '.join(missing)}")
        study.tell(trial, state=TrialState.FAIL)
        raise BadInput(
            f"the search names {', '.join(repr(m) for m in missing)}, which the runs of this model do not "
            f"measure (measured: {', '.join(sorted(flat))})",
            path=recipe_path,
        )
    values = {m: flat[m] for m in wanted}
    cons = [violation(op, bound, flat[m]) for m, op, bound in constraints]
    trial.set_user_attr("metrics", values)
    trial.set_user_attr("constraint_values", cons)
    study.tell(trial, [flat[metric_of(o)] for o in objectives])
    return values, cons


def _backend(
    workspace: Any,
    recipe_path: str | Path | None,
    trust: bool,
    parallel: int | None,
    ray_address: str | None,
    ray_cpus_per_trial: int | None,
) -> Trials:
    runner = TrialRunner(workspace.root, None if recipe_path is None else str(recipe_path), trust)
    if ray_address is not None:
        from studio.search_ray import RayTrials

        return RayTrials(runner, ray_address, parallel=parallel, cpus_per_trial=ray_cpus_per_trial)
    n = default_parallel() if parallel is None else parallel
    if n < 1:
        raise BadInput(f"--parallel must be at least 1, got {n}")
    return LocalTrials(runner, n)


def log_start(slots: int, ray_address: str | None, log: Log) -> None:
    where = f"on the Ray cluster at {ray_address}" if ray_address else "on this machine"
    if slots > 1:
        log(f"search: up to {slots} trials at a time {where}; their timings one at a time")


def run_search(
    recipe: Any,
    workspace: Any,
    *,
    recipe_path: str | Path | None = None,
    trials: int | None = None,
    trust: bool = False,
    log: Log = _stderr,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    parallel: int | None = None,
    ray_address: str | None = None,
    ray_cpus_per_trial: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the recipe's search until the study holds `trials` finished trials.

    Returns `{"study", "storage", "trials", "pareto", "best", "recipe", "new_trials", "seconds"}`; `best` is
    the feasible Pareto trial best on the first objective (None, with `closest`, when no trial is feasible).
    Ctrl+C stops the running trials (their workers and folders removed), records them as failed and
    re-raises: the study and the finished trials stay for the next run. `parallel`: trials at a time on
    this machine (None: `search_runner.default_parallel`); `ray_address`: run them as tasks of that Ray
    cluster instead (studio/search_ray.py), `ray_cpus_per_trial` CPUs reserved for each.
    """
    import optuna
    from optuna.trial import FixedTrial, TrialState

    from studio.pipeline import plan

    spec = validate_search(recipe, recipe_path)
    planned = plan_search(recipe, recipe_path, trust)  # the pipelines must be valid before any trial
    total = spec.trials if trials is None else trials
    if total < 1:
        raise BadInput(f"--trials must be at least 1, got {total}")
    objectives = list(spec.objectives)
    signs = [-1.0 if o.startswith("max:") else 1.0 for o in objectives]
    constraints = [(name, *parse_constraint(text)) for name, text in spec.constraints.items()]
    wanted = [metric_of(o) for o in objectives] + [c[0] for c in constraints]

    concurrent = ray_address is not None or (default_parallel() if parallel is None else parallel) > 1
    name = study_name(recipe, recipe_path)
    db = study_path(workspace, name)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise BadInput("is not a folder: the studio keeps its search studies there", path=db.parent) from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            directions=["maximize" if s < 0 else "minimize" for s in signs],
            sampler=_sampler(spec.sampler, spec.seed, concurrent),
            load_if_exists=True,
        )
    except Exception as exc:  # SQLAlchemy/Optuna errors: a damaged or foreign file where the study belongs
        raise BadInput(
            f"cannot open the search study ({type(exc).__name__}); it is damaged or not an Optuna study: "
            "move it away to start this search afresh",
            path=db,
        ) from exc
    if [d.name.lower() for d in study.directions] != ["maximize" if s < 0 else "minimize" for s in signs]:
        raise BadInput(
            "the stored study optimizes in other directions: move it away to start afresh", path=db
        )
    # Named objectives: Optuna's own tools (optuna-dashboard, the visualization module) label the axes
    # with them instead of "Objective 0"; the GUI's Search view reads them back too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric_of(o) for o in objectives])
    # Stopped trials (Ctrl+C, or a search killed outright, which leaves its trial RUNNING) are recorded as
    # failed, so the sampler moves on, but they do not count towards the budget: nothing was learnt.
    stopped = set(study.user_attrs.get(STOPPED_KEY, []))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)
        stopped.add(stale.number)
        log(f"search: trial {stale.number} of an earlier search never finished: recorded as stopped")
    study.set_user_attr(STOPPED_KEY, sorted(stopped))
    if spec.alternatives and not study.get_trials(deepcopy=False):
        # a new study tries every alternative once first (the rest of each trial sampled), so that even a
        # search shorter than the sampler's random start measures each runtime on this machine
        for alternative in spec.alternatives:
            study.enqueue_trial({ALTERNATIVE_PARAM: alternative})
    finished = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    done = sum(counted(t, stopped) for t in study.get_trials(deepcopy=False, states=finished))
    tried = tried_recipes(recipe, study, stopped)
    if done:
        log(f"search: resuming {name} ({done} trials done, {max(0, total - done)} to go)")
    backend = _backend(workspace, recipe_path, trust, parallel, ray_address, ray_cpus_per_trial)
    log_start(backend.slots, ray_address, log)
    started = time.perf_counter()
    new = 0
    pending: dict[Future[Outcome], tuple[Any, float, str]] = {}

    def record(
        trial: Any, variant: dict[str, Any] | None, error: str | None, t0: float, key: str | None = None
    ) -> None:
        """Tell the study a finished trial; `key` (its concrete recipe's recipe_key, None when it has
        none) makes a later proposal of the same recipe a repeat of this trial."""
        nonlocal done, new
        label = f"trial {trial.number} ({done + 1}/{total})"
        told = _tell(study, trial, variant, error, objectives, constraints, wanted, recipe_path)
        if key is not None:
            tried.setdefault(key, trial.number)
        params = " ".join(f"{k}={v}" for k, v in trial.params.items())
        took = time.perf_counter() - t0
        if error is not None:
            log(f"search: {label} failed in {took:.0f}s [{params}]: {error}")
        else:
            assert variant is not None and told is not None
            values, cons = told
            shown = ", ".join(f"{m} {v:.4g}" for m, v in values.items())
            mark = "" if all(c <= 0 for c in cons) else " (infeasible)"
            log(f"search: {label} -> {variant['id']} in {took:.0f}s [{params}]: {shown}{mark}")
        done += 1
        new += 1
        if on_trial is not None:
            on_trial(_row(study.trials[trial.number], stopped))

    repeats = 0
    try:
        while done < total and repeats < MAX_REPEATS:
            while done + len(pending) < total and len(pending) < backend.slots and repeats < MAX_REPEATS:
                trial = study.ask()
                t0 = time.perf_counter()
                try:
                    concrete = trial_recipe(recipe, trial)
                except BadInput as exc:
                    record(trial, None, f"invalid combination: {exc.problem}", t0)
                    continue
                key = recipe_key(concrete)
                if key in tried:  # the same concrete recipe again: its result, not another run
                    repeat(study, trial, study.get_trials(deepcopy=False)[tried[key]], log)
                    repeats += 1
                    continue
                repeats = 0
                try:
                    plan(concrete, planned.model, trust=trust)
                except BadInput as exc:
                    record(trial, None, f"invalid combination: {exc.problem}", t0, key)
                    continue
                pending[backend.submit(concrete.model_dump(mode="json"))] = (trial, t0, key)
            if not pending:
                continue
            ready, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in ready:
                trial, t0, key = pending.pop(future)
                variant, error = future.result()  # DiskFull (a full disk stops the search) raises here
                record(trial, variant, error, t0, key)
    except BaseException:
        # Ctrl+C or a bug: stop the running trials (workers and folders go), keep the study sound
        backend.cancel_all()
        backend.close()
        for future, (trial, t0, key) in pending.items():
            ok = future.done() and not future.cancelled() and future.exception() is None
            outcome = future.result() if ok else None
            if outcome is not None and outcome[0] is not None:  # it finished before the stop: keep it
                record(trial, outcome[0], None, t0, key)
                continue
            stopped.add(trial.number)
            study.set_user_attr(STOPPED_KEY, sorted(stopped))
            study.tell(trial, state=TrialState.FAIL)
        # a stop between study.ask() and the submit leaves a trial RUNNING that no future holds: this
        # process owns the study while it searches, so every trial still running is one it stopped
        for left in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            stopped.add(left.number)
            study.set_user_attr(STOPPED_KEY, sorted(stopped))
            study.tell(left.number, state=TrialState.FAIL)
        raise
    backend.close()
    if repeats >= MAX_REPEATS:
        log(
            f"search: the last {MAX_REPEATS} trials the sampler proposed were all combinations already "
            f"tried: stopping after {done} trials (the space holds no other)"
        )

    rows = [
        _row(t, stopped)
        for t in study.get_trials(deepcopy=False, states=finished)
        if REPEAT_KEY not in t.user_attrs
    ]
    front = pareto_front(rows, objectives, signs)
    best = min(front, key=lambda r: signs[0] * r["values"][metric_of(objectives[0])]) if front else None
    out: dict[str, Any] = {
        "study": name,
        "storage": str(db),
        "trials": rows,
        "pareto": [r["variant"] for r in front],
        "best": best["variant"] if best else None,
        "recipe": None,
        "new_trials": new,
        "seconds": time.perf_counter() - started,
    }
    if best is not None:
        concrete = trial_recipe(recipe, FixedTrial(best["params"], best["number"]))
        path = db.parent / f"{name}-best.yaml"
        header = (
            f"# The best trial of search {name}: trial {best['number']}, variant {best['variant']}\n"
            f"# (feasible, on the Pareto front of {', '.join(objectives)}, best on {objectives[0]}).\n"
            "# Re-run it with: model-studio run THIS_FILE\n"
        )
        path.write_text(header + concrete.to_yaml(), encoding="utf-8")
        out["recipe"] = str(path)
    else:
        scored = [r for r in rows if r["violation"] is not None]
        closest = min(scored, key=lambda r: r["violation"]) if scored else None
        out["closest"] = closest and {k: closest[k] for k in ("number", "variant", "values", "violation")}
    return out
