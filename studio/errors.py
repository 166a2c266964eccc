"""Errors a user can act on.

Every problem with user input (a path, a checkpoint, a recipe, a data file) is raised as a `BadInput`
naming the file and the problem. The CLI prints it in one line and exits with code 2; the GUI shows it
in the window. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class StudioError(Exception):
    """Base class of errors the studio reports to users without a traceback."""

    exit_code = 1

    def __init__(self, problem: str, *, path: str | Path | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem


class BadInput(StudioError):
    """The user gave something the studio cannot use (exit code 2)."""

    exit_code = 2


class Unavailable(StudioError):
    """A feature cannot run on this machine (no GPU, library missing); the reason says why."""

    exit_code = 3


class Cancelled(StudioError):
    """The user cancelled the work."""

    exit_code = 130
