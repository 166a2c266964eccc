"""What the verbs share: number and size formatting, JSON on stdout, a progress line, the workspace."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def print_json(data: Any, **options: Any) -> None:
    """`data` as one JSON document on stdout, ended by a newline (what scripts reading --json expect)."""
    json.dump(data, sys.stdout, **options)
    sys.stdout.write("\n")


def progress_bar(fraction: float, width: int = 24) -> str:
    """`fraction` (clamped to 0..1) drawn as `width` characters: '#' done, '-' to go."""
    filled = int(max(0.0, min(1.0, fraction)) * width)
    return "#" * filled + "-" * (width - filled)


class ProgressLine:
    """A one-line progress bar on stderr for the verbs that run in this process (inspect --heads, bench,
    sensitivity), shown only when stderr is a terminal; the worker's `studio.events.Progress` events of a
    `run` are drawn by `RunDisplay`."""

    def __init__(self, label: str, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.perf_counter()

    def __call__(self, fraction: float, message: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        sys.stderr.write(
            f"\r{self.label} [{progress_bar(fraction)}] {fraction * 100:5.1f}% {elapsed:6.1f}s {message[:60]:<60}"
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def format_number(v: float | None, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def workspace_path(args: argparse.Namespace) -> Any:
    from studio.variants import Workspace

    return Workspace(getattr(args, "workspace", None))
