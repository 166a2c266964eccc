"""The desktop app (placeholder until the GUI lands)."""

from __future__ import annotations

import argparse


def run_app(args: argparse.Namespace) -> int:
    raise SystemExit("the desktop window is not built yet: try `model-studio inspect builtin:minilm`")
