"""A/B comparison of two variants (or a variant and its original): metrics side by side with ratios and
latency significance, per-layer weight differences, and the examples where the two disagree most."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio.checkpoints.stage import stage_of
from studio.errors import BadInput
from studio.evaluation.latency import significant
from studio.variant_rows import kv_cache_bytes, size_mb

# Names the same weight gets in different artifacts: quantized packed params, ONNX initializers, pruning.
_NAME_RULES = [
    (re.compile(r"\._packed_params\._packed_params\.0$"), ".weight"),
    (re.compile(r"\._packed_params\._packed_params\.1$"), ".bias"),
    (re.compile(r"\.weight_orig$"), ".weight"),
]


def canonical_name(name: str) -> str:
    for pattern, repl in _NAME_RULES:
        name = pattern.sub(repl, name)
    return name


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Comparable numbers of a variant's metrics, under stable dotted names with units: the A/B table's
    rows and the names other commands use (`model-studio search` objectives)."""
    out: dict[str, float] = {}
    size = size_mb({"metrics": metrics})
    if size is not None:
        out["size_mb"] = size
    if "peak_memory_mb" in metrics:
        out["peak_memory_mb"] = float(metrics["peak_memory_mb"])
    for b, lat in (metrics.get("latency_ms") or {}).items():
        for k in ("p50", "p95", "p99", "mean"):
            if k in lat:
                out[f"latency_ms.b{b}.{k}"] = float(lat[k])
    for b, v in (metrics.get("throughput_per_s") or {}).items():
        out[f"throughput_per_s.b{b}"] = float(v)
    gen = metrics.get("generation") or {}
    for b, g in gen.items():
        if isinstance(g, dict):
            for k in ("ttft_ms", "tpot_ms"):
                if "p50" in g.get(k, {}):
                    out[f"{k}.b{b}.p50"] = float(g[k]["p50"])
            if "decode_tokens_per_s" in g:
                out[f"decode_tokens_per_s.b{b}"] = float(g["decode_tokens_per_s"])
    kv = kv_cache_bytes({"metrics": metrics})
    if kv is not None:
        out["kv_cache_mb"] = kv / 1e6
        out["kv_cache_bytes"] = kv
    for k, v in (metrics.get("quality") or {}).items():
        if isinstance(v, (int, float)):
            out[f"quality.{k}"] = float(v)
    return out


LOWER_IS_BETTER = (
    "size_mb",
    "peak_memory_mb",
    "latency_ms",
    "ttft_ms",
    "tpot_ms",
    "kv_cache_mb",
    "kv_cache_bytes",
    "quality.kl_divergence",
    "quality.perplexity",
    "quality.rmse",
)


def _quality_of(row: dict[str, Any]) -> dict[str, Any]:
    """A baseline's quality is the reference itself; take the reference values its children recorded."""
    if row["kind"] == "baseline":
        return {}
    return row["metrics"].get("quality", {})


