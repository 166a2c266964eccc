"""Peak memory of running a model, measured in a fresh process (`python -m studio.evaluation.memprobe`).

Inside a long-lived process an RSS delta lies: memory freed by earlier work is reused without the RSS
growing. A fresh process imports the runtimes first (their cost is the same for every variant and is
subtracted), then loads the artifact from disk and runs one forward pass at the given batch; the result is
the resident memory the model itself costs (weights, pre-packed kernels, activations, arenas).

Input (stdin, JSON): {"kind", "target", "model", "batch_size", "sequence_length", "data", "threads",
"lifeline_fd"}; `model` (the checkpoint the target was made from) only when the target is a compiled
program rather than a checkpoint (ExecuTorch, TensorRT).
Output (stdout, JSON): {"loaded_mb", "total_mb", "method", "batch"}.

The probe never outlives the process that started it (a worker the GUI cancelled, or one killed outright
would otherwise leave a probe running for minutes, holding a model's worth of memory): on Linux the kernel
kills it when its parent dies (PR_SET_PDEATHSIG), and on every POSIX system it watches a pipe only the
parent holds open (`lifeline_fd`): end of file means the parent is gone, whatever killed it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

FROZEN_ARG = "__memprobe__"  # the bundle's executable takes this first argument (studio.cli.main)
ORPHAN_EXIT = 3  # the status of a probe that ended because its parent had gone


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every few milliseconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self.before = 0

    def __enter__(self) -> PeakRSS:
        import psutil

        self._proc = psutil.Process()
        self.before = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.before) / 1e6


def command() -> list[str]:
    if getattr(sys, "frozen", False):
        return [sys.executable, FROZEN_ARG]
    return [sys.executable, "-m", "studio.evaluation.memprobe"]


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def probe(job: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime  # noqa: F401  (imported before the baseline reading: a fixed cost, not the model's)
    import torch
    import transformers  # noqa: F401

    if job["kind"] == "openvino":
        import openvino  # noqa: F401  (its import is a fixed cost too, not the IR's)

    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples, timing_examples
    from studio.evaluation.runners import make_runner
    from studio.families import family_for

    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    # A compiled program (a .pte, an engine) is no checkpoint: the model it came from says how to feed it.
    compiled = job.get("model") is not None
    source = job["model"] if compiled else job["target"]
    model = open_checkpoint(source, trust=job.get("trust") is True)  # set by the parent process only
    family = family_for(model)
    examples = load_examples(job.get("data") or "builtin:sentences", 64)
    seq = int(job["sequence_length"])
    batch_examples = timing_examples(examples, int(job["batch_size"]), seq)
    batch = family.batch(model, batch_examples, seq) if family.takes_text else None  # tokenizer loaded now

    kind = job["kind"]
    with PeakRSS() as mem:
        if kind == "torch":
            _ = model.module  # built lazily otherwise, inside the forward pass
        runner = make_runner(
            kind, model, artifact=job["target"] if compiled else None, threads=job.get("threads")
        )
        if batch is None:
            batch = family.batch(model, batch_examples, seq)
        loaded = _rss_mb()
        runner(batch)
    base = mem.before / 1e6
    return {
        "loaded_mb": round(max(0.0, loaded - base), 1),  # memory-mapped weights count once touched
        "total_mb": round(max(0.0, mem.peak / 1e6 - base), 1),
        "batch": int(job["batch_size"]),
        "method": "fresh process: resident memory after loading the model and after one forward pass, "
        "minus the runtimes' own import cost",
    }


def set_parent_death_signal() -> bool:
    """Linux: ask the kernel to SIGKILL this process when its parent dies; False where that is not possible.

    (The kernel means the parent *thread*: the one that started us waits for us, so it outlives us.)"""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_lifeline(fd: int) -> threading.Thread:
    """Exit at once when the pipe `fd` reaches end of file: its write end is held only by the parent, and
    the system closes it when the parent dies however it dies (SIGKILL, a crash, the out-of-memory killer)."""

    def wait() -> None:
        try:
            while os.read(fd, 1):  # the parent never writes: read returns b"" once it is gone
                pass
        except OSError:
            pass
        os._exit(ORPHAN_EXIT)

    thread = threading.Thread(target=wait, name="memprobe-lifeline", daemon=True)
    thread.start()
    return thread


def _stay_with_parent(job: dict[str, Any]) -> None:
    # A parent that died before the death signal was asked for is caught by the lifeline: its end of
    # file is there whenever the watcher starts. (No parent-pid check: a launcher in between is fine.)
    set_parent_death_signal()
    if job.get("lifeline_fd") is not None:
        watch_lifeline(int(job["lifeline_fd"]))


def main() -> int:
    try:
        job = json.loads(sys.stdin.read())
        _stay_with_parent(job)  # before the imports: they are the slow part
        out = probe(job)
    except Exception as exc:  # reported to the parent, which records the metric as missing
        out = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
