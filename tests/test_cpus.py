"""Threads follow the cores the process may use (taskset, a container, a test worker's share)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from studio.cpus import usable_cores
from studio.evaluation.measure import set_threads
from studio.search_runner import default_parallel
import torch
print(usable_cores(), set_threads(None), torch.get_num_threads(), default_parallel())
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_one_allowed_core_means_one_thread_whatever_the_machine_has():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["1", "1", "1", "1"], out.stderr
