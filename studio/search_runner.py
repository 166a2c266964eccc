"""Running a search's trials: each a normal run in its own worker process, up to N at a time on this machine.

A trial is the job `model-studio run` would send (studio/jobs.py), so a trial that crashes or exhausts
memory cannot take the search down. Trials run in threads of this process, each thread waiting on its
worker; the Optuna study itself is only touched by the search's own thread (studio/search.py), so its
SQLite storage has one writer.

Trials may overlap, their timings may not: every worker is started with `MODEL_STUDIO_TIMING_LOCK` naming
the workspace's lock file (studio/evaluation/timing_lock.py), and a run holds it while it times.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from studio.cpus import usable_cores
from studio.errors import DiskFull
from studio.evaluation.timing_lock import LOCK_ENV, workspace_lock

Outcome = tuple[dict[str, Any] | None, str | None]  # (the saved variant's row, None) or (None, the error)


def default_parallel(cpus: int | None = None) -> int:
    """Two trials at a time from 4 cores up (one can export or quantize while the other times), else one:
    on fewer cores a second trial's work would slow the first one's timing more than it saves."""
    n = usable_cores() if cpus is None else cpus
    return 2 if n >= 4 else 1


@contextlib.contextmanager
def timing_lock_env(path: Path) -> Iterator[None]:
    """Name the timing lock in this process's environment, which the workers it starts inherit; put back
    what was there after."""
    before = os.environ.get(LOCK_ENV)
    os.environ[LOCK_ENV] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = before


class TrialRunner:
    """Runs one concrete recipe (as JSON data) in a worker and returns its Outcome; safe to call from
    several threads at once. `cancel_all` stops every worker still running (their folders removed)."""

    def __init__(self, workspace_root: str | Path, recipe_path: str | None, trust: bool) -> None:
        self.root = Path(workspace_root)
        self.recipe_path = recipe_path
        self.trust = trust
        self._clients: set[Any] = set()
        self._lock = threading.Lock()
        self._cancelled = False

    def __call__(self, concrete: dict[str, Any]) -> Outcome:
        from studio.events import Done, Error
        from studio.worker import WorkerClient

        client = WorkerClient(concrete, self.root, recipe_path=self.recipe_path, trust=self.trust)
        with self._lock:
            if self._cancelled:
                return None, "cancelled: the search was stopped"
            self._clients.add(client)
            client.start()
        result = error = None
        try:
            for event in client.events():
                if isinstance(event, Done):
                    result = event.result
                elif isinstance(event, Error):
                    error = event
        except KeyboardInterrupt:  # a search in this thread (or a Ray task cancelled) was stopped
            client.cancel()  # no half variant: the worker's folder goes with it
            raise
        finally:
            with self._lock:
                self._clients.discard(client)
        if error is not None:
            if error.kind == "disk-full":
                raise DiskFull(error.message)
            where = f"step {error.step + 1}: " if error.step is not None and error.step >= 0 else ""
            return None, f"{error.kind}: {where}{error.message}"
        assert result is not None
        return result["variants"][0], None

    def cancel_all(self) -> None:
        with self._lock:
            self._cancelled = True
            clients = list(self._clients)
        for client in clients:
            client.cancel()


class Trials(Protocol):
    """Where trials run: this machine's threads (LocalTrials) or a Ray cluster (studio/search_ray.py)."""

    slots: int  # trials in flight at most

    def submit(self, concrete: dict[str, Any]) -> Future[Outcome]: ...

    def cancel_all(self) -> None: ...

    def close(self) -> None: ...


class LocalTrials:
    """Up to `parallel` trials at a time, each a worker process on this machine, timings one at a time."""

    def __init__(self, runner: TrialRunner, parallel: int) -> None:
        self.runner = runner
        self.slots = parallel
        self.lock = workspace_lock(runner.root)
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="trial")
        self._env = timing_lock_env(self.lock)
        self._env.__enter__()

    def submit(self, concrete: dict[str, Any]) -> Future[Outcome]:
        return self._pool.submit(self.runner, concrete)

    def cancel_all(self) -> None:
        self.runner.cancel_all()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._env.__exit__(None, None, None)
