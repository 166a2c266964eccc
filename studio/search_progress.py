"""What a search study holds right now, for the GUI's Search view to poll while `model-studio search` runs.

The search (another process) writes its Optuna study to the workspace's `searches/<name>.db`; this module
only reads it. Every poll opens the SQLite file with a short busy timeout: a read that meets the search's
write lock raises `StudyBusy`, and the caller keeps what it showed and tries again at the next poll, so the
window never waits on the search and the search never waits long on the window.

A trial's meaning comes from the user attributes the search sets: `variant` (the saved variant's id),
`metrics` (objective and constraint values by metric name), `constraint_values` (<= 0: met) and `error`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from studio.errors import BadInput
from studio.search import REPEAT_KEY, STOPPED_KEY, study_path
from studio.search_space import MAXIMIZE_PREFIX

BUSY_TIMEOUT_S = 0.5  # how long one poll waits for the search's write lock before giving up until the next
STOPPED_ERROR = "stopped before the trial finished"

RUNNING, WAITING, COMPLETE, INFEASIBLE, FAILED, PRUNED = (
    "running",
    "waiting",
    "complete",
    "infeasible",
    "failed",
    "pruned",
)
_STATES = {"RUNNING": RUNNING, "WAITING": WAITING, "FAIL": FAILED, "PRUNED": PRUNED}


class StudyBusy(Exception):
    """The search holds the study's write lock this instant: read again at the next poll."""


@dataclass(frozen=True)
class TrialProgress:
    number: int
    state: str  # running, waiting, complete, infeasible (complete, a constraint broken), failed, pruned
    params: dict[str, Any]
    values: tuple[float, ...] | None  # the objective values, in the study's order; None unless finished
    feasible: bool  # complete and every constraint met
    variant: str | None  # the variant the trial saved (a failed trial may name one: its metrics were missing)
    error: str | None
    metrics: dict[str, float] = field(default_factory=dict)  # objectives and constraint metrics by name


@dataclass(frozen=True)
class SearchProgress:
    study: str
    objectives: tuple[str, ...]  # metric names, without the `max:` prefix
    directions: tuple[str, ...]  # "minimize" or "maximize", one per objective
    trials: tuple[TrialProgress, ...] = ()
    pareto: tuple[int, ...] = ()  # numbers of the feasible complete trials no other one dominates
    exists: bool = True  # False: no study of that name yet (the search has not started)

    @property
    def front(self) -> list[TrialProgress]:
        on = set(self.pareto)
        return [t for t in self.trials if t.number in on]

    def count(self, *states: str) -> int:
        return sum(t.state in states for t in self.trials)


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """a is no worse than b in every objective and better in at least one."""
    signs = [-1.0 if d == "maximize" else 1.0 for d in directions]
    pa = [s * v for s, v in zip(signs, a, strict=True)]
    pb = [s * v for s, v in zip(signs, b, strict=True)]
    return all(x <= y for x, y in zip(pa, pb, strict=True)) and pa != pb