def metric_table(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    ma = flat_metrics({**a["metrics"], "quality": _quality_of(a) or b["metrics"].get("baseline_quality", {})})
    mb = flat_metrics({**b["metrics"], "quality": _quality_of(b) or a["metrics"].get("baseline_quality", {})})
    rows = []
    for name in sorted(set(ma) | set(mb), key=_metric_order):
        va, vb = ma.get(name), mb.get(name)
        ratio = vb / va if va not in (None, 0) and vb is not None else None
        better = None
        if va is not None and vb is not None and not math.isclose(va, vb, rel_tol=1e-6, abs_tol=1e-9):
            lower = name.startswith(LOWER_IS_BETTER)
            better = "B" if (vb < va) == lower else "A"
        rows.append({"metric": name, "a": va, "b": vb, "ratio_b_over_a": ratio, "better": better})
    return rows


def _metric_order(name: str) -> tuple[int, str]:
    order = ("size", "latency", "throughput", "peak", "quality")
    return next((i for i, p in enumerate(order) if name.startswith(p)), len(order)), name


def latency_significance(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {}
    la, lb = a["metrics"].get("latency_ms", {}), b["metrics"].get("latency_ms", {})
    for batch in sorted(set(la) & set(lb), key=int):
        res = significant(la[batch], lb[batch])
        res["speedup_b_over_a"] = la[batch]["p50"] / lb[batch]["p50"] if lb[batch]["p50"] else None
        out[batch] = res
    return out


# ------------------------------------------------------------------------------------------------ weights


def artifact_path(row: dict[str, Any]) -> Path:
    path = Path(row["artifact"])
    if row["kind"] == "baseline" and not path.exists():
        return Path(row["model"])
    return path


def open_row(row: dict[str, Any], *, trust: bool = False) -> Any:
    """The checkpoint of a workspace row. A workspace can come from someone else, so the recipe it records
    never grants trust: only the caller (the person) can."""
    from studio.checkpoints import open_checkpoint

    if row.get("missing"):
        raise BadInput(f"variant {row['id']}: its files are gone from the workspace ({row['artifact']})")
    if row["kind"] == "baseline":
        return open_checkpoint(row["model"], trust=trust)
    if row["kind"] == "executorch":
        # A .pte keeps no named weights and is no checkpoint: the model it was made from says how to feed it
        # (tokenizer, family), the program itself is what runs (`row_runner`), and no weights are compared.
        source = open_checkpoint(row["model"], trust=trust)
        note = f"an ExecuTorch program ({artifact_path(row).name}): its weights are not listed by name"
        return dataclasses.replace(source, tensor_source=lambda: iter(()), notes=[*source.notes, note])
    return open_checkpoint(artifact_path(row))


def row_runner(row: dict[str, Any], model: Any) -> Any:
    """A runner of a workspace row's artifact, `model` being what `open_row` opened for it."""
    from studio.evaluation.measure import runner_for

    if row["kind"] == "executorch":
        return runner_for("executorch", artifact_path(row), model)
    kind = "tensorrt" if row["kind"] == "tensorrt" and stage_of(model) == "torch" else stage_of(model)
    return runner_for(kind, model.module if kind == "torch" else model.path, model)


def tensor_refs(model: Any) -> dict[str, Any]:
    """A checkpoint's tensors by canonical name (what the same weight is called in every artifact)."""
    return {canonical_name(ref.name): ref for ref in model.tensors()}


def weight_differences(a_model: Any, b_model: Any, limit: int | None = None) -> dict[str, Any]:
    """Per-layer differences of weights present in both (by canonical name)."""
    return layer_differences(tensor_refs(a_model), tensor_refs(b_model), limit)


def layer_differences(
    a_refs: dict[str, Any], b_refs: dict[str, Any], limit: int | None = None
) -> dict[str, Any]:
    """Per-layer differences of the tensors present in both: relative L2 change, max abs change, sparsity
    before and after; shape changes (pruning) and layers present in one only are listed."""
    layers: list[dict[str, Any]] = []
    for name, ra in a_refs.items():
        rb = b_refs.get(name)
        if rb is None or ra.numel < 2:
            continue
        if tuple(ra.shape) != tuple(rb.shape):
            layers.append(
                {
                    "name": name,
                    "shape_a": list(ra.shape),
                    "shape_b": list(rb.shape),
                    "change": "shape",
                    "relative_l2": None,
                }
            )
            continue
        ta, tb = _dense(ra.load()), _dense(rb.load())
        diff = (tb - ta).double()
        norm = float(ta.double().norm())
        layers.append(
            {
                "name": name,
                "shape_a": list(ra.shape),
                "shape_b": list(rb.shape),
                "change": "values" if bool((diff != 0).any()) else "none",
                "relative_l2": float(diff.norm()) / norm if norm > 0 else float(diff.norm()),
                "max_abs": float(diff.abs().max()),
                "changed_share": float((diff != 0).double().mean()),
                "sparsity_a": float((ta == 0).double().mean()),
                "sparsity_b": float((tb == 0).double().mean()),
                "dtype_a": ra.dtype,
                "dtype_b": rb.dtype,
            }
        )
    layers.sort(key=lambda r: -(r["relative_l2"] if r["relative_l2"] is not None else math.inf))
    return {
        "matched": sum(1 for n in a_refs if n in b_refs),
        "only_a": sorted(n for n in a_refs if n not in b_refs)[:50],
        "only_b": sorted(n for n in b_refs if n not in a_refs)[:50],
        "layers": layers[:limit] if limit else layers,
    }


def _dense(t: Any) -> Any:
    if getattr(t, "is_quantized", False):
        t = t.dequantize()
    return t.float()


# ------------------------------------------------------------------------------------------------ examples


def disagreements(
    rows: tuple[dict[str, Any], dict[str, Any]],
    models: tuple[Any, Any],
    data: str,
    n: int,
    seq_len: int,
    k: int = 5,
) -> list[dict[str, Any]]:
    """Run A and B (rows and their opened checkpoints) on the same examples in lockstep and return the k
    where they differ most."""
    from studio.evaluation.data import load_examples
    from studio.evaluation.measure import quality_batches
    from studio.evaluation.quality import QualityAccumulator

    examples = load_examples(data, n)
    runners = [row_runner(row, model) for row, model in zip(rows, models, strict=True)]
    ref_model = models[0] if models[0].format != "onnx" or models[1].format == "onnx" else models[1]
    acc = QualityAccumulator(ref_model.family, examples)
    for batch in quality_batches(ref_model, examples, seq_len):
        acc.add(batch, runners[0](batch), runners[1](batch))
    return acc.worst(k)


def same_run_latency(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A baseline compared with one of its variants gets the latency timed in that variant's run (in turns
    with it, `baseline_latency_ms`), not the latest run's: both numbers then come from the same minutes."""

    def timed_with(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
        timed = child["metrics"].get("baseline_latency_ms")
        if base["kind"] != "baseline" or child.get("parent") != base["id"] or not timed:
            return base
        throughput = {k: v["throughput_per_s"] for k, v in timed.items() if "throughput_per_s" in v}
        return {**base, "metrics": {**base["metrics"], "latency_ms": timed, "throughput_per_s": throughput}}

    return timed_with(a, b), timed_with(b, a)


def compare(
    workspace: Any, a: str, b: str, *, weights: bool = True, examples: int = 32, data: str | None = None
) -> dict[str, Any]:
    """`model-studio compare`: the A/B of two workspace rows, each checkpoint opened once (and only when
    the weights or the examples need it)."""
    ra, rb = workspace.get(a), workspace.get(b)
    models = (open_row(ra), open_row(rb)) if weights or examples else None
    refs = (tensor_refs(models[0]), tensor_refs(models[1])) if models and weights else None
    return comparison((ra, rb), models, refs, examples=examples, data=data)


def comparison(
    rows: tuple[dict[str, Any], dict[str, Any]],
    models: tuple[Any, Any] | None,
    refs: tuple[dict[str, Any], dict[str, Any]] | None,
    *,
    examples: int,
    data: str | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """The A/B of two rows whose checkpoints the caller opened: metrics with ratios and latency
    significance, the weight differences when `refs` (the tensors by canonical name) are given, and the
    examples that differ most when `examples` > 0."""
    ra, rb = same_run_latency(*rows)
    out: dict[str, Any] = {
        "a": {k: ra[k] for k in ("id", "kind", "parent", "model", "artifact")},
        "b": {k: rb[k] for k in ("id", "kind", "parent", "model", "artifact")},
        "metrics": metric_table(ra, rb),
        "latency_significance": latency_significance(ra, rb),
    }
    recipe = rb["recipe"] or ra["recipe"] or {}
    seq_len = int(recipe.get("evaluate", {}).get("sequence_length", 128))
    data = data or recipe.get("data", {}).get("evaluation", "builtin:sentences")
    if refs is not None:
        if progress is not None:
            progress(0.1, "comparing their weights…")
        out["weights"] = layer_differences(*refs)
    if examples and models is not None:
        if progress is not None:
            progress(0.5, f"running A and B on {examples} examples…")
        out["disagreements"] = disagreements((ra, rb), models, data, examples, seq_len)
        out["disagreements_data"] = {"data": data, "examples": examples, "sequence_length": seq_len}
    return out
