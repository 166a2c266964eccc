"""Which system libraries Qt's X11 (xcb) window needs, checked before Qt is imported.

On a fresh server Qt's xcb platform plugin fails to load when any of its libraries is missing, and Qt then
names only the first one it thinks of ("xcb-cursor0 is needed") even when the real gaps are others, and
aborts. Looking the libraries up first lets the CLI print one line with the Debian packages that are missing.
Without a display there is no window at all: the app renders offscreen, and the user is told so and how to
get one. Qt-free on purpose (it runs before PySide6 is imported).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Mapping

# The shared libraries PySide6's libqxcb.so and libQt6XcbQpa.so link (`ldd` on them) that a minimal Debian or
# Ubuntu server lacks, each with the package that provides it. Every package is in packaging/apt-packages.txt
# (a test keeps the two in agreement).
XCB_LIBRARIES: dict[str, str] = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libfontconfig.so.1": "libfontconfig1",
    "libdbus-1.so.3": "libdbus-1-3",
}

NO_DISPLAY_MESSAGE = (
    "model-studio: no display (DISPLAY and WAYLAND_DISPLAY are unset), so the app renders offscreen and no "
    "window appears; for a window run it in a desktop session or over `ssh -X`, or as "
    "`QT_QPA_PLATFORM=vnc model-studio` and connect a VNC viewer to port 5900; `model-studio screenshots DIR` "
    "renders every view to PNG files"
)


def has_display(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))


def uses_xcb(environ: Mapping[str, str], platform: str = sys.platform) -> bool:
    """Whether Qt will load its xcb plugin: on Linux, with an X11 display, unless another platform is chosen
    (QT_QPA_PLATFORM may be a list such as 'wayland;xcb': the first entry is tried first)."""
    if not platform.startswith("linux"):
        return False
    chosen = environ.get("QT_QPA_PLATFORM", "").split(";")[0].split(":")[0].strip()
    if chosen:
        return chosen == "xcb"
    if environ.get("WAYLAND_DISPLAY") and environ.get("XDG_SESSION_TYPE") == "wayland":
        return False  # Qt 6 picks its wayland plugin on a wayland session
    return bool(environ.get("DISPLAY"))


def _ldconfig_sonames() -> set[str]:
    """Sonames in the dynamic linker's cache (`ldconfig -p`); empty where ldconfig cannot run."""
    for exe in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        return {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
    return set()


def _loadable(soname: str) -> bool:
    """Whether the dynamic linker finds `soname` (LD_LIBRARY_PATH included, which the cache does not list)."""
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def missing_libraries(libraries: Mapping[str, str] = XCB_LIBRARIES) -> dict[str, str]:
    """The libraries (soname -> package) of `libraries` that the dynamic linker cannot find."""
    cached = _ldconfig_sonames()
    return {so: pkg for so, pkg in libraries.items() if so not in cached and not _loadable(so)}


def missing_message(missing: Mapping[str, str]) -> str:
    """One line naming what is missing and the apt command that installs it."""
    packages = " ".join(dict.fromkeys(missing.values()))
    return (
        f"Qt's X11 window needs system libraries that are missing here ({', '.join(missing)}); install them "
        f"with `sudo apt-get install {packages}` (all of Qt's: see README, Set-up), or run without a window "
        "with QT_QPA_PLATFORM=offscreen"
    )


def check_window_libraries(
    environ: Mapping[str, str] | None = None, libraries: Mapping[str, str] = XCB_LIBRARIES
) -> str | None:
    """The problem line when Qt is about to open an X11 window without its libraries, else None."""
    env = os.environ if environ is None else environ
    if not uses_xcb(env):
        return None
    missing = missing_libraries(libraries)
    return missing_message(missing) if missing else None
