"""Errors a user can act on.

Every problem with user input (a path, a checkpoint, a recipe, a data file) is raised as a `BadInput`
naming the file and the problem. The CLI prints it in one line and exits with code 2; the GUI shows it
in the window. Anything else is a bug and keeps its traceback.

Each class carries its `kind` (the name an `error` event of the worker protocol gives it) and its
`exit_code`; `exit_code_for` turns a kind that came back from a worker into the same exit code, so the
table lives here alone.
"""

from __future__ import annotations

from pathlib import Path


class StudioError(Exception):
    """Base class of errors the studio reports to users without a traceback."""

    kind = "error"
    exit_code = 1
    # The pipeline step (index) that raised it, set by the pipeline so the worker's error event names it.
    step: int | None = None

    def __init__(self, problem: str, *, path: str | Path | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem


class BadInput(StudioError):
    """The user gave something the studio cannot use (exit code 2)."""

    kind = "bad-input"
    exit_code = 2


class Unavailable(StudioError):
    """A feature cannot run on this machine (no GPU, library missing); the reason says why."""

    kind = "unavailable"
    exit_code = 3


class Cancelled(StudioError):
    """The user cancelled the work."""

    kind = "cancelled"
    exit_code = 130


class DiskFull(StudioError):
    """The disk (or quota) filled up while writing; nothing half-written is kept."""

    kind = "disk-full"
    exit_code = 4


ERROR_CLASSES = (StudioError, BadInput, Unavailable, Cancelled, DiskFull)
INTERNAL_EXIT_CODE = 1  # a bug, a crash, or an error kind no class names


def exit_code_for(kind: str) -> int:
    """The exit status for an error event's kind ("bad-input" -> 2, ...); crashes and bugs give 1."""
    return next((cls.exit_code for cls in ERROR_CLASSES if cls.kind == kind), INTERNAL_EXIT_CODE)


DISK_FULL_ERRNOS = (28, 122, 27)  # ENOSPC, EDQUOT, EFBIG


def disk_full_error(exc: BaseException, what: str) -> DiskFull | None:
    """A DiskFull naming the file when `exc` means the disk is full, else None. Libraries with their own
    writers (safetensors, onnx, protobuf) wrap ENOSPC in their own exceptions: their text tells."""
    errno = getattr(exc, "errno", None)
    text = str(exc)
    if errno not in DISK_FULL_ERRNOS and "No space left on device" not in text and "os error 28" not in text:
        return None
    where = getattr(exc, "filename", None) or what
    reason = getattr(exc, "strerror", None) or "No space left on device"
    return DiskFull(
        f"the disk is full ({reason}) while writing {what}; free some space and try again, "
        "nothing half-written was kept",
        path=where,
    )
