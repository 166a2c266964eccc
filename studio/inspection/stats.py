"""Per-tensor weight statistics and histograms, computed tensor by tensor and chunk by chunk.

Two passes over each tensor's chunks (moments first, then the histogram and outliers, which need the
range and the standard deviation), so memory stays bounded by one chunk whatever the checkpoint size.
An outlier is a finite value with |x - mean| > 6 std. Non-finite values are counted and left out.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from studio.checkpoints.base import LoadedModel, TensorRef
from studio.cpus import usable_cores

DEFAULT_BINS = 128
DTYPE_BYTES = {
    "float64": 8,
    "int64": 8,
    "float32": 4,
    "int32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "qint8": 1,
    "quint8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "qint32": 4,
    "complex64": 8,
    "complex128": 16,
}
OUTLIER_STD = 6.0
CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32: a chunk's temporaries stay in cache between reductions
KEEP_ELEMENTS = 1 << 22  # a tensor this small is read once: its values are binned from memory
SAMPLE_ABOVE = 1 << 20  # `inspect`'s whole-checkpoint pass bins a strided sample of bigger tensors


def tensor_bytes(ref: TensorRef) -> int:
    """Bytes a tensor's values take, from its header alone; a dtype not in DTYPE_BYTES counts one byte each
    (the smallest element, so an unknown dtype never inflates a size)."""
    return ref.numel * DTYPE_BYTES.get(ref.dtype, 1)


@dataclass
class TensorStats:
    name: str
    shape: tuple[int, ...]
    dtype: str
    params: int
    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    sparsity: float  # share of exact zeros
    outliers: float  # share of finite values with |x - mean| > 6 std
    nonfinite: int
    edges: list[float]
    counts: list[int]
    sample_size: int | None = None  # values binned when the histogram is estimated from a sample

    @property
    def histogram_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"edges": self.edges, "counts": self.counts}
        if self.sample_size is not None:
            out["sample_size"] = self.sample_size
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "params": self.params,
            "stats": {
                "min": self.min,
                "max": self.max,
                "mean": self.mean,
                "std": self.std,
                "sparsity": self.sparsity,
                "outliers": self.outliers,
                "nonfinite": self.nonfinite,
            },
            "histogram": self.histogram_dict,
        }


def as_float_array(chunk: Any) -> Any:
    """A float32/float64 numpy view of a chunk (numpy or torch; half, bfloat16, integers and quantized
    tensors are widened)."""
    import numpy as np

    if isinstance(chunk, np.ndarray):
        return chunk if chunk.dtype in (np.float32, np.float64) else chunk.astype(np.float32)
    import torch

    if getattr(chunk, "is_quantized", False):
        chunk = chunk.dequantize()
    if chunk.dtype not in (torch.float32, torch.float64):
        chunk = chunk.to(torch.float32)
    return chunk.numpy()


def _as_float_tensor(chunk: Any) -> Any:
    """A flat float32 torch tensor of a chunk (zero-copy for float32 numpy arrays and tensors)."""
    import numpy as np
    import torch

    if isinstance(chunk, np.ndarray):
        chunk = torch.from_numpy(chunk if chunk.dtype != np.float64 else chunk.astype(np.float32))
    if getattr(chunk, "is_quantized", False):
        chunk = chunk.dequantize()
    if chunk.dtype != torch.float32:
        chunk = chunk.to(torch.float32)
    return chunk.reshape(-1)


def tensor_stats(
    ref: TensorRef,
    bins: int = DEFAULT_BINS,
    chunk_elements: int = CHUNK_ELEMENTS,
    sample_above: int | None = None,
) -> TensorStats:
    """Statistics of one tensor: range, mean, population std, sparsity and outliers over every value, and
    numpy.histogram's binning over [min, max].

    The per-chunk reductions run in torch (float32 within a chunk, merged across chunks in float64 by Chan
    et al.'s rule), which keeps both cores busy; they agree with numpy's float64 results to about 1e-6.
    The histogram is exact unless `sample_above` is set and the tensor has more values: then it bins an
    evenly strided sample of about `sample_above` values, scaled to the tensor's count (`sample_size` says
    so). Binning is the one step that cannot run near memory speed (about 65 M values/s per core for any
    scatter-add histogram here), so the whole-checkpoint pass of `inspect` samples big tensors while the
    Model tab's histogram of one tensor stays exact.
    """
    import numpy as np
    import torch

    n = ref.numel
    stride = 1 if sample_above is None or n <= sample_above else -(-n // sample_above)
    # Values kept for binning: the strided sample, or every value while the tensor is small (one read).
    keep = stride > 1 or n <= KEEP_ELEMENTS
    kept: list[Any] = []
    count = zeros = nonfinite = seen = 0
    mean = m2 = 0.0
    lo, hi = math.inf, -math.inf
    for raw in ref.chunks(chunk_elements):
        x = _as_float_tensor(raw)
        if keep:
            first = (-seen) % stride
            kept.append(x[first::stride].clone() if stride > 1 else x)  # a copy frees the chunk
        seen += x.numel()
        total = x.sum()
        if not bool(torch.isfinite(total)):
            finite = torch.isfinite(x)
            bad = x.numel() - int(torch.count_nonzero(finite))
            if bad:
                nonfinite += bad
                x = x[finite]
                total = x.sum()
        k = x.numel()
        zeros += k - int(torch.count_nonzero(x))
        if k == 0:
            continue
        c_mean = float(total) / k
        d = x - c_mean
        c_m2 = float(d.square_().sum())  # torch.sum is cascaded; BLAS dot loses ~1e-6
        c_lo, c_hi = torch.aminmax(x)
        delta = c_mean - mean
        merged = count + k
        mean += delta * k / merged
        m2 += c_m2 + delta * delta * count * k / merged
        count = merged
        lo, hi = min(lo, float(c_lo)), max(hi, float(c_hi))
    if count == 0:
        return TensorStats(
            ref.name, ref.shape, ref.dtype, n, None, None, None, None, zeros / n if n else 0.0, 0.0,
            nonfinite, [], [],
        )  # fmt: skip
    std = math.sqrt(m2 / count)
    a, b = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)  # numpy's rule for a constant tensor
    limit = OUTLIER_STD * std
    need_outliers = std > 0 and (mean - lo > limit or hi - mean > limit)

    def finite_values(x: Any) -> Any:
        return x[torch.isfinite(x)] if nonfinite else x

    def outliers_in(x: Any) -> int:
        return int(torch.count_nonzero((x - mean).abs_() > limit))

    counts = np.zeros(bins, dtype=np.int64)
    edges = None
    outliers = 0
    sample_size = None
    if keep:
        values = finite_values(torch.cat(kept)) if len(kept) > 1 else finite_values(kept[0])
        counts, edges = np.histogram(values.numpy(), bins=bins, range=(a, b))
        if stride > 1:
            sample_size = int(values.numel())
            counts = np.rint(counts * (count / max(sample_size, 1))).astype(np.int64)
    if need_outliers and stride == 1 and keep:
        outliers = outliers_in(values)
    elif not keep or need_outliers:  # one more read: exact histogram of a big tensor, or its outliers
        for raw in ref.chunks(chunk_elements):
            x = finite_values(_as_float_tensor(raw))
            if not keep:
                c, edges = np.histogram(x.numpy(), bins=bins, range=(a, b))
                counts += c
            if need_outliers:
                outliers += outliers_in(x)
    return TensorStats(
        name=ref.name,
        shape=ref.shape,
        dtype=ref.dtype,
        params=n,
        min=lo,
        max=hi,
        mean=mean,
        std=std,
        sparsity=zeros / n,
        outliers=outliers / count,
        nonfinite=nonfinite,
        edges=[float(e) for e in edges] if edges is not None else [],
        counts=counts.tolist(),
        sample_size=sample_size,
    )


@dataclass
class ModelSummary:
    tensors: int = 0
    parameters: int = 0
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    params_by_dtype: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())

    def add(self, ref: TensorRef) -> None:
        self.tensors += 1
        self.parameters += ref.numel
        self.bytes_by_dtype[ref.dtype] = self.bytes_by_dtype.get(ref.dtype, 0) + tensor_bytes(ref)
        self.params_by_dtype[ref.dtype] = self.params_by_dtype.get(ref.dtype, 0) + ref.numel

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensors": self.tensors,
            "parameters": self.parameters,
            "bytes": self.bytes,
            "bytes_by_dtype": self.bytes_by_dtype,
            "parameters_by_dtype": self.params_by_dtype,
            "seconds": round(self.seconds, 3),
            "gb_per_s": round(self.bytes / self.seconds / 1e9, 3) if self.seconds else None,
        }


def iter_weight_stats(
    model: LoadedModel,
    *,
    bins: int = DEFAULT_BINS,
    summary: ModelSummary | None = None,
    progress: Callable[[int, str], None] | None = None,
    sample_above: int | None = SAMPLE_ABOVE,
    workers: int | None = None,
) -> Iterator[TensorStats]:
    """Statistics of every weight tensor, in checkpoint order; fills `summary` as it goes.

    Tensors are read and reduced by `workers` threads (default: the CPU count, at most 4; torch runs one
    thread each meanwhile), at most one tensor ahead per worker, so memory stays bounded by a few chunks and samples: one thread's reads of
    the next tensor overlap the other's reductions (torch and file reads release the GIL). Histograms of
    tensors over `sample_above` values are estimated from a strided sample (see `tensor_stats`).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch

    started = time.perf_counter()
    n_workers = max(1, min(4, workers or usable_cores()))
    pending: deque[tuple[TensorRef, Future[TensorStats]]] = deque()
    # One torch thread per worker: torch's own threads on top of ours (or of any other load) oversubscribe
    # the cores, and its spinning threads then make every reduction several times slower (measured on a
    # loaded 2-core machine: 13.1 CPU-s per GB with torch's 2 threads, 1.3 with 2 workers of 1 thread).
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(n_workers, thread_name_prefix="weight-stats") as pool:
            i = 0
            for ref in model.tensors():
                pending.append((ref, pool.submit(tensor_stats, ref, bins, CHUNK_ELEMENTS, sample_above)))
                if len(pending) < n_workers:
                    continue
                yield from _finish(pending.popleft(), i, summary, progress)
                i += 1
            while pending:
                yield from _finish(pending.popleft(), i, summary, progress)
                i += 1
    finally:
        torch.set_num_threads(torch_threads)
    if summary is not None:
        summary.seconds = time.perf_counter() - started


def _finish(
    item: tuple[TensorRef, Any],
    i: int,
    summary: ModelSummary | None,
    progress: Callable[[int, str], None] | None,
) -> Iterator[TensorStats]:
    ref, future = item
    if summary is not None:
        summary.add(ref)
    if progress is not None:
        progress(i, ref.name)
    yield future.result()
