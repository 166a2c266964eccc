"""Parallel search: trials overlap, their timings never do (a real flock across real worker processes).

The search runs real trials (worker processes, ONNX export and quantization, evaluation with timing on)
on a tiny BERT classifier with a tiny evaluation; `--parallel 2` is forced, whatever the core count.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from studio.cli import main
from studio.evaluation.timing_lock import LOCK_ENV, hold, timing_window, workspace_lock
from studio.search_runner import default_parallel
from studio.variants import Workspace

ROOT = Path(__file__).resolve().parents[1]
TRY_LOCK = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "try:\n"
    "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "except BlockingIOError:\n"
    "    print('busy')\n"
    "else:\n"
    "    print('taken')\n"
)
HOLD_AND_DIE = (
    "import os, signal, sys\n"
    "from pathlib import Path\n"
    "from studio.evaluation.timing_lock import timing_window\n"
    "with timing_window(Path(sys.argv[1])):\n"
    "    print('held', flush=True)\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
)


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_the_timing_lock_excludes_other_processes_and_a_crash_releases_it(tmp_path):
    lock = workspace_lock(tmp_path / "ws")
    assert lock == tmp_path / "ws" / "locks" / "timing.lock"
    with hold(lock):
        assert _python(TRY_LOCK, str(lock)).stdout.strip() == "busy"
    assert _python(TRY_LOCK, str(lock)).stdout.strip() == "taken"

    died = _python(HOLD_AND_DIE, str(lock))
    assert died.stdout.strip() == "held" and died.returncode == -9, died.stderr
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if the dead holder kept it
    finally:
        os.close(fd)


def test_a_timing_window_reads_the_lock_from_the_environment(tmp_path, monkeypatch):
    lock = tmp_path / "locks" / "timing.lock"
    monkeypatch.setenv(LOCK_ENV, str(lock))
    with timing_window() as window:
        assert lock.is_file() and "start" in window and "end" not in window
        assert _python(TRY_LOCK, str(lock)).stdout.strip() == "busy"
    assert window["start"] <= window["end"]
    assert _python(TRY_LOCK, str(lock)).stdout.strip() == "taken"


def test_default_parallel_follows_the_cores():
    assert default_parallel(2) == 1 and default_parallel(3) == 1
    assert default_parallel(4) == 2 and default_parallel(64) == 2


def _timed_search(model: Path, tmp_path: Path, trials: int) -> Path:
    data = {
        "model": str(model),
        "data": {"calibration_examples": 4, "evaluation_examples": 4},
        "steps": [
            {"technique": "export.onnx", "params": {"verify": False}},
            {"technique": "onnx.optimize"},
            {"technique": "onnx.quantize_dynamic"},
        ],
        "evaluate": {"batch_sizes": [1], "sequence_length": 16},
        "search": {
            "objectives": ["latency_ms.b1.p50", "size_mb"],
            "constraints": {"quality.output_cosine": ">= 0.5"},
            "trials": trials,
            "seed": 5,
            "space": {2: {"optional": True}, 3: {"per_channel": [True, False]}},
        },
    }
    path = tmp_path / "timed-search.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _search(capsys, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["search", *args, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) | {"_log": captured.err}


def _assert_windows_apart(trials: list[dict]) -> None:
    windows = sorted((t["timing_window"] for t in trials), key=lambda w: w["start"])
    for earlier, later in itertools.pairwise(windows):
        assert earlier["start"] < earlier["end"] <= later["start"], windows


@pytest.mark.skipif(not hasattr(fcntl, "flock"), reason="flock is POSIX")
def test_parallel_trials_overlap_but_their_timings_never_do(bert_classifier, tmp_path, capsys):
    path = _timed_search(bert_classifier, tmp_path, trials=2)
    ws = tmp_path / "ws"
    code, result = _search(capsys, str(path), "--workspace", str(ws), "--parallel", "2")
    assert code == 0, result
    assert "up to 2 trials at a time" in result["_log"]
    assert [t["state"] for t in result["trials"]] == ["COMPLETE"] * 2, result["trials"]
    assert all(t["timing_window"] for t in result["trials"])
    _assert_windows_apart(result["trials"])
    assert workspace_lock(ws).is_file()
    variants = {r["id"]: r for r in Workspace(ws).list()}
    for t in result["trials"]:  # the window the row shows is the one the variant's metrics recorded
        assert variants[t["variant"]]["metrics"]["timing_window"] == t["timing_window"]

    # the trials themselves did overlap: the second started before the first had finished
    study = optuna.load_study(study_name=result["study"], storage=f"sqlite:///{result['storage']}")
    first, second = study.trials[0], study.trials[1]
    assert second.datetime_start < first.datetime_complete

    # a resumed study continues its count, in parallel too
    code, again = _search(capsys, str(path), "--workspace", str(ws), "--parallel", "2", "--trials", "3")
    assert code == 0, again
    numbers = [t["number"] for t in again["trials"]]  # (a skipped number: a repeat, never run)
    assert again["new_trials"] == 1 and numbers[:2] == [0, 1] and len(numbers) == 3 and numbers[2] >= 2
    assert again["trials"][:2] == result["trials"]
    _assert_windows_apart([t for t in again["trials"] if t["state"] == "COMPLETE"])


def test_ctrl_c_stops_every_trial_in_flight_and_the_study_resumes(bert_classifier, tmp_path, capsys):
    import signal
    import time

    path = _timed_search(bert_classifier, tmp_path, trials=3)
    data = yaml.safe_load(path.read_text())
    data["evaluate"]["latency"] = False  # no timing needed to be stopped: a quicker trial
    data["search"]["objectives"] = ["size_mb", "max:quality.output_cosine"]
    path.write_text(yaml.safe_dump(data))
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "studio", "search", str(path), "--workspace", str(ws), "--parallel", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for _ in range(3000):  # stop once both trials' workers have made their job folders
        folders = [p for p in (ws / "tmp").iterdir() if p.is_dir()] if (ws / "tmp").is_dir() else []
        if len(folders) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert len(folders) >= 2, proc.stderr.read() if proc.poll() is not None else "no two trials in flight"
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait() == 130, rest
    assert not [p for p in (ws / "tmp").iterdir() if p.is_dir()]  # no worker folder left behind

    code, result = _search(capsys, str(path), "--workspace", str(ws), "--parallel", "2", "--trials", "2")
    assert code == 0, result
    kept = {r["id"] for r in Workspace(ws).list() if r["kind"] != "baseline"}
    stopped = [t for t in result["trials"] if t["error"] == "stopped before the trial finished"]
    assert stopped and all(t["state"] == "FAIL" for t in stopped)
    complete = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    assert len(complete) == 2 and {t["variant"] for t in complete} == kept  # stopped trials saved nothing
    assert len(result["trials"]) == len(stopped) + 2
