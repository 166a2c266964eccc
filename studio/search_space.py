"""A recipe's `search:` section: what `model-studio search` explores, and the concrete recipe of one trial.

```yaml
search:
  objectives: [latency_ms.b1.p50, size_mb, max:quality.fidelity_cosine]
  constraints: {quality.fidelity_cosine: ">= 0.995"}
  trials: 40
  sampler: tpe                      # or nsga2
  space:                            # by step position in `steps`, from 1
    2: {optional: true}             # the step may be left out
    3: {per_channel: [true, false], mixed_precision: {float: [0.99, 0.999]}}
```

Objectives are metric names as `model-studio compare --json` writes them; each is minimized unless it has
the `max:` prefix. A list is a choice, `{int: [lo, hi]}` / `{float: [lo, hi]}` a range (both ends
included; `log: true` samples on a log scale), `optional: true` a step a trial may drop.

The section is validated completely before any trial runs (a step position out of range, a parameter the
technique does not have, a value or range outside its bounds, an unknown objective), each problem naming
its field, so a search never spends an hour to fail on a typo.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from studio.errors import BadInput

if TYPE_CHECKING:
    from pathlib import Path

    from studio.pipeline import Recipe

MAXIMIZE_PREFIX = "max:"
OPTIONAL_KEY = "optional"
_CONSTRAINT = re.compile(r"^\s*(>=|<=)\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")
_LATENCY = re.compile(r"^latency_ms\.b(\d+)\.(p50|p95|p99|mean)$")
_THROUGHPUT = re.compile(r"^throughput_per_s\.b(\d+)$")
_QUALITY = re.compile(r"^quality\.[A-Za-z_][A-Za-z0-9_]*$")
_PLAIN = ("size_mb", "peak_memory_mb")


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objectives: list[str] = Field(
        description="metrics to optimize, named as in `compare --json`; minimized, `max:` prefix to maximize"
    )
    constraints: dict[str, str] = Field(
        default_factory=dict,
        description="metric -> '>= value' or '<= value'; trials breaking one are infeasible",
    )
    trials: int = Field(
        20, ge=1, le=100_000, description="trials in the study (a resumed study counts its own)"
    )
    sampler: Literal["tpe", "nsga2"] = Field("tpe", description="tpe (default) or nsga2 (NSGA-II)")
    seed: int | None = Field(None, description="sampler seed, for a reproducible sequence of trials")
    space: dict[int, dict[str, Any]] = Field(
        description="step position (from 1) -> {param: [choices] | {int: [lo, hi]} | {float: [lo, hi]}, "
        "optional: true}"
    )

    @field_validator("objectives")
    @classmethod
    def _some_objectives(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one objective")
        names = [metric_of(o) for o in v]
        if len(set(names)) != len(names):
            raise ValueError("an objective is listed twice")
        return v

    @field_validator("space")
    @classmethod
    def _some_space(cls, v: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        if not v:
            raise ValueError("the space is empty: name at least one step parameter or optional step")
        return v


def metric_of(objective: str) -> str:
    return objective[len(MAXIMIZE_PREFIX) :] if objective.startswith(MAXIMIZE_PREFIX) else objective


def maximized(objective: str) -> bool:
    return objective.startswith(MAXIMIZE_PREFIX)


def parse_constraint(text: str) -> tuple[str, float]:
    """'>= 0.995' -> ('>=', 0.995); ValueError with the accepted form otherwise."""
    match = _CONSTRAINT.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"'{text}' is not a constraint (expected '>= NUMBER' or '<= NUMBER')")
    return match.group(1), float(match.group(2))


def violation(op: str, bound: float, value: float) -> float:
    """Optuna's constraint convention: <= 0 is met, the amount above 0 says how far off a trial is."""
    return bound - value if op == ">=" else value - bound


# ------------------------------------------------------------------------------------------------ validation


def _metric_problem(name: str, recipe: Recipe) -> str | None:
    if name in _PLAIN or _QUALITY.match(name):
        return None
    for pattern in (_LATENCY, _THROUGHPUT):
        match = pattern.match(name)
        if match:
            batch = int(match.group(1))
            if not recipe.evaluate.latency:
                return f"'{name}' needs timing, but evaluate.latency is off"
            if batch not in recipe.evaluate.batch_sizes:
                return f"'{name}': batch {batch} is not timed (evaluate.batch_sizes: {recipe.evaluate.batch_sizes})"
            return None
    return (
        f"unknown metric '{name}' (expected size_mb, peak_memory_mb, latency_ms.bN.p50|p95|p99|mean, "
        "throughput_per_s.bN or quality.NAME)"
    )


def _check_value(params_cls: Any, base: dict[str, Any], name: str, value: Any, field: str) -> None:
    """Validate one candidate value with the technique's own Params model, so bounds are the block's."""
    try:
        params_cls.model_validate({**base, name: value})
    except ValidationError as exc:
        msgs = "; ".join(e["msg"] for e in exc.errors() if e["loc"][:1] == (name,)) or str(
            exc.errors()[0]["msg"]
        )
        raise BadInput(f"field '{field}': {value!r} is not allowed: {msgs}") from None


