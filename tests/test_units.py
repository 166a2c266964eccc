"""One byte formatter for the CLI, the run log and the GUI: decimal units, one decimal, "?" for no number."""

from __future__ import annotations

import pytest

from studio.units import human_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (91_234_567, "91.2 MB"),
        (2.5e9, "2.5 GB"),
        (3e15, "3000.0 TB"),
        (-2048, "-2.0 KB"),
        (None, "?"),
        ("12", "?"),
        (True, "?"),
    ],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text