def pareto_indices(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (ties both stay), in the given order."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p, directions) for q in points)]


def _objective_names(study: Any, trials: list[Any], given: Sequence[str] | None) -> tuple[str, ...]:
    n = len(study.directions)
    if given is not None and len(given) == n:
        return tuple(o[len(MAXIMIZE_PREFIX) :] if o.startswith(MAXIMIZE_PREFIX) else o for o in given)
    if study.metric_names is not None and len(study.metric_names) == n:
        return tuple(study.metric_names)
    for trial in trials:  # the search records the objectives first, then the constraint metrics
        names = list(trial.user_attrs.get("metrics", {}))
        if len(names) >= n:
            return tuple(names[:n])
    return tuple(f"objective {i + 1}" for i in range(n))


def _trial(trial: Any, stopped: set[int]) -> TrialProgress:
    attrs = trial.user_attrs
    constraints = attrs.get("constraint_values")
    complete = trial.state.name == "COMPLETE"
    feasible = complete and constraints is not None and all(c <= 0 for c in constraints)
    error = STOPPED_ERROR if trial.number in stopped else attrs.get("error")
    if complete:
        state = COMPLETE if feasible else INFEASIBLE
    else:
        state = FAILED if trial.number in stopped else _STATES.get(trial.state.name, FAILED)
    return TrialProgress(
        number=trial.number,
        state=state,
        params=dict(trial.params),
        values=tuple(trial.values) if complete and trial.values is not None else None,
        feasible=feasible,
        variant=attrs.get("variant"),
        error=error,
        metrics=dict(attrs.get("metrics", {})),
    )


class StudyReader:
    """Reads one study again and again (a poll a second): the storage and the study stay open between
    reads, so each read fetches only what changed (Optuna caches finished trials), with no connection
    held between reads. `objectives` (the recipe's `search.objectives`) names the axes; without it the
    names come from the trials' recorded metrics."""

    def __init__(self, workspace: Any, study_name: str, objectives: Sequence[str] | None = None) -> None:
        self.path = study_path(workspace, study_name)
        self.name = study_name
        self.objectives = None if objectives is None else list(objectives)
        self._study: Any = None
        self._last: tuple[tuple[int, int], SearchProgress] | None = None  # the file's stamp, what it held

    def read(self, *, force: bool = False) -> SearchProgress:
        """Every trial, the objectives and the Pareto front; the last reading again while the file has not
        changed (a trial runs for minutes: most polls find nothing new), unless `force`. Raises StudyBusy
        while the search holds the write lock (read again later), BadInput when the file is not a study."""
        import optuna
        import sqlalchemy.exc

        try:
            info = self.path.stat()
        except FileNotFoundError:  # never let a read create the file: the search makes it
            return SearchProgress(self.name, (), (), exists=False)
        stamp = (info.st_mtime_ns, info.st_size)
        if not force and self._last is not None and self._last[0] == stamp:
            return self._last[1]
        try:
            study = self._study or self._open()
            trials = study.get_trials(deepcopy=False)
            stopped = set(study.user_attrs.get(STOPPED_KEY, []))
        except KeyError:  # the file exists but the search has not created its study in it yet
            return SearchProgress(self.name, (), (), exists=False)
        except (sqlalchemy.exc.DatabaseError, optuna.exceptions.StorageInternalError) as exc:
            # Optuna wraps a failed commit (a lock, say) in StorageInternalError: the cause says what it was
            cause = exc if isinstance(exc, sqlalchemy.exc.DatabaseError) else exc.__cause__
            text = str(getattr(cause, "orig", None) or cause or exc)
            if "is locked" in text or "no such table" in text:  # written, or being created, this instant
                raise StudyBusy(text) from exc
            raise BadInput(
                f"cannot read the search study: not an Optuna study ({text})", path=self.path
            ) from exc
        self._study = study
        directions = tuple(d.name.lower() for d in study.directions)
        # a repeat (a combination tried before, its result reused) is no trial of its own for the user
        rows = [_trial(t, stopped) for t in trials if REPEAT_KEY not in t.user_attrs]
        ok = [r for r in rows if r.feasible and r.values is not None]
        front = pareto_indices([r.values for r in ok if r.values is not None], directions)
        progress = SearchProgress(
            study=self.name,
            objectives=_objective_names(study, trials, self.objectives),
            directions=directions,
            trials=tuple(rows),
            pareto=tuple(ok[i].number for i in front),
        )
        self._last = (stamp, progress)
        return progress

    def _open(self) -> Any:
        import optuna
        from sqlalchemy.pool import NullPool

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{self.path.resolve()}",
            engine_kwargs={"connect_args": {"timeout": BUSY_TIMEOUT_S}, "poolclass": NullPool},
            skip_compatibility_check=True,
            skip_table_creation=True,
        )
        return optuna.load_study(study_name=self.name, storage=storage)


def load_progress(workspace: Any, study_name: str, objectives: Sequence[str] | None = None) -> SearchProgress:
    """The study as it is now, read once (see StudyReader)."""
    return StudyReader(workspace, study_name, objectives).read()
