"""One A/B comparison of two workspace rows, as the Compare tab shows it: both checkpoints are opened once,
and that one pair of opened models gives the metrics, the weight differences, the examples where A and B
disagree most, and later (one layer at a time, on request) the histogram overlays of a layer in A and B.

Opening a model is the slow part (a transformers model, an ONNX graph); reopening it for each of these
took three loads per side. The session keeps the opened models and their tensor references for as long
as the comparison is on screen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from studio.compare import comparison, open_row, tensor_refs

HIST_BINS = 96


@dataclass
class Overlay:
    """Histograms of one layer in A and B on the same bin edges."""

    name: str
    edges: np.ndarray
    counts_a: np.ndarray
    counts_b: np.ndarray
    stats_a: Any  # studio.inspection.stats.TensorStats
    stats_b: Any


@dataclass
class ABSession:
    a: dict[str, Any]  # workspace rows
    b: dict[str, Any]
    models: tuple[Any, Any]  # the opened checkpoints of A and B
    refs_a: dict[str, Any]  # canonical tensor name -> TensorRef
    refs_b: dict[str, Any]
    compare: dict[str, Any]  # what studio.compare.compare returns for the pair

    def overlay(self, name: str, bins: int = HIST_BINS) -> Overlay:
        """The histograms of layer `name` in A and B (a KeyError when one of them lacks it)."""
        return overlay_histograms(name, self.refs_a[name], self.refs_b[name], bins)


def open_session(
    workspace: Any, a: str, b: str, examples: int, progress: Callable[[float, str], None]
) -> ABSession:
    """Open A and B once and compare them: metrics, weights and (with `examples` > 0) the examples run on
    both; `progress(fraction, message)` is called between the slow parts."""
    rows = workspace.get(a), workspace.get(b)
    progress(0.02, "loading both models…")
    models = open_row(rows[0]), open_row(rows[1])
    refs = tensor_refs(models[0]), tensor_refs(models[1])
    data = comparison(rows, models, refs, examples=examples, progress=progress)
    progress(0.95, "done")
    return ABSession(rows[0], rows[1], models, refs[0], refs[1], data)


def dense_numpy(chunk: Any) -> np.ndarray:
    """Finite values of a chunk as float numpy (chunks are numpy arrays or torch tensors, maybe quantized)."""
    if not isinstance(chunk, np.ndarray):
        import torch

        if getattr(chunk, "is_quantized", False):
            chunk = chunk.dequantize()
        if chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.to(torch.float32)
        chunk = chunk.numpy()
    x = chunk if chunk.dtype in (np.float32, np.float64) else chunk.astype(np.float32)
    return x[np.isfinite(x)]


def overlay_histograms(name: str, ref_a: Any, ref_b: Any, bins: int = HIST_BINS) -> Overlay:
    """Histograms of the same layer in A and B on one set of bin edges (the union of both ranges), so the
    two curves can be read against each other."""
    from studio.inspection.stats import tensor_stats

    sa, sb = tensor_stats(ref_a, bins), tensor_stats(ref_b, bins)
    lows = [v for v in (sa.min, sb.min) if v is not None]
    highs = [v for v in (sa.max, sb.max) if v is not None]
    lo, hi = (min(lows), max(highs)) if lows and highs else (-1.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = []
    for ref in (ref_a, ref_b):
        c = np.zeros(bins, dtype=np.int64)
        for chunk in ref.chunks():
            c += np.histogram(dense_numpy(chunk), bins=edges)[0]
        counts.append(c)
    return Overlay(name, edges, counts[0], counts[1], sa, sb)
