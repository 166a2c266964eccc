"""The worker process: events, cancel, crashes; the workspace stays consistent whatever happens."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from studio.events import Done, Error, Progress, from_json, to_json
from studio.variants import Workspace
from studio.worker import WorkerClient

QUICK = {
    "version": 1,
    "model": "builtin:minilm",
    "data": {"evaluation_examples": 8, "calibration_examples": 8},
    "steps": [],
    "evaluate": {"latency": False, "sequence_length": 32},
}


def _run(recipe, ws):
    client = WorkerClient(recipe, ws)
    return client, list(client.events())


def test_events_round_trip():
    from studio.events import Log, Metric

    for e in [
        Progress(2, 0.5, "half"),
        Log("hi", "warning", 1),
        Metric("loss", 0.25, 3, {"iteration": 7}),
        Error("crash", "boom", None, "tb"),
        Done({"a": 1}),
    ]:
        assert from_json(to_json(e)) == e
    assert json.loads(to_json(Metric("loss", 1.0, 0, {"iteration": 2})))["iteration"] == 2


def test_worker_runs_a_job_and_saves_a_variant(tmp_path):
    client, events = _run(QUICK, tmp_path)
    assert client.returncode == 0
    assert isinstance(events[-1], Done)
    assert any(isinstance(e, Progress) for e in events)
    (variant,) = events[-1].result["variants"]
    assert variant["metrics"]["quality"]["fidelity_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert variant["metrics"]["size_bytes"] > 80_000_000
    ws = Workspace(tmp_path)
    assert [v["id"] for v in ws.list() if v["kind"] != "baseline"] == [variant["id"]]
    assert not any((tmp_path / "tmp").iterdir())


def test_bad_recipe_is_an_error_event(tmp_path):
    client, events = _run({**QUICK, "steps": [{"technique": "no.such"}]}, tmp_path)
    assert isinstance(events[-1], Error) and events[-1].kind == "bad-input"
    assert "unknown technique 'no.such'" in events[-1].message
    assert client.returncode == 2


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSEGV"])
def test_crash_becomes_an_error_with_exit_status(tmp_path, sig):
    client = WorkerClient(QUICK, tmp_path)
    client.start()
    events = client.events()
    for event in events:  # once the job works inside its folder, the worker dies from a real signal
        if isinstance(event, Progress):
            break
    job = tmp_path / "tmp" / client.job_id
    assert job.is_dir()
    os.killpg(client.process.pid, getattr(signal, sig))
    rest = list(events)
    assert isinstance(rest[-1], Error) and rest[-1].kind == "crash"
    assert sig in rest[-1].message
    assert client.returncode == -getattr(signal, sig)
    assert not job.exists()  # the client removes what the dead worker left


def test_a_decoder_joins_chunks_into_events_and_returns_other_lines():
    from studio.events import EventDecoder, Log

    wire = (to_json(Progress(0, 0.5, "half")) + "\nnot an event\n" + to_json(Done({"a": 1}))).encode()
    decoder = EventDecoder()
    out = []
    for i in range(0, len(wire), 7):  # chunks that end inside lines
        out += decoder.feed(wire[i : i + 7])
    assert out == [Progress(0, 0.5, "half"), "not an event"] and decoder.outcome is None
    assert decoder.close() == [Done({"a": 1})] and decoder.outcome == Done({"a": 1})
    assert decoder.feed(to_json(Log("x")).encode() + b"\n") == [Log("x")]


def test_error_kinds_and_exit_codes_agree():
    from studio.errors import BadInput, DiskFull, StudioError, Unavailable, exit_code_for

    for cls in (BadInput, Unavailable, DiskFull):
        assert exit_code_for(cls.kind) == cls("x").exit_code
    assert [exit_code_for(k) for k in ("bad-input", "unavailable", "disk-full", "cancelled")] == [
        2,
        3,
        4,
        130,
    ]
    assert exit_code_for("crash") == exit_code_for("internal") == StudioError.exit_code == 1


def test_typed_events_read_like_their_json(tmp_path):
    from studio.events import Metric
    from studio.techniques.base import RunContext

    events: list = []
    ctx = RunContext(original=None, workdir=tmp_path, step_index=2, emit=events.append)
    ctx.progress(0.25, "a quarter")
    ctx.metric("distill_loss", 1, iteration=4)
    assert events == [Progress(2, 0.25, "a quarter"), Metric("distill_loss", 1.0, 2, {"iteration": 4})]
    assert events[1]["iteration"] == 4 and events[1]["type"] == "metric" and events[0]["fraction"] == 0.25
    assert [json.loads(to_json(e)) for e in events] == [
        {"step": 2, "fraction": 0.25, "message": "a quarter", "type": "progress"},
        {"name": "distill_loss", "value": 1.0, "step": 2, "type": "metric", "iteration": 4},
    ]


def test_cancel_stops_within_two_seconds_and_leaves_nothing(tmp_path):
    client = WorkerClient(
        {**QUICK, "evaluate": {"latency": True, "batch_sizes": [1], "sequence_length": 32}}, tmp_path
    )
    client.start()
    events = client.events()
    for event in events:  # wait until the job really works inside its folder
        if isinstance(event, Progress) and event.step >= 0:
            break
    t0 = time.perf_counter()
    client.cancel()
    assert time.perf_counter() - t0 < 2.0
    rest = list(events)
    assert isinstance(rest[-1], Error) and rest[-1].kind == "cancelled"
    ws = Workspace(tmp_path)
    assert not any(v["kind"] != "baseline" for v in ws.list())
    assert not any((tmp_path / "variants").iterdir())
    assert not any((tmp_path / "tmp").iterdir())
