"""One tensor's histogram and what symmetric per-tensor INT8 quantization would do to it.

The statistics are `tensor_stats`; the INT8 preview reads the tensor once more, chunk by chunk, so memory
stays bounded by one chunk whatever the tensor's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from studio.checkpoints.base import TensorRef
from studio.inspection.stats import TensorStats, as_float_array, tensor_stats


@dataclass
class HistogramResult:
    stats: TensorStats
    int8_scale: float | None  # symmetric per-tensor: max|x| / 127
    int8_rmse: float | None  # RMS error of an INT8 round trip with that scale
    int8_levels_used: int | None  # distinct INT8 levels the tensor's values round to


def compute_histogram(ref: TensorRef, bins: int) -> HistogramResult:
    """Statistics plus what symmetric per-tensor INT8 would do to this tensor (read chunk by chunk)."""
    stats = tensor_stats(ref, bins)
    if stats.min is None or stats.max is None:
        return HistogramResult(stats, None, None, None)
    absmax = max(abs(stats.min), abs(stats.max))
    if absmax == 0:
        return HistogramResult(stats, None, 0.0, 1)
    scale = absmax / 127.0
    sq_err, count = 0.0, 0
    used = np.zeros(255, dtype=bool)
    for raw in ref.chunks():
        x = as_float_array(raw).astype(np.float64)
        x = x[np.isfinite(x)]
        q = np.clip(np.round(x / scale), -127, 127)
        used[(q + 127).astype(np.int64)] = True
        sq_err += float(np.square(x - q * scale).sum())
        count += x.size
    return HistogramResult(stats, scale, math.sqrt(sq_err / count) if count else None, int(used.sum()))
