"""The worker's `generate` job: one prompt, greedy-decoded by two variants (A and B) side by side, streamed
token by token, then their decode speed and KV-cache memory measured at a few context lengths.

The Generate tab shows what this job sends and computes nothing itself. The job is a `Job` whose extra
fields carry `kind: "generate"` and a `generate` object (`GenerateRequest.to_dict`); the worker hands it to
`run_generate`, which writes:

- `progress` while each side loads (step -1);
- one `token` event per new token of each side, with the text so far, its time to first token and its
  decode tokens/s so far. A and B take turns, one token each, so both streams move together; each side's
  times are its own compute only (its prefill, its decode steps), never the other side's turn;
- `metric` events `decode_tokens_per_s` and `kv_cache_bytes`, with `variant` and `context_tokens` fields,
  one of each per side and context length;
- `done` with everything above in one object.

Decoding is greedy with a KV cache (evaluation.generation.greedy_loop: torch, or ONNX Runtime for a graph
exported with its cache), so a side's text is the same on every run. A side ends at its tokenizer's end-of-sequence token or after `new_tokens`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import BadInput
from studio.events import Event, Metric, Progress, Token
from studio.jobs import Job

if TYPE_CHECKING:
    from studio.checkpoints.base import LoadedModel

GENERATE_KIND = "generate"
GENERATIVE_FAMILIES = ("causal-lm", "seq2seq")
DEFAULT_NEW_TOKENS = 48
MAX_NEW_TOKENS = 4096
DECODE_STEPS = 16  # timed decode steps at each profiled context length (their median gives tokens/s)
SHORTEST_PROFILE = 16  # the first profiled context length; then doubling up to the model's context
PROFILE_POINTS = 6


@dataclass(frozen=True)
class Side:
    """One of the variants that generate: the original model (`source`) or a workspace row (`row`)."""

    label: str  # "A" or "B": how events name it
    source: str | None = None  # the original's checkpoint (a path or builtin:name) when `row` is None
    row: str | None = None  # a workspace variant id

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "source": self.source, "row": self.row}

    @classmethod
    def from_dict(cls, data: Any) -> Side:
        if not isinstance(data, dict) or not isinstance(data.get("label"), str):
            raise BadInput("field 'generate.variants': each variant needs a label and a source or a row id")
        source, row = data.get("source"), data.get("row")
        if (source is None) == (row is None) or not isinstance(source or row, str):
            raise BadInput(
                f"field 'generate.variants': variant {data['label']} needs either a source or a row id"
            )
        return cls(data["label"], source, row)

    @property
    def key(self) -> str:
        """Two sides with the same key are the same checkpoint: it is loaded once."""
        return f"row:{self.row}" if self.row is not None else f"source:{self.source}"

    @classmethod
    def from_key(cls, label: str, key: str) -> Side:
        """The side `label` for a `key` ("row:<id>" or "source:<checkpoint>")."""
        kind, _, value = key.partition(":")
        return cls(label, row=value) if kind == "row" else cls(label, source=value)


@dataclass(frozen=True)
class GenerateRequest:
    sides: tuple[Side, ...]
    prompt: str
    new_tokens: int = DEFAULT_NEW_TOKENS
    context_lengths: tuple[int, ...] | None = None  # None: doubling from 16 up to the model's context
    decode_steps: int = DECODE_STEPS

    def to_dict(self) -> dict[str, Any]:
        return {
            "variants": [side.to_dict() for side in self.sides],
            "prompt": self.prompt,
            "new_tokens": self.new_tokens,
            "context_lengths": None if self.context_lengths is None else list(self.context_lengths),
            "decode_steps": self.decode_steps,
        }

    @classmethod
    def from_dict(cls, data: Any) -> GenerateRequest:
        """The worker's reading of the job's `generate` object; anything a person could have typed wrong
        is refused naming the field."""
        if not isinstance(data, dict):
            raise BadInput("field 'generate': a generate job needs an object with the prompt and variants")
        sides = tuple(Side.from_dict(item) for item in data.get("variants") or [])
        if not sides:
            raise BadInput("field 'generate.variants': no variant to generate with")
        if len({side.label for side in sides}) != len(sides):
            raise BadInput("field 'generate.variants': two variants have the same label")
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadInput("field 'generate.prompt': the prompt is empty; type something to continue")
        new_tokens = data.get("new_tokens", DEFAULT_NEW_TOKENS)
        if (
            not isinstance(new_tokens, int)
            or isinstance(new_tokens, bool)
            or not 1 <= new_tokens <= MAX_NEW_TOKENS
        ):
            raise BadInput(
                f"field 'generate.new_tokens': {new_tokens!r} is not a whole number from 1 to {MAX_NEW_TOKENS}"
            )
        lengths = data.get("context_lengths")
        if lengths is not None:
            if not isinstance(lengths, list) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths
            ):
                raise BadInput("field 'generate.context_lengths': a list of whole numbers of at least 1")
            lengths = tuple(sorted(set(lengths)))
        steps = data.get("decode_steps", DECODE_STEPS)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise BadInput(f"field 'generate.decode_steps': {steps!r} is not a whole number of at least 1")
        return cls(sides, prompt, new_tokens, lengths, steps)


def generate_job(request: GenerateRequest, workspace: str | Path | None, *, trust: bool = False) -> Job:
    """The job a client writes to the worker's stdin for `request` (the recipe field stays empty)."""
    return Job(
        None,
        None if workspace is None else Path(workspace),
        trust=trust,
        extra={"kind": GENERATE_KIND, "generate": request.to_dict()},
    )


