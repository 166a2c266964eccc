"""One job for a worker process, as both clients (the CLI's `WorkerClient`, the GUI's `WorkerProcess`) see it.

A job is a recipe run in a workspace: the client writes it as one JSON document to the worker's stdin and
closes it, so the worker reads all of it or nothing (`python -m studio.worker` parses it back with
`Job.from_dict`). The worker works inside the workspace's tmp/<job id>; after an abnormal end (crash,
kill, cancel) the client removes that folder, since the worker could not. Cancel sends SIGTERM to the
worker's process group (it runs in its own session, so a memory probe or compiler it started goes too)
and SIGKILL after `CANCEL_GRACE_S`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.events import Done, Error
from studio.variants import TMP_FOLDER, default_root

CANCEL_GRACE_S = 1.0  # SIGTERM first; SIGKILL after this if the worker is still there
STDERR_LINES = 40  # the worker's last stderr lines, shown when it crashes
FROZEN_WORKER_ARG = "__worker__"  # a PyInstaller bundle has no `-m`: its executable takes this first argument


def worker_command() -> list[str]:
    """The command line that starts a worker: `python -m studio.worker`, or the bundle's own executable."""
    if getattr(sys, "frozen", False):
        return [sys.executable, FROZEN_WORKER_ARG]
    return [sys.executable, "-m", "studio.worker"]


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Job:
    """What a worker is asked to do. `trust` is the person's --trust (or the GUI's confirmation): it is
    written last, so neither `extra` nor the recipe's own `trust` field can set it."""

    recipe: Any  # the recipe as JSON data (Recipe.model_dump(mode="json"))
    workspace: Path | None  # the workspace root; None: the default workspace
    recipe_path: str | None = None  # where the recipe came from: relative paths in it start there
    trust: bool = False
    job_id: str = field(default_factory=new_job_id)
    extra: dict[str, Any] = field(default_factory=dict)  # more fields for the worker to read

    @property
    def folder(self) -> Path:
        """The work folder the worker makes for this job (the workspace's tmp_dir / job id)."""
        root = default_root() if self.workspace is None else Path(self.workspace).expanduser()
        return root / TMP_FOLDER / self.job_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "workspace": None if self.workspace is None else str(self.workspace),
            "job_id": self.job_id,
            "recipe_path": self.recipe_path,
            **self.extra,
            "trust": self.trust,
        }

    def payload(self) -> bytes:
        """The bytes written to the worker's stdin before it is closed."""
        return json.dumps(self.to_dict()).encode("utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        """The worker's reading of a job; only a literal `true` trusts (never a truthy string)."""
        workspace = data.get("workspace")
        return cls(
            recipe=data.get("recipe"),
            workspace=Path(workspace) if workspace else None,
            recipe_path=data.get("recipe_path"),
            trust=data.get("trust") is True,
            job_id=data.get("job_id") or new_job_id(),
        )

    def remove_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class StderrTail:
    """The last lines the worker wrote to stderr, read in chunks that may end inside a line."""

    def __init__(self) -> None:
        self._lines: deque[str] = deque(maxlen=STDERR_LINES)
        self._partial = b""

    def feed(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        self._add(lines)

    def close(self) -> None:
        rest, self._partial = self._partial, b""
        self._add([rest])

    def _add(self, lines: list[bytes]) -> None:
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if line.strip():
                self._lines.append(line)

    @property
    def lines(self) -> list[str]:
        return list(self._lines)

    @property
    def text(self) -> str:
        return "\n".join(self._lines)


def describe_exit(code: int) -> str:
    """Why a worker ended, from its exit status (negative: the signal that killed it)."""
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


@dataclass(frozen=True)
class JobEnd:
    """How a worker ended: its exit status (negative: killed by that signal), the last `done` or `error`
    it sent, whether the person cancelled, and its last stderr lines."""

    job: Job
    code: int
    outcome: Done | Error | None
    cancelled: bool = False
    stderr: tuple[str, ...] = ()

    @property
    def abnormal(self) -> bool:
        """Anything but a clean exit after `done`: the worker may have left its work folder behind."""
        return self.code != 0 or not isinstance(self.outcome, Done)

    @property
    def reason(self) -> str:
        return describe_exit(self.code)

    def clean_up(self) -> None:
        """Remove the job's work folder after an abnormal end (a finished job has removed it itself)."""
        if self.abnormal:
            self.job.remove_folder()


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the worker's process group (its children too); to the worker alone when the group
    cannot be reached. A process that has already gone is not an error."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
