"""GUI test fixtures shared by every view's tests."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(scope="session", autouse=True)
def collect_garbage_on_the_gui_thread(qapp):
    """Python's cyclic GC runs in whichever thread allocates; when a work thread frees Qt objects left in
    reference cycles, Qt's lock and the GIL deadlock (seen with gdb). pyqtgraph's collector disables
    automatic GC and collects on the GUI thread instead — the app does the same (studio/gui/app.py)."""
    from pyqtgraph.util.garbage_collector import GarbageCollector

    gc.collect()
    collector = GarbageCollector(interval=0.5)
    yield
    collector.timer.stop()
    gc.enable()
    gc.collect()
