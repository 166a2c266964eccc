"""Starting the desktop app from the CLI without importing Qt anywhere else."""

from __future__ import annotations

import argparse


def launch(args: argparse.Namespace) -> int:
    from studio.gui.app import run_app

    return run_app(args)


def screenshots(args: argparse.Namespace) -> list:
    import os
    from pathlib import Path

    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from studio.gui.screenshots import render_all

    return render_all(Path(args.dir), Path(args.workspace) if args.workspace else None)
