"""Peak memory of running a model, measured in a fresh process (`python -m studio.evaluation.memprobe`).

Inside a long-lived process an RSS delta lies: memory freed by earlier work is reused without the RSS
growing. A fresh process imports the runtimes first (their cost is the same for every variant and is
subtracted), then loads the artifact from disk and runs one forward pass at the given batch; the result is
the resident memory the model itself costs (weights, pre-packed kernels, activations, arenas).

Input (stdin, JSON): {"kind", "target", "batch_size", "sequence_length", "data", "threads"}.
Output (stdout, JSON): {"loaded_mb", "total_mb", "method", "batch"}.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

FROZEN_ARG = "__memprobe__"  # the bundle's executable takes this first argument (studio.cli.main)


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

    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples, timing_examples
    from studio.evaluation.runners import make_runner
    from studio.families import family_for

    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    model = open_checkpoint(job["target"], trust=job.get("trust") is True)  # set by the parent process only
    family = family_for(model)
    examples = load_examples(job.get("data") or "builtin:sentences", 64)
    seq = int(job["sequence_length"])
    batch_examples = timing_examples(examples, int(job["batch_size"]), seq)
    batch = family.batch(model, batch_examples, seq) if family.takes_text else None  # tokenizer loaded now

    kind = job["kind"]
    with PeakRSS() as mem:
        if kind == "torch":
            _ = model.module  # built lazily otherwise, inside the forward pass
        runner = make_runner(kind, model, threads=job.get("threads"))
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


def main() -> int:
    try:
        out = probe(json.loads(sys.stdin.read()))
    except Exception as exc:  # reported to the parent, which records the metric as missing
        out = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
