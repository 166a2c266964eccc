"""GUI test fixtures shared by every view's tests."""

from __future__ import annotations

import gc
import shutil

import pytest
from PySide6.QtCore import QCoreApplication, QSettings


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


@pytest.fixture
def settings(tmp_path, qapp):
    """QSettings of this test only: no test sees another's window layout or recent files."""
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))
    QCoreApplication.setOrganizationName("model-studio-tests")
    QCoreApplication.setApplicationName("model-studio-tests")


@pytest.fixture(scope="session")
def demo_variants(minilm_variants):
    """A workspace with the original (measured as the baseline) and two real variants of MiniLM, a bfloat16
    torch variant and an ONNX export, built once by the worker (tests/conftest.py's minilm_variants, which
    tests/test_evaluation.py reads too)."""
    root, ids, _result = minilm_variants
    return root, ids


@pytest.fixture(scope="module")
def built(demo_variants, tmp_path_factory):
    """A module's own copy of the demo workspace (its tests may remove variants)."""
    source, ids = demo_variants
    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(source, root, dirs_exist_ok=True)
    return root, dict(ids)
