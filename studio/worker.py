"""The worker process and its client: techniques run here, never in the GUI's or the CLI's own process.

`python -m studio.worker` reads one job (JSON: recipe + workspace) from stdin and writes one event per line
to stdout. Anything a library prints goes to stderr: the worker keeps a private copy of stdout for events
and points file descriptor 1 at stderr before importing torch.

`WorkerClient` starts that process and yields typed events. Cancel terminates it (SIGTERM, then SIGKILL
after a grace period) and removes the job's work folder; a worker that dies without a `done` or `error`
event (segfault, killed, out of memory) becomes an `error` event of kind "crash" with its exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from studio.events import Done, Error, Event, from_json, to_json

CANCEL_GRACE_S = 1.0
FROZEN_WORKER_ARG = "__worker__"  # a PyInstaller bundle has no `-m`: its executable takes this first argument


def worker_command() -> list[str]:
    """The command line that starts a worker: `python -m studio.worker`, or the bundle's own executable."""
    if getattr(sys, "frozen", False):
        return [sys.executable, FROZEN_WORKER_ARG]
    return [sys.executable, "-m", "studio.worker"]


# ------------------------------------------------------------------------------------------------ worker side


def _event_stream() -> IO[str]:
    """A private stdout for events; fd 1 then points at stderr so library prints cannot corrupt the stream."""
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def run_job(job: dict[str, Any], out: IO[str]) -> int:
    from studio.errors import BadInput, DiskFull, StudioError, Unavailable, disk_full_error
    from studio.pipeline import parse_recipe, plan, run_plan
    from studio.variants import Workspace

    lock = threading.Lock()

    def sink(event: Event) -> None:
        with lock:
            out.write(to_json(event) + "\n")
            out.flush()

    try:
        if "crash_for_test" in job:  # lets the tests prove crash handling with a real signal
            os.kill(os.getpid(), getattr(signal, job["crash_for_test"]))
        recipe = parse_recipe(job.get("recipe"), job.get("recipe_path"))
        workspace = Workspace(job.get("workspace"))
        planned = plan(recipe, path=job.get("recipe_path"), trust=job.get("trust") is True)
        result = run_plan(planned, workspace, sink, job_id=job.get("job_id"))
        sink(Done(result))
        return 0
    except StudioError as exc:
        kinds = {BadInput: "bad-input", Unavailable: "unavailable", DiskFull: "disk-full"}
        kind = next((k for cls, k in kinds.items() if isinstance(exc, cls)), "error")
        sink(Error(kind, exc.message, getattr(exc, "step", None)))
        return exc.exit_code
    except Exception as exc:  # a full disk, or a bug: reported, never a silent death
        full = disk_full_error(exc, "the run's files")
        if full is not None:
            sink(Error("disk-full", full.message, getattr(exc, "step", None)))
            return full.exit_code
        sink(Error("internal", f"{type(exc).__name__}: {exc}", None, traceback.format_exc()))
        return 1


def main() -> int:
    out = _event_stream()  # SIGTERM keeps its default action: cancel stops the process at once
    try:
        job = json.loads(sys.stdin.read())
    except json.JSONDecodeError as exc:
        out.write(to_json(Error("bad-input", f"the job is not JSON: {exc}")) + "\n")
        return 2
    return run_job(job, out)


# ------------------------------------------------------------------------------------------------ client side


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {
            "SIGKILL": " (killed: out of memory or by another process)",
            "SIGSEGV": " (segmentation fault)",
        }
        return f"the worker died from {name}{hint.get(name, '')}"
    return f"the worker exited with status {code} without finishing"


class WorkerClient:
    """Runs one job in a worker process and yields its events."""

    def __init__(
        self,
        recipe: dict[str, Any],
        workspace: str | Path,
        *,
        recipe_path: str | None = None,
        trust: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.job_id = uuid.uuid4().hex[:12]
        self.workspace = Path(workspace)
        self.job = {
            "recipe": recipe,
            "workspace": str(workspace),
            "job_id": self.job_id,
            "recipe_path": recipe_path,
            **(extra or {}),
            "trust": trust,  # the person's --trust; the recipe's own field is never honoured
        }
        self.process: subprocess.Popen[str] | None = None
        self.returncode: int | None = None
        self.cancelled = False
        self._stderr: deque[str] = deque(maxlen=40)
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            worker_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: cancel reaches any children too
        )
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(self.job))
        self.process.stdin.close()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line.rstrip())

    @property
    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def events(self) -> Iterator[Event]:
        """Every event until the worker ends; a worker that ends without `done`/`error` yields a crash error."""
        if self.process is None:
            self.start()
        assert self.process is not None and self.process.stdout is not None
        finished = False
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = from_json(line)
            except (ValueError, KeyError, json.JSONDecodeError):
                continue  # not an event: ignore rather than crash the viewer
            finished = finished or isinstance(event, (Done, Error))
            yield event
        self.returncode = self.process.wait()
        self._cleanup_if_needed()
        if self.cancelled:
            yield Error("cancelled", "the run was cancelled; nothing was saved")
        elif not finished:
            yield Error("crash", describe_exit(self.returncode), None, self.stderr_tail)

    def cancel(self) -> None:
        """Stop the worker (within about a second) and remove its work folder."""
        self.cancelled = True
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._cleanup_if_needed()

    def _cleanup_if_needed(self) -> None:
        if self.returncode is None and self.process is not None:
            self.returncode = self.process.poll()
        if self.returncode not in (0, None):
            import shutil

            shutil.rmtree(self.workspace / "tmp" / self.job_id, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
