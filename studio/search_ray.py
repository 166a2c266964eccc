"""`model-studio search --ray ADDRESS`: the trials as tasks of a Ray cluster.

Each trial is a Ray task that runs the very job a local trial runs (studio/search_runner.py): a worker
process on the task's node, with the same workspace path. So the workspace must be on a file system every
node sees at that path (NFS, a cluster file system), with Model Studio installed alike on every node; the
worker writes the variant there as it would locally, and the task sends back only the variant's row, which
the driver tells the study (its only writer). Shipping artifacts back to the driver instead would copy every
variant over the network twice and need a second way to commit variants; a shared workspace needs none.

Timing: each task reserves CPUs (`num_cpus`, by default all of the smallest node's, so one trial runs on a
node at a time), and on its node a run holds a node-local lock while it times (a lock in the shared
workspace would make every node wait for every other one's timings). Trials on different nodes time at the
same moment on different machines, which is what a cluster is for.

An address where nothing listens is `Unavailable` (exit 3) within `PROBE_TIMEOUT_S` (a TCP connect tried
before Ray is asked); one that listens but is no Ray head is Ray's own error after its GCS timeout (60 s).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from studio.cpus import usable_cores
from studio.errors import BadInput, DiskFull, Unavailable
from studio.evaluation.timing_lock import LOCK_NAME
from studio.search_runner import Outcome, TrialRunner, timing_lock_env

PROBE_TIMEOUT_S = 5.0  # a TCP connect to HOST:PORT first: the usual failure (nothing there) is quick
LOCAL = "local"  # a private Ray on this machine, for trying the path out (and the tests)


def node_lock() -> Path:
    """The timing lock of the node a task runs on: in its own temporary folder, per user."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"model-studio-{uid}" / LOCK_NAME


def run_trial_task(concrete: dict[str, Any], root: str, recipe_path: str | None, trust: bool) -> Outcome:
    """One trial on the node Ray chose (a Ray task: module-level, so every node imports it by name)."""
    with timing_lock_env(node_lock()):
        return TrialRunner(root, recipe_path, trust)(concrete)


def _host_port(address: str) -> tuple[str, int] | None:
    """HOST:PORT of a head node, for the quick probe; None for `auto`, `ray://...` and other forms."""
    if address in ("auto", LOCAL) or "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise BadInput(
            f"--ray {address}: expected HOST:PORT (the head's GCS port, 6379 by default), auto or local"
        )
    return host.strip("[]"), int(port)


def connect(address: str) -> Any:
    """ray.init for `address` (see the module docstring); returns the ray module."""
    try:
        import ray
    except ImportError as exc:
        raise Unavailable("--ray needs the ray package (pip install 'ray[default]')") from exc
    where = _host_port(address)
    if where is not None:
        try:
            socket.create_connection(where, timeout=PROBE_TIMEOUT_S).close()
        except OSError as exc:
            raise Unavailable(
                f"no Ray cluster answers at {address} ({exc.strerror or exc}); start its head with "
                "`ray start --head` and check the address and the firewall"
            ) from None
    if address == LOCAL:
        # small: trials send back rows, not models; no dashboard to serve
        kwargs: dict[str, Any] = {
            "num_cpus": usable_cores(),
            "object_store_memory": 100 * 2**20,
            "include_dashboard": False,
        }
    else:
        kwargs = {"address": address}
    # In this (the main) thread: ray.init started from another thread loses its connection to the
    # cluster it starts. Ray bounds the wait itself: a GCS that does not answer in 60 s ends the process.
    try:
        ray.init(log_to_driver=False, logging_level=logging.WARNING, **kwargs)
    except Exception as exc:  # ConnectionError, RuntimeError, ...: Ray's own words go to the person
        raise Unavailable(f"cannot join the Ray cluster at {address}: {exc}") from exc
    return ray


def smallest_node_cpus(ray: Any) -> int:
    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    cpus = [c for c in cpus if c > 0]
    if not cpus:
        raise Unavailable("the Ray cluster has no node with CPUs to run trials on")
    return min(cpus)


def capacity(ray: Any, cpus_per_trial: int) -> int:
    """Trials the cluster's alive nodes can run at once with `cpus_per_trial` each."""
    return sum(int(n["Resources"].get("CPU", 0)) // cpus_per_trial for n in ray.nodes() if n.get("Alive"))


def as_trial_outcome(task: Future[Outcome]) -> Future[Outcome]:
    """A task's future whose Ray failures (a node lost, a task killed) are the trial's failure, not the
    search's: only a full disk (which stops every trial) and a cancellation pass through as exceptions."""
    out: Future[Outcome] = Future()

    def settle(done: Future[Outcome]) -> None:
        if done.cancelled():
            out.cancel()
            out.set_running_or_notify_cancel()
            return
        exc = done.exception()
        if exc is None:
            out.set_result(done.result())
        elif isinstance(exc, DiskFull) or type(exc).__name__ == "TaskCancelledError":
            out.set_exception(exc)
        else:
            out.set_result((None, f"crash: the Ray task failed: {type(exc).__name__}: {exc}"))

    task.add_done_callback(settle)
    return out


class RayTrials:
    """Trials as Ray tasks: `slots` is --parallel, or as many as the cluster fits."""

    def __init__(
        self,
        runner: TrialRunner,
        address: str,
        *,
        parallel: int | None = None,
        cpus_per_trial: int | None = None,
    ) -> None:
        self.runner = runner
        self.ray = connect(address)
        try:
            self.cpus = cpus_per_trial or smallest_node_cpus(self.ray)
            fits = capacity(self.ray, self.cpus)
            if fits < 1:
                raise Unavailable(
                    f"no node of the Ray cluster has {self.cpus} CPUs for a trial (--ray-cpus-per-trial)"
                )
            self.slots = parallel or fits
            self.task = self.ray.remote(run_trial_task).options(num_cpus=self.cpus, max_retries=0)
        except BaseException:
            self.ray.shutdown()
            raise
        self._refs: list[Any] = []

    def submit(self, concrete: dict[str, Any]) -> Future[Outcome]:
        ref = self.task.remote(concrete, str(self.runner.root), self.runner.recipe_path, self.runner.trust)
        self._refs.append(ref)
        return as_trial_outcome(ref.future())

    def cancel_all(self) -> None:
        """Interrupt every task (KeyboardInterrupt in it: its worker is cancelled and its folder removed)."""
        for ref in self._refs:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=False)

    def close(self) -> None:
        for ref in self._refs:  # let cancelled tasks stop their workers before the driver leaves
            with contextlib.suppress(Exception):
                self.ray.wait([ref], timeout=30)
        self.ray.shutdown()
