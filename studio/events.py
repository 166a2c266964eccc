"""The worker protocol's events: one JSON object per line on the worker's stdout.

Every event has a `type`: `progress` (step, fraction, message), `log` (level, message), `metric` (name,
value, step, extra fields such as `iteration`), `variant` (the saved variant's record), `error` (kind,
message, step), `done` (the run's result) and, in a generate job, `token` (which variant, how many new
tokens, the text so far, time to first token, decode tokens/s so far). Techniques and the run loop make these dataclasses, the
worker writes them as JSON lines, and `EventDecoder` turns the bytes a client reads back into them, which
the CLI prints and the GUI shows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


class WireEvent:
    """What every event shares: its JSON object on the wire, and reading one of its fields by that name
    (`event["type"]`, a metric's `event["iteration"]`), so code that knows the JSON lines reads events."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass
        if isinstance(self, Metric):
            data.update(data.pop("extra"))  # a metric's extra fields sit next to its name on the wire
        return data

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


@dataclass(frozen=True)
class Progress(WireEvent):
    step: int  # -1 before the first step (loading, validating) and len(steps) for evaluation
    fraction: float
    message: str = ""
    type: str = "progress"


@dataclass(frozen=True)
class Log(WireEvent):
    message: str
    level: str = "info"
    step: int | None = None
    type: str = "log"


@dataclass(frozen=True)
class Metric(WireEvent):
    name: str
    value: float
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    type: str = "metric"


@dataclass(frozen=True)
class VariantSaved(WireEvent):
    variant: dict[str, Any]
    type: str = "variant"


@dataclass(frozen=True)
class Error(WireEvent):
    kind: str  # "bad-input", "unavailable", "cancelled", "crash", "internal"
    message: str
    step: int | None = None
    detail: str = ""  # a traceback or the worker's last stderr lines
    type: str = "error"


@dataclass(frozen=True)
class Token(WireEvent):
    """One more token of one variant in a generate job: the text so far rather than the new piece, since a
    byte-level token can complete a character an earlier token began."""

    variant: str  # which side ("A", "B")
    tokens: int  # new tokens so far
    text: str  # the generated text so far (the prompt not included)
    ttft_ms: float  # time to first token: the prefill of the prompt and the first token's choice
    tokens_per_s: float  # decode tokens per second so far (0 until the second token)
    finished: bool = False  # this variant has ended (end-of-sequence token, or all new tokens made)
    type: str = "token"


@dataclass(frozen=True)
class Done(WireEvent):
    result: dict[str, Any]
    type: str = "done"


Event = Progress | Log | Metric | VariantSaved | Error | Token | Done


def to_json(event: Event) -> str:
    return json.dumps(event.to_dict(), default=str)


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
    if kind == "token":
        return Token(
            str(data["variant"]),
            int(data["tokens"]),
            str(data["text"]),
            float(data["ttft_ms"]),
            float(data["tokens_per_s"]),
            bool(data.get("finished", False)),
        )
    if kind == "done":
        return Done(dict(data.get("result", {})))
    raise ValueError(f"unknown event type {kind!r}")


def from_json(line: str) -> Event:
    return from_dict(json.loads(line))


class EventDecoder:
    """The worker's stdout, read in chunks of any size, back into events: a chunk may end inside a line,
    which waits for the next chunk. A line that is not an event comes back as its text (a library that
    wrote to the real stdout anyway), for the caller to show or ignore. `outcome` is the last `done` or
    `error` seen: a worker that ends without one died before it could say why."""

    def __init__(self) -> None:
        self._buffer = b""
        self.outcome: Done | Error | None = None

    def feed(self, data: bytes) -> list[Event | str]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return self._decode(lines)

    def close(self) -> list[Event | str]:
        """What a last line without its newline held, once the stream has ended."""
        rest, self._buffer = self._buffer, b""
        return self._decode([rest])

    def _decode(self, lines: list[bytes]) -> list[Event | str]:
        out: list[Event | str] = []
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                event = from_json(line)
            except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not an event's JSON
                out.append(line)
                continue
            if isinstance(event, (Done, Error)):
                self.outcome = event
            out.append(event)
        return out
