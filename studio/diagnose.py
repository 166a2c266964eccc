"""`model-studio diagnose`: why a variant is not faster (or not as good), as a ranked list of causes.

Each cause has `what` (one sentence), `evidence` (the nodes and numbers it rests on), `cost` (the fraction of
the profiled run time it accounts for) and `fix` (a pipeline change: a technique id and its params, or an
`evaluate` setting), so the GUI can put the block into the pipeline with one click. The causes come from the
node profile of this machine and the precision of every node of the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studio.cpus import usable_cores
from studio.errors import BadInput
from studio.inspection.graph import MATMUL_OPS, QDQ_OPS, Graph, GraphNode

# Nodes ONNX Runtime's quantizer adds around an integer MatMul besides the Q/DQ ops themselves: the scale
# products and the casts of its int32 result.
_QUANT_GLUE = ("_quant_scales_mul", "_output_scale_mul", "_quantized_cast", "_QuantizeLinear")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# A time cause below this share of the run is noise to the person reading the list (ORT fuses most Q/DQ
# nodes into its integer kernels at load, so a quantized graph's Q/DQ nodes often cost a fraction of 1%).
MIN_COST = 0.01
# Causes shown whatever they cost: where the error jumps, and how near the GEMMs run to the peak (at the
# peak it costs nothing, and that the run is compute-bound is the news).
ALWAYS_SHOWN = ("error-jump", "gemm-peak")
# ONNX Runtime's transformer fusions (onnx.optimize): a graph holding these is fused already
FUSED_OPS = frozenset(
    {
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "SkipLayerNormalization",
        "EmbedLayerNormalization",
    }
)
# Linear layers: matrix products with a weight, in float or integer, fused (Attention's QKV) or not.
LINEAR_OPS = (MATMUL_OPS - {"Conv", "Conv2d"}) | {
    "MatMulInteger",
    "QAttention",
    "MatMulNBits",
    "QGemm",
    "DynamicQuantizeMatMul",
}
# At this share of the GEMM peak or more, the linear layers are compute-bound.
COMPUTE_BOUND_SHARE = 0.5
# The batch the GEMM cause times, as the benches' large batch does (MiniLM at batch 32).
GEMM_BATCH = 32


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo cannot be read: not Linux)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def float_matmul_cause(graph: Graph, shares: dict[str, float]) -> dict[str, Any] | None:
    quantized = any((n.precision or "").startswith("int") for n in graph.nodes)
    floats = [
        n
        for n in graph.nodes
        if n.op in MATMUL_OPS
        and n.weights
        and n.precision in ("float32", "float (excluded)", "bfloat16", "float16")
    ]
    if not floats:
        return None
    listed: list[dict[str, Any]] = [{"name": n.name, "time_share": shares.get(n.name, 0.0)} for n in floats]
    listed.sort(key=lambda r: -r["time_share"])
    cost = sum(r["time_share"] for r in listed)
    if graph.kind == "torch":
        fix = {"technique": "quantize.dynamic_int8", "params": {}}
    elif quantized:  # they were excluded: quantizing them too means excluding none
        fix = {"technique": "onnx.quantize_dynamic", "params": {"per_channel": True, "exclude_nodes": []}}
    else:
        fix = {"technique": "onnx.quantize_dynamic", "params": {"per_channel": True}}
    left = "stayed unquantized" if quantized else "are not quantized"
    return {
        "kind": "float-matmuls",
        "what": f"{cost:.0%} of time in {len(listed)} float MatMuls that {left}",
        "evidence": {"nodes": listed},
        "cost": cost,
        "fix": fix,
    }


def qdq_cause(graph: Graph, shares: dict[str, float]) -> dict[str, Any] | None:
    glue = [n for n in graph.nodes if n.op in QDQ_OPS or n.name.endswith(_QUANT_GLUE)]
    if not glue:
        return None
    cost = sum(shares.get(n.name, 0.0) for n in glue)
    around = sum(1 for n in graph.nodes if (n.precision or "").startswith("int") and n not in glue)
    return {
        "kind": "qdq",
        "what": f"Q/DQ pairs around {around} nodes cost {cost:.0%}",
        "evidence": {
            "nodes": len(glue),
            "slowest": [
                {"name": n.name, "op": n.op, "time_share": shares.get(n.name, 0.0)}
                for n in sorted(glue, key=lambda n: -shares.get(n.name, 0.0))[:10]
            ],
        },
        "cost": cost,
        # integer kernels that quantize their activation inside (one scale per block), without separate nodes
        "fix": {
            "technique": "onnx.quantize_blockwise",
            "params": {"bits": 8, "block_size": 128, "accuracy_level": 4},
        },
    }


def threads_cause(used: int | None, available: int) -> dict[str, Any] | None:
    if not used or used >= available:
        return None
    return {
        "kind": "threads",
        "what": f"threads: {used} of {available} cores used",
        "evidence": {"threads_used": used, "cores": available},
        # at best the run spreads over every core: what is left idle is the most it can cost
        "cost": 1.0 - used / available,
        "fix": {"evaluate": {"threads": available}},
    }


def bf16_cause(graph: Graph, shares: dict[str, float], flags: set[str]) -> dict[str, Any] | None:
    bf16 = [n for n in graph.nodes if n.precision == "bfloat16"]
    if not bf16 or any(f in flags for f in BF16_FLAGS):
        return None
    cost = sum(shares.get(n.name, 0.0) for n in bf16)
    fix = (
        {"technique": "quantize.dynamic_int8", "params": {}, "instead_of": "precision.half"}
        if graph.kind == "torch"
        else {"technique": "onnx.quantize_dynamic", "params": {"per_channel": True}}
    )
    return {
        "kind": "bf16-emulated",
        "what": "BF16 without hardware support on this CPU: emulated",
        "evidence": {"nodes": len(bf16), "cpu_flags_missing": list(BF16_FLAGS), "time_share": cost},
        "cost": cost,
        "fix": fix,
    }


def error_cause(diff: dict[str, Any], graph: Graph, shares: dict[str, float]) -> dict[str, Any] | None:
    """With --against: the layer where the error first jumps, and the nodes to keep in float for it."""
    jump = diff.get("first_jump")
    if jump is None:
        return None
    layer = next(x for x in diff["layers"] if x["name"] == jump)
    nodes = [n.name for n in graph.nodes if jump in n.modules() and n.op not in ("Add", "Mul")]
    fix: dict[str, Any] = (
        {"technique": "onnx.quantize_dynamic", "params": {"per_channel": True, "exclude_nodes": nodes}}
        if graph.kind == "onnx" and nodes
        else {"technique": "quantize.dynamic_int8", "params": {}, "keep_float": [jump]}
    )
    return {
        "kind": "error-jump",
        "what": f"the error first jumps at {jump} (relative error {layer['relative_error']:.3g}, "
        f"cosine {layer['cosine']:.4f})",
        "evidence": {"layer": layer, "nodes": nodes},
        "cost": sum(shares.get(n, 0.0) for n in nodes),  # the time keeping it in float would take
        "fix": fix,
    }


def batch_tokens(model: Any, examples: Sequence[Any], sequence_length: int) -> int:
    """Token positions in the batch the family makes of `examples` (padding included: the GEMMs compute
    those rows too)."""
    from studio.families import family_for

    batch = family_for(model).batch(model, examples, sequence_length)
    first = next((v for v in batch.inputs.values() if getattr(v, "ndim", 0) == 2), None)
    return int(first.shape[0] * first.shape[1]) if first is not None else len(examples) * sequence_length


def linear_macs(node: GraphNode) -> int:
    """Multiply-adds per token of a linear node: K x N of its weight, 0 for a node that is not a linear
    layer."""
    k, n = weight_matrix(node) if node.op in LINEAR_OPS else (0, 0)
    return k * n


def weight_matrix(node: GraphNode) -> tuple[int, int]:
    """(K, N) of a node's largest 2-D weight: the `K`, `N` attributes of a packed 4-bit MatMulNBits, whose
    weight tensor is bytes; (0, 0) without one."""
    if "K" in node.attributes and "N" in node.attributes:
        return int(node.attributes["K"]), int(node.attributes["N"])
    matrices = [w["shape"] for w in node.weights if len(w["shape"]) == 2]
    if not matrices:
        return 0, 0
    k, n = max(matrices, key=lambda s: int(s[0]) * int(s[1]))
    return int(k), int(n)


def gemm_cause(
    graph: Graph,
    shares: dict[str, float],
    total_ms: float,
    batch: int,
    tokens: int,
    limits: dict[str, Any],
) -> dict[str, Any] | None:
    """How near the linear layers run to this machine's GEMM peak at the profiled batch.

    Their operations (2 x K x N per token each) over their profiled time, against the INT8 peak when most
    of their work is integer and the FP32 peak otherwise (`evaluation.machine_limits.gemm_peak`). Near the
    peak they are compute-bound: only fewer or cheaper operations help. Far below it, the roofline decides:
    memory-bound when streaming their weights and activations at the triad bandwidth takes longer than the
    arithmetic at the peak, else bound by neither (small kernels, glue, threads)."""
    linear = [(n, linear_macs(n)) for n in graph.nodes if linear_macs(n) > 0]
    timed = [(n, macs) for n, macs in linear if shares.get(n.name, 0.0) > 0]
    if not timed or total_ms <= 0 or tokens <= 0:
        return None
    int_macs = sum(m for n, m in timed if (n.precision or "").startswith("int"))
    macs = sum(m for _, m in timed)
    precision = "INT8" if int_macs * 2 >= macs else "FP32"
    gemm = limits.get("gemm", limits)
    peak_gops = float(gemm["int8_peak_gops" if precision == "INT8" else "fp32_peak_gops"])
    share_of_run = sum(shares[n.name] for n, _ in timed)
    seconds = total_ms * share_of_run / 1000.0
    ops = 2.0 * macs * tokens
    gops = ops / seconds / 1e9
    share = min(1.0, gops / peak_gops) if peak_gops > 0 else 0.0
    weight_bytes = sum(
        m * (1 if (n.precision or "").startswith("int") else 4) for n, m in timed
    )  # int4 packs tighter; counting a byte keeps the bound conservative
    activation_bytes = sum(
        4 * tokens * sum(weight_matrix(n)) for n, _ in timed
    )  # float32 in and out of every product
    bandwidth = float((limits.get("memory_bandwidth") or {}).get("triad_gb_per_s") or 0.0)
    compute_s = ops / (peak_gops * 1e9) if peak_gops > 0 else 0.0
    memory_s = (weight_bytes + activation_bytes) / (bandwidth * 1e9) if bandwidth > 0 else 0.0
    if share >= COMPUTE_BOUND_SHARE:
        verdict = "compute-bound"
    elif memory_s > compute_s:
        verdict = "memory-bound"
    else:
        verdict = "far below the peak yet not memory-bound: bound by overhead (small kernels, glue, threads)"
    return {
        "kind": "gemm-peak",
        "what": f"batch {batch} GEMMs reach {share:.0%} of this machine's {precision} peak: {verdict}",
        "evidence": {
            "batch": batch,
            "tokens": tokens,
            "linear_nodes": len(timed),
            "macs_per_token": macs,
            "linear_ms": seconds * 1000.0,
            "linear_gops": gops,
            "peak_gops": peak_gops,
            "peak_precision": precision,
            "peak_share": share,
            "compute_bound_ms": compute_s * 1000.0,
            "memory_bound_ms": memory_s * 1000.0,
            "triad_gb_per_s": bandwidth or None,
            "nodes": [
                {"name": n.name, "time_share": shares[n.name]}
                for n, _ in sorted(timed, key=lambda x: -shares[x[0].name])
            ],
        },
        # what running the linear layers at the peak would save of the run
        "cost": share_of_run * (1.0 - share),
        "fix": _gemm_fix(graph, precision, verdict),
    }


def _gemm_fix(graph: Graph, precision: str, verdict: str) -> dict[str, Any]:
    """Fewer operations when they already run at the peak in INT8 (structured pruning of the FFNs, which
    the torch stage does before the export); INT8 products for FP32 ones, whose peak is several times
    lower and whose weights are four times the bytes; fused kernels when neither bound holds."""
    if precision == "FP32":
        if graph.kind == "torch":
            return {"technique": "quantize.dynamic_int8", "params": {}}
        return {"technique": "onnx.quantize_dynamic", "params": {"per_channel": True}}
    if verdict == "compute-bound":
        return {"technique": "prune.structured", "params": {"fraction": 0.3}, "before": "export.onnx"}
    if verdict == "memory-bound":
        return {
            "technique": "onnx.quantize_blockwise",
            "params": {"bits": 4, "block_size": 32, "accuracy_level": 4},
        }
    if any(n.op in FUSED_OPS for n in graph.nodes):
        # already fused: what is left is fewer (smaller) products, the one lever a pipeline step adds
        return {"technique": "prune.structured", "params": {"fraction": 0.3}, "before": "export.onnx"}
    return {"technique": "onnx.optimize", "params": {}}


def diagnose(
    model: Any,
    *,
    against: Any = None,
    examples: Sequence[Any] | None = None,
    sequence_length: int = 32,
    threads: int | None = None,
    flags: set[str] | None = None,
    gemm_batch: int | None = None,
    limits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ranked causes of an opened checkpoint's run time on this machine (and, against a reference, of
    its error), costliest first.

    With `gemm_batch` (the verb's default: `GEMM_BATCH`), that many examples (the given ones repeated) are
    profiled once more for the GEMM cause; `limits` is a `machine_limits` record (or its `gemm` part),
    measured here at MiniLM's shapes when not given (seconds)."""
    from studio.evaluation.data import load_examples
    from studio.evaluation.node_profile import profile_model
    from studio.inspection.graph import graph_of

    examples = list(examples) if examples is not None else load_examples("builtin:sentences", 4)
    graph = graph_of(model)
    profile = profile_model(model, examples, sequence_length=sequence_length, threads=threads)
    shares = profile.shares
    causes = [
        float_matmul_cause(graph, shares),
        qdq_cause(graph, shares),
        threads_cause(profile.threads_used, usable_cores()),
        bf16_cause(graph, shares, cpu_flags() if flags is None else flags),
    ]
    if gemm_batch and examples:
        batch_examples = [examples[i % len(examples)] for i in range(gemm_batch)]
        at_batch = (
            profile
            if len(batch_examples) == len(examples)
            else profile_model(model, batch_examples, sequence_length=sequence_length, threads=threads)
        )
        if limits is None:
            from studio.evaluation.machine_limits import gemm_peak, memory_bandwidth

            limits = {"gemm": gemm_peak(threads), "memory_bandwidth": memory_bandwidth(threads)}
        tokens = batch_tokens(model, batch_examples, sequence_length)
        causes.append(gemm_cause(graph, at_batch.shares, at_batch.total_ms, gemm_batch, tokens, limits))
    diff, unmatched = None, None
    if against is not None:
        from studio.inspection.layer_diff import layer_diff

        try:
            diff = layer_diff(against, model, examples=examples, sequence_length=sequence_length)
        except BadInput as exc:  # no layer matched (a fused graph): the time causes still stand
            unmatched = exc.message
        else:
            causes.append(error_cause(diff, graph, shares))
    kept = [c for c in causes if c is not None and (c["cost"] >= MIN_COST or c["kind"] in ALWAYS_SHOWN)]
    ranked = sorted(kept, key=lambda c: -c["cost"])
    summary = {"total_ms": profile.total_ms, "threads_used": profile.threads_used, "cores": usable_cores()}
    out: dict[str, Any] = {"causes": ranked, "profile": summary}
    if diff is not None:
        out["first_jump"] = diff["first_jump"]
    if unmatched is not None:
        out["against_error"] = unmatched
    return out
