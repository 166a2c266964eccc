"""`model-studio diagnose`: why a variant is not faster (or not as good), as a ranked list of causes.

Each cause has `what` (one sentence), `evidence` (the nodes and numbers it rests on), `cost` (the fraction of
the profiled run time it accounts for) and `fix` (a pipeline change: a technique id and its params, or an
`evaluate` setting), so the GUI can put the block into the pipeline with one click. The causes come from the
node profile of this machine and the precision of every node of the graph.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studio.errors import BadInput
from studio.inspection.graph import MATMUL_OPS, QDQ_OPS, Graph

# Nodes ONNX Runtime's quantizer adds around an integer MatMul besides the Q/DQ ops themselves: the scale
# products and the casts of its int32 result.
_QUANT_GLUE = ("_quant_scales_mul", "_output_scale_mul", "_quantized_cast", "_QuantizeLinear")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# A time cause below this share of the run is noise to the person reading the list (ORT fuses most Q/DQ
# nodes into its integer kernels at load, so a quantized graph's Q/DQ nodes often cost a fraction of 1%).
MIN_COST = 0.01


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo cannot be read: not Linux)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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


def diagnose(
    model: Any,
    *,
    against: Any = None,
    examples: Sequence[Any] | None = None,
    sequence_length: int = 32,
    threads: int | None = None,
    flags: set[str] | None = None,
) -> dict[str, Any]:
    """The ranked causes of an opened checkpoint's run time on this machine (and, against a reference, of
    its error), costliest first."""
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
        threads_cause(profile.threads_used, cores()),
        bf16_cause(graph, shares, cpu_flags() if flags is None else flags),
    ]
    diff, unmatched = None, None
    if against is not None:
        from studio.inspection.layer_diff import layer_diff

        try:
            diff = layer_diff(against, model, examples=examples, sequence_length=sequence_length)
        except BadInput as exc:  # no layer matched (a fused graph): the time causes still stand
            unmatched = exc.message
        else:
            causes.append(error_cause(diff, graph, shares))
    kept = [c for c in causes if c is not None and (c["cost"] >= MIN_COST or c["kind"] == "error-jump")]
    ranked = sorted(kept, key=lambda c: -c["cost"])
    summary = {"total_ms": profile.total_ms, "threads_used": profile.threads_used, "cores": cores()}
    out: dict[str, Any] = {"causes": ranked, "profile": summary}
    if diff is not None:
        out["first_jump"] = diff["first_jump"]
    if unmatched is not None:
        out["against_error"] = unmatched
    return out
