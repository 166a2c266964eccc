"""The worker process and the CLI's client of it: techniques run here, never in the GUI's or the CLI's own
process.

`python -m studio.worker` reads one job (studio/jobs.py: a recipe to run, or a generate job,
studio/generate_job.py) from stdin and writes one event per line to
stdout. Anything a library prints goes to stderr: the worker keeps a private copy of stdout for events
and points file descriptor 1 at stderr before importing torch.

`WorkerClient` starts that process and yields typed events. Cancel terminates it (SIGTERM, then SIGKILL
after a grace period) and removes the job's work folder; a worker that dies without a `done` or `error`
event (segfault, killed, out of memory) becomes an `error` event of kind "crash" with its exit status.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from studio.events import Done, Error, Event, EventDecoder, to_json
from studio.jobs import CANCEL_GRACE_S, Job, JobEnd, StderrTail, signal_group, worker_command

# ------------------------------------------------------------------------------------------------ worker side


def _event_stream() -> IO[str]:
    """A private stdout for events; fd 1 then points at stderr so library prints cannot corrupt the stream."""
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def run_job(data: dict[str, Any], out: IO[str]) -> int:
    from studio.errors import StudioError, disk_full_error
    from studio.generate_job import is_generate, run_generate
    from studio.pipeline import parse_recipe, plan, run_plan
    from studio.variants import Workspace

    lock = threading.Lock()

    def sink(event: Event) -> None:
        with lock:
            out.write(to_json(event) + "\n")
            out.flush()

    job = Job.from_dict(data)
    try:
        if is_generate(data):
            result = run_generate(data, job.workspace, job.trust, sink)
        else:
            recipe = parse_recipe(job.recipe, job.recipe_path)
            workspace = Workspace(job.workspace)
            planned = plan(recipe, path=job.recipe_path, trust=job.trust)
            result = run_plan(planned, workspace, sink, job_id=job.job_id)
        sink(Done(result))
        return 0
    except StudioError as exc:
        sink(Error(exc.kind, exc.message, exc.step))
        return exc.exit_code
    except Exception as exc:  # a full disk, or a bug: reported, never a silent death
        full = disk_full_error(exc, "the run's files")
        if full is not None:
            sink(Error(full.kind, full.message, getattr(exc, "step", None)))
            return full.exit_code
        sink(Error("internal", f"{type(exc).__name__}: {exc}", None, traceback.format_exc()))
        return 1


def main() -> int:
    from studio.errors import BadInput

    out = _event_stream()  # SIGTERM keeps its default action: cancel stops the process at once
    try:
        job = json.loads(sys.stdin.read())
    except json.JSONDecodeError as exc:
        out.write(to_json(Error(BadInput.kind, f"the job is not JSON: {exc}")) + "\n")
        return BadInput.exit_code
    return run_job(job, out)


# ------------------------------------------------------------------------------------------------ client side


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
        self.spec = Job(
            recipe, Path(workspace), recipe_path=recipe_path, trust=trust, extra=dict(extra or {})
        )
        self.job_id = self.spec.job_id
        self.workspace = Path(workspace)
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.cancelled = False
        self._stderr = StderrTail()
        self._cleaned = False
        self.started_at = 0.0

    @property
    def job(self) -> dict[str, Any]:
        """The job object the worker reads."""
        return self.spec.to_dict()

    def start(self) -> None:
        self.started_at = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            worker_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group: cancel reaches any children too
        )
        assert self.process.stdin is not None
        self.process.stdin.write(self.spec.payload())
        self.process.stdin.close()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.feed(line)
        self._stderr.close()

    @property
    def stderr_tail(self) -> str:
        return self._stderr.text

    def events(self) -> Iterator[Event]:
        """Every event until the worker ends; a worker that ends without `done`/`error` yields a crash error."""
        if self.process is None:
            self.start()
        assert self.process is not None and self.process.stdout is not None
        decoder = EventDecoder()
        for line in self.process.stdout:
            yield from self._events_only(decoder.feed(line))
        yield from self._events_only(decoder.close())
        self.returncode = self.process.wait()
        end = self._end(decoder.outcome)
        if self.cancelled:
            yield Error("cancelled", "the run was cancelled; nothing was saved")
        elif decoder.outcome is None:
            yield Error("crash", end.reason, None, self.stderr_tail)

    @staticmethod
    def _events_only(decoded: list[Event | str]) -> Iterator[Event]:
        # a line that is not an event (a library writing to the real stdout) is ignored, never a crash
        yield from (item for item in decoded if not isinstance(item, str))

    def cancel(self) -> None:
        """Stop the worker (within about a second) and remove its work folder."""
        self.cancelled = True
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        self.returncode = proc.returncode
        self._end(None)

    def _end(self, outcome: Done | Error | None) -> JobEnd:
        assert self.returncode is not None
        end = JobEnd(self.spec, self.returncode, outcome, self.cancelled, tuple(self._stderr.lines))
        if not self._cleaned:
            end.clean_up()
            self._cleaned = True
        return end


if __name__ == "__main__":
    sys.exit(main())
