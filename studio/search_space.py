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
  alternatives:                     # optional: a trial keeps one group of steps and drops the others
    onnxruntime: [2, 3]
    openvino: [4, 5]
```

Objectives are metric names as `model-studio compare --json` writes them; each is minimized unless it has
the `max:` prefix. A list is a choice, `{int: [lo, hi]}` / `{float: [lo, hi]}` a range (both ends
included; `log: true` samples on a log scale), `optional: true` a step a trial may drop. `alternatives`
names groups of steps of which a trial keeps exactly one (the Optuna parameter `alternative`), for example
two runtimes after one export, each with its own steps: the steps of the other groups are left out and their
parameters not sampled. A new study tries every alternative once first (its other parameters sampled), so
even a short search measures each; which one wins depends on the machine (OpenVINO + NNCF on CPUs with
VNNI, ONNX Runtime's INT8 on some without), so the recipe need not hard-wire it.

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
ALTERNATIVE_PARAM = "alternative"  # the Optuna parameter that picks one of `search.alternatives`
_ALTERNATIVE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
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
        default_factory=dict,
        description="step position (from 1) -> {param: [choices] | {int: [lo, hi]} | {float: [lo, hi]}, "
        "optional: true}",
    )
    alternatives: dict[str, list[int]] = Field(
        default_factory=dict,
        description="name -> step positions (from 1): a trial keeps the steps of one alternative and "
        "drops the other alternatives' steps (at least two alternatives, no step in two)",
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


def _check_alternatives(alternatives: dict[str, list[int]], steps: int) -> None:
    if not alternatives:
        return
    if len(alternatives) < 2:
        raise BadInput(
            f"field 'search.alternatives': name at least two alternatives (got {len(alternatives)}); a "
            "step a trial may leave out is `optional: true` in the space"
        )
    owner: dict[int, str] = {}
    for name, positions in alternatives.items():
        field = f"search.alternatives.{name}"
        if not _ALTERNATIVE_NAME.match(name):
            raise BadInput(f"field '{field}': a name is a letter, then letters, digits, '-' or '_'")
        if not positions:
            raise BadInput(f"field '{field}': no steps (list the step positions, from 1)")
        for position in positions:
            if not 1 <= position <= steps:
                raise BadInput(
                    f"field '{field}': no step {position} (the recipe has {steps} steps, numbered from 1)"
                )
            if position in owner:
                raise BadInput(
                    f"field '{field}': step {position} is already in alternative '{owner[position]}'"
                )
            owner[position] = name


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
        _check_alternatives(spec.alternatives, len(recipe.steps))
        if not spec.space and not spec.alternatives:
            raise BadInput(
                "field 'search.space': the space is empty: name at least one step parameter, optional step "
                "or alternatives"
            )
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


def left_out(spec: SearchSpec, alternative: str | None) -> set[int]:
    """The step positions a trial that keeps `alternative` drops: those of every other alternative."""
    return {p for name, positions in spec.alternatives.items() if name != alternative for p in positions}


def alternative_data(recipe: Recipe, alternative: str) -> dict[str, Any]:
    """The recipe data of one alternative as written (the other alternatives' steps removed, every other
    step kept with its written parameters, no `search:` section): what is checked before any trial runs,
    since the whole recipe, every alternative's steps in a row, need not be a valid pipeline."""
    spec = recipe.search
    assert spec is not None
    dropped = left_out(spec, alternative)
    data = recipe.model_dump(mode="json")
    data.pop("search", None)
    data["steps"] = [s for i, s in enumerate(data["steps"], 1) if i not in dropped]
    return data


def trial_steps(recipe: Recipe, trial: Any) -> dict[str, Any]:
    """The concrete recipe data of one Optuna trial (an `optuna.Trial` or `FixedTrial`): the alternative
    chosen (the others' steps removed), the searched parameters filled in, dropped optional steps removed,
    and no `search:` section. `studio.search` parses it into a Recipe (this module sits below the pipeline
    and does not import it)."""
    spec = recipe.search
    assert spec is not None
    chosen = (
        trial.suggest_categorical(ALTERNATIVE_PARAM, list(spec.alternatives)) if spec.alternatives else None
    )
    dropped = left_out(spec, chosen)
    steps = []
    for position, step in enumerate(recipe.steps, 1):
        if position in dropped:
            continue
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
