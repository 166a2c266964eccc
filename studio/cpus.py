"""The cores this process may run on: a container's, taskset's or test runner's limit, not the machine's.

Thread counts default to it (torch's, ONNX Runtime's, a search's parallel trials): more threads than
usable cores oversubscribe them, and spinning OpenMP threads then make every kernel several times slower.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity mask to read
        return os.cpu_count() or 1
