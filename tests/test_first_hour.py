"""A new user's first hour on a fresh server: the system packages README tells them to install are the ones
CI installs, and a missing Qt library or a missing display is named at start instead of Qt's misleading abort
(or a silent offscreen run)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from studio.qt_libs import (
    NO_DISPLAY_MESSAGE,
    XCB_LIBRARIES,
    check_window_libraries,
    missing_libraries,
    uses_xcb,
)

ROOT = Path(__file__).resolve().parent.parent
APT_LIST = ROOT / "packaging" / "apt-packages.txt"


def apt_list() -> list[str]:
    lines = APT_LIST.read_text(encoding="utf-8").splitlines()
    return [word for line in lines for word in line.split("#", 1)[0].split()]


def readme_apt_line() -> list[str]:
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if "apt-get install" in ln]
    assert len(lines) == 1, lines  # one line to copy
    return [w for w in lines[0].split("apt-get install", 1)[1].split() if not w.startswith("-")]


def test_readme_apt_line_is_the_list_ci_installs():
    packages = apt_list()
    assert (
        "libxcb-icccm4" in packages and "libxcb-keysyms1" in packages and len(set(packages)) == len(packages)
    )
    assert readme_apt_line() == packages
    ci = (ROOT / ".ci" / "run").read_text()
    assert "packaging/apt-packages.txt" in ci
    # CI reads the list from the file and names no package of its own
    assert not [p for p in packages if re.search(rf"(?<![\w/-]){re.escape(p)}(?![\w-])", ci)]
    assert set(XCB_LIBRARIES.values()) <= set(packages)  # the start-up check names packages README lists


def test_ci_reads_the_list_as_bash_does():
    """The shell line in .ci/run that turns the file into words gives exactly the list."""
    ci = (ROOT / ".ci" / "run").read_text()
    line = next(ln.strip() for ln in ci.splitlines() if "packaging/apt-packages.txt" in ln and "=" in ln)
    out = subprocess.run(
        ["bash", "-c", f"{line}; printf '%s\\n' $PACKAGES"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == apt_list()


def _linked(path: Path) -> set[str]:
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


# libraries the listed packages pull in as their own dependencies (libxcb-image0 -> libxcb-util1, ...)
PULLED_IN = {
    "libxcb.so.1",
    "libxcb-util.so.1",
    "libxcb-shm.so.0",
    "libxcb-render.so.0",
    "libxcb-sync.so.1",
    "libxcb-xfixes.so.0",
    "libX11-xcb.so.1",
    "libX11.so.6",
}


@pytest.mark.skipif(shutil.which("ldd") is None or not sys.platform.startswith("linux"), reason="needs ldd")
def test_the_checked_libraries_are_what_qts_xcb_plugin_links():
    import PySide6

    qt = Path(PySide6.__file__).parent / "Qt"
    linked = _linked(qt / "plugins" / "platforms" / "libqxcb.so") | _linked(qt / "lib" / "libQt6XcbQpa.so.6")
    x11 = {so for so in linked if re.match(r"lib(xcb|xkbcommon|X11|EGL|GL\.|fontconfig|dbus)", so)}
    assert x11 - PULLED_IN == set(XCB_LIBRARIES)  # all Qt needs is checked, and nothing it does not


def test_missing_libraries_are_named_with_their_packages():
    libraries = {"libc.so.6": "libc6", "libstudio-not-installed.so.7": "libstudio-not-installed7"}
    assert missing_libraries(libraries) == {"libstudio-not-installed.so.7": "libstudio-not-installed7"}
    problem = check_window_libraries({"DISPLAY": ":0"}, libraries)
    assert problem is not None and "\n" not in problem
    assert "libstudio-not-installed.so.7" in problem
    assert "sudo apt-get install libstudio-not-installed7" in problem and "libc6" not in problem
    # no X11 window, nothing to check
    assert check_window_libraries({"DISPLAY": ":0", "QT_QPA_PLATFORM": "offscreen"}, libraries) is None
    assert check_window_libraries({}, libraries) is None


@pytest.mark.parametrize(
    ("env", "xcb"),
    [
        ({"DISPLAY": ":0"}, True),
        ({"DISPLAY": ":0", "QT_QPA_PLATFORM": "xcb"}, True),
        ({"DISPLAY": ":0", "QT_QPA_PLATFORM": "offscreen"}, False),
        ({"DISPLAY": ":0", "QT_QPA_PLATFORM": "wayland;xcb"}, False),
        ({"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0", "XDG_SESSION_TYPE": "wayland"}, False),
        ({}, False),
        ({"QT_QPA_PLATFORM": "xcb:no-glx"}, True),  # chosen explicitly: Qt tries xcb even without DISPLAY
    ],
)
def test_when_qt_loads_its_xcb_plugin(env, xcb):
    assert uses_xcb(env, "linux") is xcb
    assert uses_xcb(env, "darwin") is False


def _start(env_update: dict[str, str], drop: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update, PYTHONPATH=str(ROOT))
    code = (
        "import os; from studio.gui_entry import check_platform; check_platform(); "
        "print(os.environ.get('QT_QPA_PLATFORM', ''))"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the display rule is Linux's")
def test_without_a_display_the_user_is_told_there_is_no_window():
    done = _start({}, ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "offscreen"
    assert NO_DISPLAY_MESSAGE in done.stderr and "ssh -X" in done.stderr
    # a platform the user chose is theirs: no message
    chosen = _start({"QT_QPA_PLATFORM": "offscreen"}, ("DISPLAY", "WAYLAND_DISPLAY"))
    assert chosen.returncode == 0 and chosen.stderr == "" and chosen.stdout.strip() == "offscreen"


def test_cli_refuses_a_window_without_its_libraries_in_one_line(tmp_path):
    """`model-studio` with a display where a library Qt's window needs is not installed: system libraries
    cannot be hidden from a test, so the checked list is one the real dynamic linker cannot find; what is
    tested end to end is the refusal before Qt loads, in one line, with its exit code."""
    code = (
        "import sys, studio.qt_libs as q; "
        "q.XCB_LIBRARIES.clear(); q.XCB_LIBRARIES['libstudio-not-installed.so.7'] = 'libstudio-not-installed7'; "
        "from studio.cli import main; sys.exit(main([]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}
    env.update(DISPLAY=":0", PYTHONPATH=str(ROOT), MODEL_STUDIO_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("model-studio: error: Qt's X11 window needs")
    assert "sudo apt-get install libstudio-not-installed7" in lines[0]
