"""Starting the desktop app from the CLI without importing Qt anywhere else."""

from __future__ import annotations

import argparse


def launch(args: argparse.Namespace) -> int:
    from studio.gui.app import run_app

    return run_app(args)