def _check_param(params_cls: Any, base: dict[str, Any], name: str, spec: Any, field: str) -> None:
    if name not in params_cls.model_fields:
        known = ", ".join(params_cls.model_fields) or "none"
        raise BadInput(f"field '{field}': the technique has no parameter '{name}' (its parameters: {known})")
    if isinstance(spec, list):
        if not spec:
            raise BadInput(f"field '{field}': an empty choice list")
        for value in spec:
            _check_value(params_cls, base, name, value, field)
        return
    if not isinstance(spec, dict) or not ({"int", "float"} & set(spec)):
        raise BadInput(
            f"field '{field}': expected a list of choices, {{int: [lo, hi]}} or {{float: [lo, hi]}}"
        )
    extra = set(spec) - {"int", "float", "log"}
    if extra or ("int" in spec and "float" in spec):
        raise BadInput(
            f"field '{field}': a range is {{int: [lo, hi]}} or {{float: [lo, hi]}} (optional log: true)"
        )
    kind = "int" if "int" in spec else "float"
    bounds = spec[kind]
    number = (int,) if kind == "int" else (int, float)
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or any(isinstance(b, bool) or not isinstance(b, number) for b in bounds)
    ):
        raise BadInput(f"field '{field}.{kind}': expected [lo, hi] with {kind} ends")
    lo, hi = bounds
    if not lo < hi:
        raise BadInput(f"field '{field}.{kind}': the range [{lo}, {hi}] is empty (lo must be below hi)")
    if not isinstance(spec.get("log", False), bool):
        raise BadInput(f"field '{field}.log': expected true or false")
    if spec.get("log") and lo <= 0:
        raise BadInput(f"field '{field}.{kind}': a log range needs lo > 0")
    for end in (lo, hi):
        _check_value(params_cls, base, name, end, f"{field}.{kind}")


def validate_search(recipe: Recipe, path: str | Path | None = None) -> SearchSpec:
    """Check the recipe's search section against its steps and techniques; returns it, or raises BadInput."""
    from studio.techniques.base import get_technique

    spec = recipe.search
    if spec is None:
        raise BadInput("the recipe has no 'search:' section (see the README: Search)", path=path)
    try:
        for i, objective in enumerate(spec.objectives):
            problem = _metric_problem(metric_of(objective), recipe)
            if problem:
                raise BadInput(f"field 'search.objectives.{i}': {problem}")
        for name, text in spec.constraints.items():
            field = f"search.constraints.{name}"
            if name.startswith(MAXIMIZE_PREFIX):
                raise BadInput(
                    f"field '{field}': a constraint names a metric, without the '{MAXIMIZE_PREFIX}'"
                )
            problem = _metric_problem(name, recipe)
            if problem:
                raise BadInput(f"field '{field}': {problem}")
            try:
                parse_constraint(text)
            except ValueError as exc:
                raise BadInput(f"field '{field}': {exc}") from None
        for position, entry in spec.space.items():
            field = f"search.space.{position}"
            if not 1 <= position <= len(recipe.steps):
                raise BadInput(
                    f"field '{field}': no step {position} (the recipe has {len(recipe.steps)} steps, numbered from 1)"
                )
            step = recipe.steps[position - 1]
            try:
                params_cls = get_technique(step.technique).Params
            except BadInput as exc:
                raise BadInput(f"field '{field}': step {position}: {exc.problem}") from None
            if OPTIONAL_KEY in entry and not isinstance(entry[OPTIONAL_KEY], bool):
                raise BadInput(f"field '{field}.{OPTIONAL_KEY}': expected true or false")
            names = [k for k in entry if k != OPTIONAL_KEY]
            if not names and not entry.get(OPTIONAL_KEY):
                raise BadInput(f"field '{field}': nothing to search (no parameter, not optional)")
            for name in names:
                _check_param(params_cls, step.params, name, entry[name], f"{field}.{name}")
    except BadInput as exc:
        raise BadInput(exc.problem, path=path) from None
    return spec


# ------------------------------------------------------------------------------------------------ trials


def param_name(position: int, name: str) -> str:
    """The Optuna parameter of a step's parameter: `3.per_channel`; `2.keep` for an optional step."""
    return f"{position}.{name}"


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _suggest(trial: Any, key: str, spec: Any) -> Any:
    if isinstance(spec, list):
        if all(_scalar(v) for v in spec):
            return trial.suggest_categorical(key, spec)
        # Optuna stores only scalar choices: lists (e.g. op_types) go in as their JSON text
        return json.loads(trial.suggest_categorical(key, [json.dumps(v) for v in spec]))
    if "int" in spec:
        lo, hi = spec["int"]
        return trial.suggest_int(key, lo, hi, log=bool(spec.get("log")))
    lo, hi = spec["float"]
    return trial.suggest_float(key, float(lo), float(hi), log=bool(spec.get("log")))


def trial_steps(recipe: Recipe, trial: Any) -> dict[str, Any]:
    """The concrete recipe data of one Optuna trial (an `optuna.Trial` or `FixedTrial`): the searched
    parameters filled in, dropped optional steps removed, and no `search:` section. `studio.search` parses it
    into a Recipe (this module sits below the pipeline and does not import it)."""
    spec = recipe.search
    assert spec is not None
    steps = []
    for position, step in enumerate(recipe.steps, 1):
        entry = spec.space.get(position, {})
        if entry.get(OPTIONAL_KEY) and not trial.suggest_categorical(
            param_name(position, "keep"), [True, False]
        ):
            continue
        params = dict(step.params)
        for name, pspec in entry.items():
            if name != OPTIONAL_KEY:
                params[name] = _suggest(trial, param_name(position, name), pspec)
        steps.append({"technique": step.technique, "params": params})
    data = recipe.model_dump(mode="json")
    data.pop("search", None)
    data["steps"] = steps
    return data
