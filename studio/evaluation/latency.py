"""Latency timing: warm-up, then enough runs for a stable median, with a bootstrap CI of the median."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The test suite sets this (tests/conftest.py) so that the many short runs it makes do not each spend
# seconds timing: the default policy's warm-up and minimum seconds are multiplied by it, while the run
# counts and the ceiling stay, so every statistic still comes from at least `min_runs` samples.
# Unset (every real run): factor 1.
SCALE_ENV = "MODEL_STUDIO_TIMING_SCALE"


def _scaled(seconds: float) -> Callable[[], float]:
    return lambda: seconds * float(os.environ.get(SCALE_ENV) or 1.0)


@dataclass
class TimingPolicy:
    warmup_runs: int = 2
    warmup_seconds: float = field(default_factory=_scaled(0.3))
    min_runs: int = 10
    min_seconds: float = field(default_factory=_scaled(1.5))
    max_runs: int = 300
    max_seconds: float = 20.0


def bootstrap_median_ci(samples: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% confidence interval of the median by the percentile bootstrap."""
    import numpy as np

    x = np.asarray(samples, dtype=np.float64)
    if len(x) < 2:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(x, size=(resamples, len(x)), replace=True), axis=1)
    lo, hi = np.percentile(medians, [2.5, 97.5])
    return float(lo), float(hi)


def summarise(samples_ms: list[float], batch_size: int) -> dict[str, Any]:
    import numpy as np

    x = np.asarray(samples_ms, dtype=np.float64)
    p50, p95, p99 = (float(v) for v in np.percentile(x, [50, 95, 99]))
    lo, hi = bootstrap_median_ci(samples_ms)
    return {
        "p50": p50,
        "p95": p95,
        "p99": p99,
        "mean": float(x.mean()),
        "ci95": [lo, hi],
        "runs": len(samples_ms),
        "samples": [round(v, 4) for v in samples_ms],
        "throughput_per_s": batch_size / (p50 / 1000.0) if p50 > 0 else 0.0,
    }


def time_calls(
    call: Callable[[], Any],
    batch_size: int,
    policy: TimingPolicy | None = None,
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time `call()` (one forward pass of a batch); `sync` waits for asynchronous devices (CUDA)."""
    policy = policy or TimingPolicy()
    sync = sync or (lambda: None)
    started = time.perf_counter()
    for i in range(10_000):
        call()
        sync()
        if i + 1 >= policy.warmup_runs and time.perf_counter() - started >= policy.warmup_seconds:
            break
    samples: list[float] = []
    began = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        call()
        sync()
        samples.append((time.perf_counter() - t0) * 1000.0)
        elapsed = time.perf_counter() - began
        if len(samples) >= policy.max_runs or elapsed >= policy.max_seconds:
            break
        if len(samples) >= policy.min_runs and elapsed >= policy.min_seconds:
            break
    return summarise(samples, batch_size)


def significant(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Is the difference of two latency medians significant? Non-overlapping 95% bootstrap CIs of the median,
    confirmed by a two-sided permutation test on the difference of medians when both have raw samples."""
    import numpy as np

    (alo, ahi), (blo, bhi) = a["ci95"], b["ci95"]
    overlap = not (ahi < blo or bhi < alo)
    out: dict[str, Any] = {"method": "95% bootstrap CIs of the median overlap?", "ci_overlap": overlap}
    xa, xb = np.asarray(a.get("samples") or []), np.asarray(b.get("samples") or [])
    if len(xa) >= 3 and len(xb) >= 3:
        rng = np.random.default_rng(0)
        observed = abs(np.median(xa) - np.median(xb))
        pooled = np.concatenate([xa, xb])
        hits = 0
        trials = 2000
        for _ in range(trials):
            rng.shuffle(pooled)
            if abs(np.median(pooled[: len(xa)]) - np.median(pooled[len(xa) :])) >= observed:
                hits += 1
        out["permutation_p"] = (hits + 1) / (trials + 1)
        out["method"] = "non-overlapping 95% bootstrap CIs of the median, and a permutation test (p < 0.05)"
        out["significant"] = (not overlap) and out["permutation_p"] < 0.05
    else:
        out["significant"] = not overlap
    return out
