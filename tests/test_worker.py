"""The worker process: events, cancel, crashes; the workspace stays consistent whatever happens."""

from __future__ import annotations

import json
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


def _run(recipe, ws, **extra):
    client = WorkerClient(recipe, ws, extra=extra)
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
    client, events = _run(QUICK, tmp_path, crash_for_test=sig)
    assert isinstance(events[-1], Error) and events[-1].kind == "crash"
    assert sig in events[-1].message
    assert client.returncode == -getattr(signal, sig)


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
