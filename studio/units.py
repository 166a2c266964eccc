"""Byte sizes as people read them, one way for the CLI tables, the run log and the GUI.

Decimal units (1 MB = 10^6 bytes), as disks and download pages count them, so a size printed by
`model-studio compare` and the one shown in the window agree to the digit.
"""

from __future__ import annotations

from typing import Any

UNITS = ("B", "KB", "MB", "GB", "TB")


def human_bytes(n: Any) -> str:
    """`n` bytes with one decimal in the largest unit under 1000 ("91.2 MB", "512 B"); "?" when `n` is
    not a number (a metric a variant does not have)."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return "?"
    value = float(n)
    for unit in UNITS:
        if abs(value) < 1000 or unit == UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable: the last unit always returns")
