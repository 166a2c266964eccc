"""Hostile data files and recipes, as a user's shell meets them, and processes that must not linger.

Every class of bad input is built here, in the test, and run through the real CLI
(`python -m studio ...`): the answer is exit code 2 and exactly one line on stderr, no traceback, no hang.
The process tests start real workers and probes and kill them the way the GUI and the system do.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 300  # only a guard against a hang: a hostile input must never block the CLI


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "MODEL_STUDIO_HOME": str(tmp_path / "home"),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def run_cli(tmp_path: Path, *args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`model-studio ARGS` as a shell runs it. On a hang, the CLI and everything it started (a worker
    lives in its own session) are killed before the test fails, so a failing test leaves nothing behind."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "studio", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path, **env),
        cwd=tmp_path,
    )
    try:
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        proc.kill()
        proc.communicate()
        pytest.fail(f"model-studio {' '.join(map(str, args))} did not finish in {CLI_TIMEOUT_S}s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def refused(tmp_path: Path, *args: str | Path, mentions: str | Path) -> str:
    """Run `model-studio ARGS`; assert exit code 2 with one error line naming `mentions`; return that line."""
    proc = run_cli(tmp_path, *args)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("model-studio: error: ") and str(mentions) in lines[0], lines[0]
    return lines[0]


def data_refused(tmp_path: Path, data: Path | str, mentions: str | Path | None = None) -> str:
    """`--data` of `sensitivity` (the verb opens the model without reading weights, then the data)."""
    return refused(tmp_path, "sensitivity", "builtin:minilm", "--data", data, mentions=mentions or data)


def recipe_refused(tmp_path: Path, recipe: Path | str) -> str:
    return refused(tmp_path, "run", recipe, "--dry-run", mentions=recipe)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_fifo_and_device_are_refused_without_opening_them(tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)  # torch.load on it would block for good
    assert "FIFO" in refused(tmp_path, "inspect", fifo, mentions=fifo)
    assert "character device" in refused(tmp_path, "inspect", "/dev/zero", mentions="/dev/zero")


# ------------------------------------------------------------------------------------------------ data files


def test_data_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "examples.txt"
    os.mkfifo(fifo)  # nobody ever writes: opening it for reading would block for good
    assert "FIFO" in data_refused(tmp_path, fifo)


def test_data_device_is_refused(tmp_path):
    assert "character device" in data_refused(tmp_path, "/dev/zero")  # endless: read_text would never end


def test_data_folder_is_refused(tmp_path):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    assert "folder" in data_refused(tmp_path, folder)


def test_csv_field_over_the_csv_limit_is_refused(tmp_path):
    data = tmp_path / "big-field.csv"
    data.write_text("text,label\n" + "x" * (csv.field_size_limit() + 1) + ",1\n")
    assert "field larger than field limit" in data_refused(tmp_path, data)


def test_jsonl_nested_thousands_deep_is_refused(tmp_path):
    data = tmp_path / "deep.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "deep", "extra": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    assert "line 2" in data_refused(tmp_path, data)


def test_jsonl_numbers_python_refuses_are_refused(tmp_path):
    huge = tmp_path / "huge-label.jsonl"
    huge.write_text('{"text": "a", "label": 1' + "0" * 5000 + "}\n")  # over int's 4300-digit limit
    assert "line 1" in data_refused(tmp_path, huge)
    infinite = tmp_path / "infinite-label.jsonl"
    infinite.write_text('{"text": "a", "label": Infinity}\n')  # json accepts it, int() overflows
    assert "not an integer class id" in data_refused(tmp_path, infinite)


def test_a_line_larger_than_the_limit_is_refused_without_reading_the_file(tmp_path):
    from studio.evaluation.data import MAX_LINE_BYTES

    data = tmp_path / "one-line.txt"
    with data.open("wb") as fh:
        fh.truncate(MAX_LINE_BYTES * 64)  # a sparse 1 GB file of NUL bytes without a newline
    assert "longer than" in data_refused(tmp_path, data)


def test_recipe_data_that_is_a_fifo_is_refused_by_the_run(tmp_path, bert_classifier):
    """Recipe data is read by the worker: its refusal still reaches the user as one line and exit 2."""
    fifo = tmp_path / "calibration.jsonl"
    os.mkfifo(fifo)
    recipe = tmp_path / "fifo-data.yaml"
    recipe.write_text(f"version: 1\nmodel: {bert_classifier}\ndata:\n  calibration: {fifo}\n")
    line = refused(tmp_path, "run", recipe, "--workspace", tmp_path / "ws", mentions=fifo)
    assert "FIFO" in line


# ------------------------------------------------------------------------------------------------ recipes


def test_recipe_nested_thousands_deep_is_refused(tmp_path):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("version: 1\nsteps: " + "[" * 20_000 + "]" * 20_000 + "\n")  # PyYAML recursion
    assert "nested too deeply" in recipe_refused(tmp_path, recipe)


def test_recipe_nested_deeper_than_a_recipe_goes_is_refused(tmp_path):
    """Shallow enough for PyYAML, far deeper than a recipe goes (pydantic, model_dump and json recurse per
    level later on: a limit here keeps them from ever meeting a depth they cannot handle)."""
    recipe = tmp_path / "deep-params.yaml"
    recipe.write_text(
        "version: 1\nsteps:\n- technique: prune.heads\n  params: {a: " + "[" * 200 + "]" * 200 + "}\n"
    )
    assert "levels deep" in recipe_refused(tmp_path, recipe)


def test_recipe_alias_bomb_is_refused(tmp_path):
    """Nine levels of nine aliases each: 387 million values once expanded (pydantic and json expand them)."""
    lines = ["version: 1", "l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    lines += ["steps:", "- technique: prune.heads", "  params: {heads: *l9}"]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    assert "values" in recipe_refused(tmp_path, recipe)


def test_recipe_that_refers_to_itself_is_refused(tmp_path):
    recipe = tmp_path / "loop.yaml"
    recipe.write_text("version: 1\nsteps: &s [*s]\n")  # YAML builds a list that contains itself
    assert "levels deep" in recipe_refused(tmp_path, recipe)


def test_recipe_values_python_refuses_are_refused(tmp_path):
    huge = tmp_path / "huge.yaml"
    huge.write_text("version: 1" + "0" * 5000 + "\n")
    assert "cannot be read" in recipe_refused(tmp_path, huge)
    date = tmp_path / "date.yaml"
    date.write_text("version: 1\nmodel: 2020-13-45\n")  # matches YAML's timestamp pattern, no such month
    assert "cannot be read" in recipe_refused(tmp_path, date)


def test_recipe_fifo_device_and_folder_are_refused(tmp_path):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    assert "FIFO" in recipe_refused(tmp_path, fifo)
    assert "character device" in recipe_refused(tmp_path, "/dev/zero")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert "folder" in recipe_refused(tmp_path, folder)


def test_recipe_larger_than_the_limit_is_refused(tmp_path):
    from studio.pipeline import RECIPE_MAX_BYTES

    recipe = tmp_path / "huge.yaml"
    with recipe.open("wb") as fh:
        fh.truncate(RECIPE_MAX_BYTES + 1)
    assert "larger than" in recipe_refused(tmp_path, recipe)


# ------------------------------------------------------------------------------------------------ processes


def _until(condition, what: str, guard_s: float = 300.0):
    """Poll `condition` until it returns something truthy. The guard only stops a hang; the outcome never
    depends on how fast anything is."""
    deadline = time.monotonic() + guard_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"gave up waiting for {what}")


def _gone(proc) -> bool:
    import psutil

    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # dead, waiting for whoever adopted it to reap it
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_probe_child_dies_with_its_worker(tmp_path, bert_classifier):
    """A real worker reaches its memory probe; the probe is frozen (SIGSTOP: it can no longer finish or
    notice anything by itself), then the worker alone gets SIGTERM, as a cancel that misses the process
    group would send. Only the kernel can end the frozen probe now: it must be gone, not left stopped."""
    import psutil

    from studio.worker import WorkerClient

    recipe = {
        "version": 1,
        "model": str(bert_classifier),
        "data": {"calibration_examples": 2, "evaluation_examples": 2},
        "evaluate": {"batch_sizes": [1], "sequence_length": 8, "threads": 1},
    }
    client = WorkerClient(recipe, tmp_path / "ws")
    client.start()
    worker = client.process
    assert worker is not None
    probe = None
    try:

        def find_probe():
            assert worker.poll() is None, f"the worker ended before its probe ran:\n{client.stderr_tail}"
            for child in psutil.Process(worker.pid).children(recursive=True):
                try:
                    if "studio.evaluation.memprobe" in " ".join(child.cmdline()):
                        return child
                except psutil.NoSuchProcess:
                    continue
            return None

        probe = _until(find_probe, "the worker to start its memory probe")
        # Its second thread is the lifeline watcher, started after the death signal was asked for.
        _until(lambda: probe.num_threads() >= 2, "the probe to set itself up")
        probe.suspend()
        os.kill(worker.pid, signal.SIGTERM)
        worker.wait()
        _until(lambda: _gone(probe), "the probe to die with its worker", guard_s=60)
    finally:
        if probe is not None and not _gone(probe):
            probe.kill()
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_the_probe_lifeline_ends_a_probe_whose_parent_died(tmp_path):
    """The portable half (no death signal involved): a parent holds the lifeline pipe and is SIGKILLed;
    its child, which would otherwise sleep for an hour, must exit on the pipe's end of file."""
    import psutil

    child_py = tmp_path / "child.py"
    child_py.write_text(
        "import sys, time\n"
        "from studio.evaluation.memprobe import watch_lifeline\n"
        "watch_lifeline(int(sys.argv[1]))\n"
        "print('watching', flush=True)\n"
        "time.sleep(3600)\n"
    )
    parent_py = tmp_path / "parent.py"  # if the child dies before it watches, the parent says so instead
    parent_py.write_text(
        "import os, subprocess, sys, time\n"
        "r, w = os.pipe()\n"
        f"child = subprocess.Popen([sys.executable, {str(child_py)!r}, str(r)], pass_fds=(r,))\n"
        "os.close(r)\n"
        "print(child.pid, flush=True)\n"
        "print('the child exited with', child.wait(), flush=True)\n"
        "time.sleep(3600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, str(parent_py)], stdout=subprocess.PIPE, text=True, env=_env(tmp_path)
    )
    child = None
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        assert parent.stdout.readline().strip() == "watching"
        parent.kill()
        parent.wait()
        _until(lambda: _gone(child), "the child to notice its parent is gone", guard_s=60)
    finally:
        if child is not None and not _gone(child):
            child.kill()
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_smoke_start_on_a_pickled_module_does_not_wait_for_the_trust_question(tmp_path):
    """The smoke start (CI, packaging) runs unattended: the trust dialog would block it forever."""
    import torch

    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(3, 2), whole)  # a pickled module: opening it asks whether to trust it
    proc = run_cli(
        tmp_path,
        "--open",
        whole,
        MODEL_STUDIO_SMOKE_TEST="1",
        QT_QPA_PLATFORM="offscreen",
        XDG_CONFIG_HOME=str(tmp_path / "config"),
    )
    assert "model open: False" in proc.stdout, (proc.stdout, proc.stderr)
    assert proc.returncode == 1


def test_builtin_python_docs_is_tinylm_training_text_without_the_held_out_modules():
    import importlib
    import inspect

    from studio.checkpoints import builtin_tinylm_path
    from studio.evaluation.data import load_examples

    examples = load_examples("builtin:python-docs")
    assert len(examples) == 2000 and all(e.text.strip() for e in examples)
    assert len({e.text for e in examples}) == len(examples)
    record = json.loads((builtin_tinylm_path() / "training.json").read_text())
    held = [inspect.getdoc(importlib.import_module(m)) or "" for m in record["held_out_modules"]]
    paragraphs = {p.strip() for d in held for p in d.split("\n\n") if len(p.strip()) >= 60}
    assert paragraphs  # the bench's held-out perplexity text: never in the recovery data
    assert not any(p in e.text for e in examples for p in paragraphs)
