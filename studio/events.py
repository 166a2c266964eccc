"""The worker protocol's events: one JSON object per line on the worker's stdout.

Every event has a `type`: `progress` (step, fraction, message), `log` (level, message), `metric` (name,
value, step, extra fields such as `iteration`), `variant` (the saved variant's record), `error` (kind,
message, step) and `done` (the run's result). The worker writes them; the client parses them into these
dataclasses, which the CLI prints and the GUI shows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    step: int  # -1 before the first step (loading, validating) and len(steps) for evaluation
    fraction: float
    message: str = ""
    type: str = "progress"


@dataclass(frozen=True)
class Log:
    message: str
    level: str = "info"
    step: int | None = None
    type: str = "log"


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    type: str = "metric"


@dataclass(frozen=True)
class VariantSaved:
    variant: dict[str, Any]
    type: str = "variant"


@dataclass(frozen=True)
class Error:
    kind: str  # "bad-input", "unavailable", "cancelled", "crash", "internal"
    message: str
    step: int | None = None
    detail: str = ""  # a traceback or the worker's last stderr lines
    type: str = "error"


@dataclass(frozen=True)
class Done:
    result: dict[str, Any]
    type: str = "done"


Event = Progress | Log | Metric | VariantSaved | Error | Done

_FIELDS = {"progress", "log", "metric", "variant", "error", "done"}


def to_json(event: Event) -> str:
    data = asdict(event)
    if isinstance(event, Metric):
        extra = data.pop("extra")
        data.update(extra)
    return json.dumps(data, default=str)


def from_dict(data: dict[str, Any]) -> Event:
    kind = data.get("type")
    if kind == "progress":
        return Progress(
            int(data.get("step", -1)), float(data.get("fraction", 0.0)), str(data.get("message", ""))
        )
    if kind == "log":
        return Log(str(data.get("message", "")), str(data.get("level", "info")), data.get("step"))
    if kind == "metric":
        known = {"type", "name", "value", "step"}
        extra = {k: v for k, v in data.items() if k not in known}
        return Metric(str(data["name"]), float(data["value"]), data.get("step"), extra)
    if kind == "variant":
        return VariantSaved(dict(data["variant"]))
    if kind == "error":
        return Error(
            str(data.get("kind", "internal")),
            str(data.get("message", "")),
            data.get("step"),
            str(data.get("detail", "")),
        )
    if kind == "done":
        return Done(dict(data.get("result", {})))
    raise ValueError(f"unknown event type {kind!r}")


def from_json(line: str) -> Event:
    return from_dict(json.loads(line))
