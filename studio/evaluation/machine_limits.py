"""What the machine can do at best: memory bandwidth (a STREAM triad) and matrix-multiply peaks.

A bench's numbers mean more beside the machine's limits: decoding an LLM at batch 1 reads every weight once
per token, so memory bandwidth / bytes read per token bounds its tokens/s; an encoder at batch 32 is
matrix multiplies, so the linear layers' operations per second against the GEMM peak at the same shapes
say how much of the arithmetic the runtime uses.

- Bandwidth: `a = b + s * c` over three float32 arrays far larger than the last-level cache (torch, one
  fused kernel, the run's threads); bytes moved are 3 arrays per pass (2 read, 1 written; the write's
  cache-line fill is not counted, as in STREAM). Best of N passes.
- FP32 peak: `torch.matmul` at MiniLM's linear-layer shapes (what the torch and float ONNX variants run).
- INT8 peak: ONNX Runtime's `MatMulInteger` (uint8 activations x int8 constant weights, int32 out) in a
  one-node graph, because the studio's INT8 encoder variants are ONNX Runtime graphs made by dynamic
  quantization, which runs exactly that kernel (DynamicQuantizeLinear feeding MatMulInteger).
- CPU flags: the ones that decide which kernels run (AVX2, AVX-512, VNNI, BF16, AMX), as the variants'
  manifests record them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# (label, M, K, N): MiniLM's linear layers at sequence length 128, batch 32 (M = 32 * 128 tokens) and
# batch 1; K x N is the weight: 384 x 384 (q, k, v, attention output), 384 x 1536 (FFN up), 1536 x 384
# (FFN down).
MINILM_SHAPES: tuple[tuple[str, int, int, int], ...] = (
    ("b32 384x384", 32 * 128, 384, 384),
    ("b32 384x1536", 32 * 128, 384, 1536),
    ("b32 1536x384", 32 * 128, 1536, 384),
    ("b1 384x1536", 128, 384, 1536),
)


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache of cpu0 as sysfs reports it (`32768K`, `36M`), or None where it cannot say."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def best_seconds(call: Callable[[], Any], repeats: int, min_seconds: float = 0.02) -> float:
    """The fastest time of one call: each of `repeats` rounds runs enough calls to last `min_seconds`
    (so a timer tick or a short stall is averaged out), and the best round is the machine at its best."""
    call()  # the first call allocates and, for ONNX Runtime, prepacks the weights
    t0 = time.perf_counter()
    call()
    once = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, int(min_seconds / once))
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def memory_bandwidth(
    threads: int | None = None, array_bytes: int | None = None, repeats: int = 5
) -> dict[str, Any]:
    """STREAM-style triad bandwidth in GB/s (1e9 bytes). Each array defaults to 8x the last-level cache
    (at least 128 MiB, at most 1 GiB), so every pass streams from memory rather than from a cache."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if array_bytes is None:
        llc = last_level_cache_bytes() or 32 * 1024**2
        array_bytes = min(max(8 * llc, 128 * 1024**2), 1024**3)
    n = max(1, array_bytes // 4)
    b = torch.ones(n, dtype=torch.float32)
    c = torch.full((n,), 2.0, dtype=torch.float32)
    a = torch.empty(n, dtype=torch.float32)
    seconds = best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a), repeats)
    moved = 3 * n * 4
    return {
        "triad_gb_per_s": moved / seconds / 1e9,
        "array_bytes": n * 4,
        "last_level_cache_bytes": last_level_cache_bytes(),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "method": "torch.add(b, c, alpha=s, out=a) on float32 arrays; 3 arrays moved per pass; best pass",
    }


def _matmul_integer_session(k: int, n: int, threads: int) -> Any:
    """A one-node ONNX graph `MatMulInteger(A uint8 [M, K], B int8 [K, N] constant)`: the kernel ONNX
    Runtime runs for the studio's dynamically quantized INT8 MatMuls (B constant, so it is prepacked)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-127, 128, size=(k, n), dtype=np.int8), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])],
        "matmul_integer",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, ["M", n])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def gemm_peak(
    threads: int | None = None,
    shapes: Sequence[tuple[str, int, int, int]] = MINILM_SHAPES,
    repeats: int = 5,
) -> dict[str, Any]:
    """FP32 (torch.matmul) and INT8 (ONNX Runtime MatMulInteger) multiply-add rates in GOPS (1e9 operations,
    a multiply-add counting 2) at each shape, and the best of them as each precision's peak."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for label, m, k, n in shapes:
        ops = 2.0 * m * k * n
        x = torch.randn(m, k)
        w = torch.randn(k, n)
        session = _matmul_integer_session(k, n, threads)
        feed = {"A": rng.integers(0, 256, size=(m, k), dtype=np.uint8)}

        def float_call(x: Any = x, w: Any = w) -> Any:
            return torch.matmul(x, w)

        def int8_call(session: Any = session, feed: Any = feed) -> Any:
            return session.run(None, feed)

        with torch.inference_mode():
            fp32 = best_seconds(float_call, repeats)
        int8 = best_seconds(int8_call, repeats)
        rows.append(
            {
                "shape": label,
                "m": m,
                "k": k,
                "n": n,
                "fp32_gops": ops / fp32 / 1e9,
                "int8_gops": ops / int8 / 1e9,
            }
        )
    return {
        "shapes": rows,
        "fp32_peak_gops": max(float(r["fp32_gops"]) for r in rows),
        "int8_peak_gops": max(float(r["int8_gops"]) for r in rows),
        "threads": threads,
        "fp32_kernel": "torch.matmul",
        "int8_kernel": "onnxruntime MatMulInteger (uint8 x int8 -> int32, constant weight), the kernel of the "
        "studio's dynamically quantized ONNX Runtime INT8 variants",
    }


def cpu_flags() -> list[str]:
    """The kernel-deciding CPU flags, read the way variant manifests record the machine."""
    from studio.variants import machine_info

    return list(machine_info()["cpu_flags"])


def machine_limits(
    threads: int | None = None,
    *,
    array_bytes: int | None = None,
    shapes: Sequence[tuple[str, int, int, int]] = MINILM_SHAPES,
    repeats: int = 5,
) -> dict[str, Any]:
    """Bandwidth, GEMM peaks and CPU flags in one record (what the benches print and write)."""
    return {
        "memory_bandwidth": memory_bandwidth(threads, array_bytes, repeats),
        "gemm": gemm_peak(threads, shapes, repeats),
        "cpu_flags": cpu_flags(),
    }


TOY_SHAPES: tuple[tuple[str, int, int, int], ...] = (("toy 64x64", 64, 64, 64), ("toy 64x128", 32, 64, 128))


def toy_machine_limits(threads: int | None = None) -> dict[str, Any]:
    """The same record at sizes a test can afford (an 8 MiB triad, small matrices): numbers, not limits."""
    return machine_limits(threads, array_bytes=8 * 1024**2, shapes=TOY_SHAPES, repeats=2)