def is_generate(data: dict[str, Any]) -> bool:
    """Whether a job the worker read is a generate job (every other job runs a recipe)."""
    return data.get("kind") == GENERATE_KIND


# ------------------------------------------------------------------------------------------------ one side


class Stream:
    """One side's greedy decoding, a token at a time, with its own clock."""

    def __init__(self, side: Side, model: LoadedModel, prompt: str, new_tokens: int) -> None:
        import torch

        from studio.checkpoints.stage import stage_of
        from studio.evaluation.generation import greedy_loop
        from studio.families import context_length

        self.side = side
        self.model = model
        self.tokenizer = model.tokenizer
        kind = stage_of(model)
        # a torch module, or an ONNX graph exported with its cache (anything else was refused at loading)
        self.loop = greedy_loop(kind, model.module if kind == "torch" else model.path, model.family)
        ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise BadInput(f"variant {side.label}: the tokenizer gives no tokens for the prompt")
        limit = context_length(model)
        needed = max(len(ids), new_tokens) if model.family == "seq2seq" else len(ids) + new_tokens
        if limit is not None and needed > limit:
            raise BadInput(
                f"variant {side.label}: the prompt's {len(ids)} tokens and {new_tokens} new tokens are beyond "
                f"the model's context of {limit} positions (shorten the prompt or ask for fewer tokens)"
            )
        self.prompt_ids = torch.tensor([ids], dtype=torch.long)
        self.new_tokens = new_tokens
        self.eos = getattr(self.tokenizer, "eos_token_id", None)
        self.tokens: list[int] = []
        self.ttft_ms = 0.0
        self.decode_ms = 0.0
        self.finished = False
        self.ended_at_eos = False
        self._token: Any = None
        self._state: dict[str, Any] | None = None

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens per second so far: tokens after the first over the time their steps took."""
        return (len(self.tokens) - 1) * 1000.0 / self.decode_ms if self.decode_ms > 0 else 0.0

    @property
    def text(self) -> str:
        # the whole id list is decoded each time: a byte-level token may complete a character begun earlier
        return str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def advance(self) -> Token:
        """Compute the next token (the prefill first) and say where the side stands."""
        import torch

        first = self._state is None
        began = time.perf_counter()
        with torch.inference_mode():
            if self._state is None:
                token, self._state = self.loop.prefill(self.prompt_ids)
            else:
                token = self.loop.step(self._token, self._state)
            self.loop.sync()
        elapsed = (time.perf_counter() - began) * 1000.0
        if first:
            self.ttft_ms = elapsed
        else:
            self.decode_ms += elapsed
        self._token = token
        value = int(token[0])
        if self.eos is not None and value == self.eos:
            self.ended_at_eos = True
        else:
            self.tokens.append(value)
        self.finished = self.ended_at_eos or len(self.tokens) >= self.new_tokens
        return Token(
            self.side.label, len(self.tokens), self.text, self.ttft_ms, self.tokens_per_s, self.finished
        )

    def summary(self) -> dict[str, Any]:
        return {
            **self.side.to_dict(),
            "prompt_tokens": int(self.prompt_ids.shape[1]),
            "tokens": len(self.tokens),
            "text": self.text,
            "ttft_ms": self.ttft_ms,
            "decode_tokens_per_s": self.tokens_per_s,
            "ended_at_eos": self.ended_at_eos,
        }


def interleave(streams: Sequence[Stream], sink: Callable[[Event], None]) -> None:
    """Each unfinished side computes one token in turn until every side has finished."""
    while True:
        active = [s for s in streams if not s.finished]
        if not active:
            return
        for stream in active:
            sink(stream.advance())


# ------------------------------------------------------------------------------------------------ profile


def profile_lengths(model: LoadedModel, decode_steps: int, asked: Sequence[int] | None = None) -> list[int]:
    """The context lengths to profile: those asked for (refused when beyond the context), or doubling from
    16 while the prompt, one warm-up step and the timed steps still fit in the model's context."""
    from studio.families import context_length

    limit = context_length(model) or 1024
    room = limit - decode_steps - 1
    if asked is not None:
        too_long = [n for n in asked if n > room]
        if too_long:
            raise BadInput(
                f"field 'generate.context_lengths': {too_long[0]} tokens and {decode_steps + 1} decode steps "
                f"are beyond the model's context of {limit} positions"
            )
        return list(asked)
    lengths: list[int] = []
    n = SHORTEST_PROFILE
    while n <= room and len(lengths) < PROFILE_POINTS:
        lengths.append(n)
        n *= 2
    return lengths


