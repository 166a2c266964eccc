"""One timing at a time across processes: a file lock held around a run's latency and memory measurement.

Several runs may share a machine (the trials of `model-studio search --parallel N`, each in its own worker
process). Their exports and quality passes may overlap, but two timings must not: each would measure the
other's load. A run whose environment names a lock file (`MODEL_STUDIO_TIMING_LOCK`, which the search sets
for its workers) takes an exclusive `flock` on it for the whole timed section. The kernel drops a flock
when its holder dies, so a crashed or killed worker never leaves the lock taken.

The section's wall-clock window (`start`, `end`, seconds since the epoch, taken while the lock is held) is
recorded in the variant's metrics, so anyone can check afterwards that no two timings overlapped.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_ENV = "MODEL_STUDIO_TIMING_LOCK"  # path of the lock file; unset: the run times without a lock
LOCK_FOLDER = "locks"
LOCK_NAME = "timing.lock"


def workspace_lock(root: Path) -> Path:
    """The timing lock of a workspace: `<workspace>/locks/timing.lock`."""
    return Path(root) / LOCK_FOLDER / LOCK_NAME


def lock_from_env() -> Path | None:
    value = os.environ.get(LOCK_ENV)
    return Path(value) if value else None


@contextlib.contextmanager
def hold(path: Path | None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (made with its folder if missing); no lock when `path` is None or
    the platform has no flock (Windows: runs there time one at a time anyway, the search is serial)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None  # type: ignore[assignment]
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until no other run is timing
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def timing_window(path: Path | None = None) -> Iterator[dict[str, float]]:
    """Hold the timing lock (`path`, else the one the environment names) and yield a dict that gets the
    window's `start` at once and its `end` when the section ends, both read while the lock is held."""
    window: dict[str, float] = {}
    with hold(path if path is not None else lock_from_env()):
        window["start"] = time.time()
        try:
            yield window
        finally:
            window["end"] = time.time()
