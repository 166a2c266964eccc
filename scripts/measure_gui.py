"""Measure what a user feels in the desktop app (offscreen): start-up time and GUI-thread stalls.

    python scripts/measure_gui.py [--recipe RECIPE.yaml] [--open CHECKPOINT]

Prints: time from process start to the window shown, and to the model being open (tree filled);
then runs a pipeline (default: the starter pipeline) through the Run panel and records the longest gap
between ticks of a 10 ms timer on the GUI thread while the worker runs: the longest stall a user sees.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

T0 = time.perf_counter()
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", help="recipe to run (default: the starter pipeline)")
    parser.add_argument(
        "--open",
        default="builtin:minilm",
        help="checkpoint to open (default builtin:minilm); e.g. a big sharded one",
    )
    args = parser.parse_args()
    from PySide6.QtCore import QElapsedTimer, QTimer

    from studio.gui.app import build_main_window, create_app
    from studio.gui.document import StudioDocument
    from studio.variants import Workspace

    app = create_app()
    workspace = Workspace(tempfile.mkdtemp(prefix="studio-measure-"))
    document = StudioDocument(workspace=workspace)
    window = build_main_window(document)
    window.resize(1280, 800)
    window.show()
    app.processEvents()
    shown = time.perf_counter() - T0
    opened: dict[str, float] = {}
    window.open_finished.connect(lambda ok: opened.setdefault("t", time.perf_counter() - T0))
    window.open_source(args.open)
    while "t" not in opened:
        app.processEvents()
        time.sleep(0.005)
    print(f"window shown after {shown:.2f} s; {args.open} open (tree filled) after {opened['t']:.2f} s")

    if args.recipe:
        window.pipeline_editor.open_from(args.recipe)
    clock = QElapsedTimer()
    gaps: list[float] = []
    last = [0]
    timer = QTimer()
    timer.setInterval(10)

    def tick() -> None:
        now = clock.elapsed()
        gaps.append(now - last[0])
        last[0] = now

    timer.timeout.connect(tick)
    done: dict[str, object] = {}
    panel = window.run_panel
    panel.finished.connect(lambda r: done.setdefault("result", r))
    panel.failed.connect(lambda m: done.setdefault("error", m))
    clock.start()
    timer.start()
    started = time.perf_counter()
    panel.run()
    while not done:
        app.processEvents()
        time.sleep(0.002)
    timer.stop()
    took = time.perf_counter() - started
    worst = max(gaps) if gaps else 0.0
    print(
        f"pipeline {'finished' if 'result' in done else 'failed: ' + str(done.get('error'))} in {took:.1f} s; "
        f"longest GUI-thread gap {worst:.0f} ms over {len(gaps)} ticks of a 10 ms timer "
        f"(99th percentile {sorted(gaps)[int(len(gaps) * 0.99) - 1] if gaps else 0:.0f} ms)"
    )
    window.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