def profile_point(stream: Stream, context: int, decode_steps: int) -> dict[str, Any]:
    """Decode tokens/s (the median of `decode_steps` timed steps after one warm-up step) and the bytes the
    KV cache holds, with a prompt of `context` tokens (the prompt's ids repeated to that length)."""
    import torch

    from studio.evaluation.generation import cache_bytes

    ids = stream.prompt_ids[0].tolist()
    ids = (ids * (context // len(ids) + 1))[:context]
    loop = stream.loop
    samples = []
    with torch.inference_mode():
        token, state = loop.prefill(torch.tensor([ids], dtype=torch.long))
        kv = cache_bytes(state["cache"])  # the cache holds exactly `context` positions here
        token = loop.step(token, state)  # warm-up
        loop.sync()
        for _ in range(decode_steps):
            began = time.perf_counter()
            token = loop.step(token, state)
            loop.sync()
            samples.append((time.perf_counter() - began) * 1000.0)
    median = statistics.median(samples)
    return {
        "context_tokens": context,
        "decode_tokens_per_s": 1000.0 / median if median > 0 else 0.0,
        "kv_cache_bytes": kv,
    }


# ------------------------------------------------------------------------------------------------ the job


def load_side(side: Side, workspace: Any, trust: bool) -> LoadedModel:
    """The checkpoint of one side, refused unless it is a model that generates text: a torch model, or an
    ONNX graph exported with its KV cache (export.onnx `with_cache`), which generates on ONNX Runtime."""
    import studio.techniques  # noqa: F401  # registers the restorers that rebuild saved torch variants
    from studio.checkpoints import open_checkpoint
    from studio.compare import open_row

    if side.row is not None:
        row = workspace.get(side.row)
        if row["kind"] not in ("torch", "baseline", "onnx"):
            raise BadInput(
                f"variant {side.label} ({row['id']}) is a {row['kind']} variant: only torch variants and ONNX "
                "graphs exported with their cache generate here"
            )
        model = open_row(row, trust=trust if row["kind"] == "baseline" else False)
        name = row["id"]
        if row["kind"] == "onnx" and model.family in GENERATIVE_FAMILIES:
            from studio.evaluation.generation import onnx_generates

            if not onnx_generates(model.path, model.family):
                raise BadInput(
                    f"variant {side.label} ({row['id']}) is an ONNX graph without past key/values: it cannot "
                    "generate token by token (export it with export.onnx `with_cache: true`)"
                )
    else:
        assert side.source is not None
        model = open_checkpoint(side.source, trust=trust)
        name = side.source
    if model.family not in GENERATIVE_FAMILIES:
        raise BadInput(
            f"variant {side.label} ({name}) is a {model.family} model: it does not generate text "
            "(open a causal-lm or seq2seq model)"
        )
    return model


def run_generate(
    data: dict[str, Any], workspace_root: Path | None, trust: bool, sink: Callable[[Event], None]
) -> dict[str, Any]:
    """The worker's body of a generate job (`data`: the job as read); returns the `done` event's result."""
    import torch

    from studio.variants import Workspace

    request = GenerateRequest.from_dict(data.get("generate"))
    workspace = Workspace(workspace_root) if any(s.row is not None for s in request.sides) else None
    torch.manual_seed(0)  # greedy decoding is deterministic; the seed keeps anything random fixed too
    loaded: dict[str, LoadedModel] = {}
    streams = []
    for i, side in enumerate(request.sides):
        sink(Progress(-1, i / (len(request.sides) + 1), f"loading {side.label}: {side.row or side.source}"))
        if side.key not in loaded:
            loaded[side.key] = load_side(side, workspace, trust)
        streams.append(Stream(side, loaded[side.key], request.prompt, request.new_tokens))
    sink(Progress(-1, len(request.sides) / (len(request.sides) + 1), "generating"))
    interleave(streams, sink)
    profiles: dict[str, list[dict[str, Any]]] = {}
    for stream in streams:
        lengths = profile_lengths(stream.model, request.decode_steps, request.context_lengths)
        profiles[stream.side.label] = points = []
        for context in lengths:
            point = profile_point(stream, context, request.decode_steps)
            points.append(point)
            extra = {"variant": stream.side.label, "context_tokens": context}
            sink(Metric("decode_tokens_per_s", point["decode_tokens_per_s"], None, extra))
            sink(Metric("kv_cache_bytes", float(point["kv_cache_bytes"]), None, extra))
    return {
        "kind": GENERATE_KIND,
        "prompt": request.prompt,
        "new_tokens": request.new_tokens,
        "variants": {s.side.label: s.summary() for s in streams},
        "profile": profiles,
    }
