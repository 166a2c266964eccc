"""Workspace reliability: killed workers, concurrent runs, files deleted by hand."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time

import pytest

from studio.errors import BadInput
from studio.events import Done
from studio.variants import Workspace, sha256_file
from studio.worker import WorkerClient

QUICK = {
    "version": 1,
    "model": "builtin:minilm",
    "data": {"evaluation_examples": 4, "calibration_examples": 4},
    "steps": [],
    "evaluate": {"latency": False, "sequence_length": 16},
}


def assert_consistent(root) -> Workspace:
    ws = Workspace(root)  # opening repairs: removes dead jobs' folders, re-indexes complete variants
    rows = {r["id"]: r for r in ws.list() if r["kind"] != "baseline"}
    for vid, row in rows.items():
        folder = root / "variants" / vid
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["files"], vid
        for rel, digest in manifest["files"].items():
            assert sha256_file(folder / rel) == digest, (vid, rel)
        assert not row["missing"]
    assert {p.name for p in (root / "variants").iterdir()} == set(rows)
    assert not list((root / "tmp").iterdir())
    return ws


def _start_pair(root) -> list[WorkerClient]:
    clients = [WorkerClient(QUICK, root) for _ in range(2)]
    for c in clients:
        c.start()
    return clients


def test_two_runs_at_once_lose_nothing_and_sigkill_at_random_points_never_corrupts_the_workspace(tmp_path):
    """Two jobs at a time on one workspace, first to the end, then killed: ten kills at random points along
    a run (commit included), two at a time, the workspace checked after each pair."""
    rng = random.Random(1234)
    # Two complete runs at once first: nothing lost, and how long a pair of jobs takes here, so kills land
    # all along it.
    t0 = time.perf_counter()
    results = [list(c.events())[-1] for c in _start_pair(tmp_path)]
    duration = time.perf_counter() - t0
    assert all(isinstance(r, Done) for r in results), results
    ids = {r.result["variants"][0]["id"] for r in results}
    ws = assert_consistent(tmp_path)
    assert ids <= {r["id"] for r in ws.list()}
    assert len(ids) == 2
    survivors = 2
    for _ in range(5):  # five pairs: ten kills
        clients = _start_pair(tmp_path)
        started = time.perf_counter()
        for at, client in sorted(
            ((rng.uniform(0.0, duration * 1.1), c) for c in clients), key=lambda x: x[0]
        ):
            time.sleep(max(0.0, at - (time.perf_counter() - started)))
            if client.process.poll() is None:
                os.killpg(client.process.pid, signal.SIGKILL)
            else:
                survivors += 1
        for client in clients:
            client.process.wait()
        ws = assert_consistent(tmp_path)
    assert len([r for r in ws.list() if r["kind"] != "baseline"]) >= survivors


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple:
    """(workspace root, variant id) of one complete QUICK run; each test changes its own copy."""
    root = tmp_path_factory.mktemp("quick-run")
    events = list(WorkerClient(QUICK, root).events())
    assert isinstance(events[-1], Done), events[-1]
    return root, events[-1].result["variants"][0]["id"]


def _copy_of(quick_run, tmp_path) -> str:
    shutil.copytree(quick_run[0], tmp_path, dirs_exist_ok=True)
    return quick_run[1]


def test_repair_reindexes_complete_and_keeps_what_is_not_a_variant(quick_run, tmp_path):
    vid = _copy_of(quick_run, tmp_path)
    # A crash after the rename but before the row: the folder is complete, so it is indexed again.
    ws = Workspace(tmp_path)
    with ws._connect() as db:
        db.execute("DELETE FROM variants WHERE id = ?", (vid,))
    # A folder without a studio manifest (half-copied by hand): not the studio's, so kept and reported.
    broken = tmp_path / "variants" / "20990101-000000-abcdef"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    ws = Workspace(tmp_path)
    assert ws.report.reindexed == [vid]
    assert ws.report.foreign == [f"variants/{broken.name}"]
    assert (broken / "model.safetensors").read_bytes() == b"partial"
    assert ws.get(vid)["kind"] == "torch"


def test_files_deleted_by_hand_are_reported(quick_run, tmp_path, capsys):
    from studio.cli import main

    vid = _copy_of(quick_run, tmp_path)
    shutil.rmtree(tmp_path / "variants" / vid)
    ws = Workspace(tmp_path)
    assert ws.get(vid)["missing"]
    assert main(["variants", "--workspace", str(tmp_path)]) == 0
    assert "FILES MISSING" in capsys.readouterr().out
    assert (
        main(["export", vid, "--format", "hf", "--out", str(tmp_path / "out"), "--workspace", str(tmp_path)])
        == 2
    )
    assert "files are gone" in capsys.readouterr().err
    assert main(["variants", "rm", vid, "--workspace", str(tmp_path)]) == 0
    with pytest.raises(BadInput, match="no variant"):
        Workspace(tmp_path).get(vid)


def test_a_moved_workspace_keeps_its_variants(minilm_variants, tmp_path):
    """Users move workspaces between disks: artifact paths must not point into the old place. The session's
    MiniLM workspace (tests/conftest.py, with an ONNX variant) copied, then the copy moved."""
    from studio.compare import compare

    source, ids, _result = minilm_variants
    old = tmp_path / "old"
    shutil.copytree(source, old)
    vid = ids["onnx"]
    new = tmp_path / "new"
    shutil.move(old, new)
    ws = assert_consistent(new)
    row = ws.get(vid)
    assert row["artifact"] == str(new / "variants" / vid / "model.onnx")
    assert compare(ws, vid, vid, examples=2)["disagreements"]
