"""Starting the desktop app from the CLI without importing Qt anywhere else."""

from __future__ import annotations

import argparse
import os
import sys


def check_platform() -> None:
    """Before Qt loads a platform plugin: say that there will be no window where there is no display, and
    refuse (naming the Debian packages) where Qt's X11 libraries are missing, instead of Qt's abort naming
    the wrong library."""
    from studio.errors import Unavailable
    from studio.qt_libs import NO_DISPLAY_MESSAGE, check_window_libraries, has_display

    if (
        sys.platform.startswith("linux")
        and not os.environ.get("QT_QPA_PLATFORM")
        and not has_display(os.environ)
    ):
        print(NO_DISPLAY_MESSAGE, file=sys.stderr)
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    problem = check_window_libraries()
    if problem:
        raise Unavailable(problem)


def launch(args: argparse.Namespace) -> int:
    check_platform()
    from studio.gui.app import run_app

    return run_app(args)


def screenshots(args: argparse.Namespace) -> list:
    from pathlib import Path

    from studio.errors import Unavailable
    from studio.qt_libs import check_window_libraries, has_display

    if not has_display(os.environ):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # PNGs need no window: nothing to say
    problem = check_window_libraries()
    if problem:
        raise Unavailable(problem)
    from studio.gui.screenshots import render_all

    return render_all(Path(args.dir), Path(args.workspace) if args.workspace else None)
