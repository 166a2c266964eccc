"""`model-studio search --ray`: an address nothing answers at, and a real search on a private local Ray.

The local Ray is small (the cores this process may use, one under the suite's per-worker pinning; a 100 MB
object store; no dashboard) and shut down when the search ends; the trials are real worker runs on a tiny
BERT classifier with a tiny evaluation.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from studio.cli import main
from studio.cpus import usable_cores
from studio.search_ray import node_lock
from studio.variants import Workspace

ray = pytest.importorskip("ray")


def _recipe(model: str | Path, tmp_path: Path, trials: int = 2) -> Path:
    data = {
        "model": str(model),
        "data": {"calibration_examples": 4, "evaluation_examples": 4},
        "steps": [
            {"technique": "export.onnx", "params": {"verify": False}},
            {"technique": "onnx.quantize_dynamic"},
        ],
        "evaluate": {"batch_sizes": [1], "sequence_length": 16},
        "search": {
            "objectives": ["latency_ms.b1.p50", "size_mb"],
            "trials": trials,
            "seed": 1,
            "space": {2: {"per_channel": [True, False]}},
        },
    }
    path = tmp_path / "ray-search.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _closed_port() -> int:
    with socket.socket() as s:  # a port just freed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_nothing_answers_at_is_unavailable(tmp_path, capsys):
    path = _recipe("builtin:minilm", tmp_path)
    address = f"127.0.0.1:{_closed_port()}"
    assert main(["search", str(path), "--ray", address, "--workspace", str(tmp_path / "ws")]) == 3
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at {address}" in err and "ray start --head" in err
    assert not ray.is_initialized()


def test_a_bad_address_is_bad_input(tmp_path, capsys):
    path = _recipe("builtin:minilm", tmp_path)
    assert main(["search", str(path), "--ray", "head:port", "--workspace", str(tmp_path / "ws")]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_a_search_on_a_local_ray_lands_in_the_workspace(bert_classifier, tmp_path, capsys):
    path = _recipe(bert_classifier, tmp_path)
    ws = tmp_path / "ws"
    capsys.readouterr()
    code = main(
        ["search", str(path), "--workspace", str(ws), "--ray", "local", "--ray-cpus-per-trial", "1", "--json"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert not ray.is_initialized()  # the search shut its private Ray down
    slots = usable_cores()  # the private Ray gets this process's cores, one per trial
    if slots > 1:  # with one slot the search says nothing about parallel trials
        assert f"up to {slots} trials at a time on the Ray cluster at local" in captured.err
    else:
        assert "trials at a time" not in captured.err
    assert [t["state"] for t in result["trials"]] == ["COMPLETE", "COMPLETE"], result["trials"]
    variants = {r["id"]: r for r in Workspace(ws).list()}
    assert {t["variant"] for t in result["trials"]} <= set(variants)
    assert result["best"] in variants and Path(result["recipe"]).is_file()
    windows = sorted((t["timing_window"] for t in result["trials"]), key=lambda w: w["start"])
    assert windows[0]["end"] <= windows[1]["start"], windows  # one node: its lock kept the timings apart
    assert node_lock().is_file()


def test_a_failed_ray_task_is_a_failed_trial_but_a_full_disk_stops_the_search():
    from concurrent.futures import Future

    from studio.errors import DiskFull
    from studio.search_ray import as_trial_outcome

    def settled(value=None, exc=None):
        task: Future = Future()
        out = as_trial_outcome(task)
        task.set_exception(exc) if exc is not None else task.set_result(value)
        return out

    assert settled(({"id": "v1"}, None)).result() == ({"id": "v1"}, None)
    variant, error = settled(exc=RuntimeError("node 10.0.0.7 died")).result()
    assert (
        variant is None and error.startswith("crash: the Ray task failed") and "node 10.0.0.7 died" in error
    )
    with pytest.raises(DiskFull):
        settled(exc=DiskFull("no space left")).result()
