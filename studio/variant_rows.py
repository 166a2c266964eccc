"""What a row of the workspace means: its latency, throughput, size, steps, label, quality score and
place on a Pareto front. The Compare tab, the HTML report and `model-studio compare` all read rows through
these helpers, so a number means the same thing wherever it is shown.

A workspace collects the variants of every model a user ran pipelines on. Their quality numbers are
comparable only within one model and one metric (the fidelity cosine of an embedding model and the top-1
agreement of a language model are different scales), and each model has its own original. These helpers
name a row's model and metric, so views can group or filter by them and never rank across them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import PurePath
from typing import Any

# the headline quality metrics, in the order a row's quality is looked up
QUALITY_KEYS = ("fidelity_cosine", "top1_agreement", "output_cosine")

METRIC_NAMES = {
    "fidelity_cosine": "cosine",
    "top1_agreement": "top-1 agreement",
    "output_cosine": "output cosine",
}


def latency(row: dict[str, Any], batch: str, key: str = "p50") -> float | None:
    """Milliseconds per batch of `batch` (a percentile such as p50 or p95), or None when not timed."""
    value = (row["metrics"].get("latency_ms") or {}).get(str(batch), {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def throughput(row: dict[str, Any], batch: str) -> float | None:
    """Examples per second at batch size `batch`; older rows kept it beside the latency percentiles."""
    value = (row["metrics"].get("throughput_per_s") or {}).get(str(batch))
    if value is None:
        value = (row["metrics"].get("latency_ms") or {}).get(str(batch), {}).get("throughput_per_s")
    return float(value) if isinstance(value, (int, float)) else None


def size_mb(row: dict[str, Any]) -> float | None:
    """Size of the artifact on disk in megabytes (10⁶ bytes), or None when not measured."""
    value = row["metrics"].get("size_bytes")
    return value / 1e6 if isinstance(value, (int, float)) else None


def batch_sizes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every batch size any row was timed at, smallest first (as the strings the metrics are keyed by)."""
    found = {str(b) for r in rows for b in (r["metrics"].get("latency_ms") or {})}
    return sorted(found, key=lambda b: int(b) if b.isdigit() else 1 << 30)


def steps(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The pipeline steps that made the row (none for an original)."""
    return list((row.get("recipe") or {}).get("steps") or [])


def steps_text(row: dict[str, Any]) -> str:
    """The step techniques joined by arrows; empty when the row has none."""
    return " → ".join(s["technique"] for s in steps(row))


def quality_score(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> tuple[str, float | None]:
    """The headline quality number of a row: fidelity cosine, top-1 agreement, or 1 for the original."""
    q = row["metrics"].get("quality", {})
    for key in QUALITY_KEYS:
        if key in q:
            return key, float(q[key])
    if row["kind"] == "baseline":
        return "reference", 1.0
    return "-", None


def label(row: dict[str, Any]) -> str:
    """A short name: the id's tail and the steps' last name parts ("abcdef half+dynamic_int8")."""
    if row["kind"] == "baseline":
        return "original"
    names = [s["technique"] for s in steps(row)]
    return f"{row['id'][-6:]} " + ("+".join(s.split(".")[-1] for s in names) or row["kind"])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower latency x, higher quality y), sorted by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _short(source: str) -> list[str]:
    """The parts a model source is named by, most specific first ("builtin:minilm" -> ["minilm"])."""
    if source.startswith("builtin:"):
        return [source.split(":", 1)[1]]
    parts = [p for p in PurePath(source.rstrip("/\\")).parts if p not in ("/", "\\")]
    return list(reversed(parts)) or [source]


def model_names(sources: Iterable[str]) -> dict[str, str]:
    """A short, distinct name for each model source: its folder or file name, with as many parent folders
    as it takes to tell apart two models of the same name."""
    unique = list(dict.fromkeys(sources))
    depth = {s: 1 for s in unique}
    while True:
        names = {s: "/".join(reversed(_short(s)[: depth[s]])) for s in unique}
        clash = [s for s in unique if list(names.values()).count(names[s]) > 1 and depth[s] < len(_short(s))]
        if not clash:
            return names
        for s in clash:
            depth[s] += 1


def model_of(row: dict[str, Any]) -> str:
    """The source of the model a row was made from (the original's own source for a baseline)."""
    return str(row.get("model") or "")


def row_label(row: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """The row's name in tables and plots: the original is named after its model ("original minilm");
    variants keep the report's label (id tail and steps)."""
    if row["kind"] == "baseline":
        source = model_of(row)
        name = (names or {}).get(source) or model_names([source])[source]
        return f"original {name}"
    return label(row)


def quality_metric(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str | None:
    """The metric a row's quality is measured in. The original is the reference (1 in every metric): it
    takes the metric of the variants of its model, so it sits in their group."""
    key, value = quality_score(row, rows)
    if value is None:
        return None
    if key != "reference":
        return key
    source = model_of(row)
    for other in rows:
        if other is not row and other["kind"] != "baseline" and model_of(other) == source:
            k, v = quality_score(other, rows)
            if v is not None and k != "reference":
                return k
    return None


def metric_name(key: str | None) -> str:
    return METRIC_NAMES.get(key or "", (key or "").replace("_", " "))


def groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str | None], list[int]]:
    """Row indices by (model source, quality metric): the sets whose quality can be compared."""
    out: dict[tuple[str, str | None], list[int]] = {}
    for i, row in enumerate(rows):
        out.setdefault((model_of(row), quality_metric(row, rows)), []).append(i)
    return out


def pareto_fronts(
    rows: Sequence[dict[str, Any]], points: Sequence[tuple[float, float] | None]
) -> dict[tuple[str, str | None], list[int]]:
    """One Pareto front (lower x, higher y) per (model, metric) group, as indices into `rows`, each sorted
    by x. `points[i]` is row i's (latency, quality), or None when it lacks either. A front never mixes
    models or metrics; a group without a metric (no quality recorded) has none."""
    fronts = {}
    for key, members in groups(rows).items():
        if key[1] is None:
            continue
        kept = [i for i in members if points[i] is not None]
        if not kept:
            continue
        front = pareto_front([p for i in kept if (p := points[i]) is not None])
        fronts[key] = [kept[j] for j in front]
    return fronts


# ------------------------------------------------------------------------------------------------ generation
# A causal LM's generation metrics (`metrics.generation`, keyed by batch size as strings): time to first
# token, time per output token, decode tokens/s, and the KV cache's bytes after prompt + new tokens.

KV_CACHE_TECHNIQUE = "kv_cache.quantize"
# generation quality, in the order it is looked up; perplexity is the one where lower is better
GENERATION_QUALITY_KEYS = ("generation_match", "perplexity")


def generation(row: dict[str, Any]) -> dict[str, Any]:
    """The row's generation metrics, empty when generation was not measured (or was unavailable)."""
    gen = row["metrics"].get("generation") or {}
    return gen if "unavailable" not in gen else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def ttft_ms(row: dict[str, Any], batch: str = "1", key: str = "p50") -> float | None:
    """Time to the first token (prefill) of a batch of `batch` prompts, in milliseconds."""
    return _number((generation(row).get(str(batch)) or {}).get("ttft_ms", {}).get(key))


def tpot_ms(row: dict[str, Any], batch: str = "1", key: str = "p50") -> float | None:
    """Time per output token (one decode step of the batch), in milliseconds."""
    return _number((generation(row).get(str(batch)) or {}).get("tpot_ms", {}).get(key))


def decode_tokens_per_s(row: dict[str, Any], batch: str = "1") -> float | None:
    """New tokens per second while decoding (batch / TPOT p50)."""
    return _number((generation(row).get(str(batch)) or {}).get("decode_tokens_per_s"))


def kv_cache_bytes(row: dict[str, Any]) -> float | None:
    """Bytes the KV cache holds after prompt + new tokens at batch 1 (0 when generating without one)."""
    return _number(generation(row).get("kv_cache_bytes"))


def kv_cache_bits(row: dict[str, Any]) -> float | None:
    """Bits per cached key of a kv_cache.quantize variant (its step's `bits`); None for a float cache."""
    for step in steps(row):
        if step.get("technique") == KV_CACHE_TECHNIQUE:
            return _number((step.get("params") or {}).get("bits"))
    return None


def generation_batch_sizes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every batch size any row's generation was timed at, smallest first."""
    found = {b for r in rows for b, v in generation(r).items() if isinstance(v, dict) and b.isdigit()}
    return sorted(found, key=int)


def generation_quality_key(rows: Sequence[dict[str, Any]]) -> str | None:
    """The generation quality the rows are compared on: generation_match when any variant has it (it
    needs the generation section), else perplexity; None when no variant has either."""
    for key in GENERATION_QUALITY_KEYS:
        if any(key in (r["metrics"].get("quality") or {}) for r in rows if r["kind"] != "baseline"):
            return key
    return None


def generation_quality(row: dict[str, Any], rows: Sequence[dict[str, Any]], key: str) -> float | None:
    """The row's `key` (generation_match or perplexity). The original's is what its variants' runs
    measured of it (`baseline_quality`): the newest such variant's."""
    if row["kind"] != "baseline":
        return _number((row["metrics"].get("quality") or {}).get(key))
    children = [r for r in rows if r.get("parent") == row["id"]]
    for child in sorted(children, key=lambda r: -float(r.get("created") or 0)):
        value = _number((child["metrics"].get("baseline_quality") or {}).get(key))
        if value is not None:
            return value
    return None


def generation_pareto(
    rows: Sequence[dict[str, Any]], key: str, batch: str = "1"
) -> dict[tuple[str, str | None], list[int]]:
    """One front per model of decode tokens/s (higher is better) against generation quality `key`
    (higher generation_match, lower perplexity), as indices into `rows` sorted by tokens/s."""
    sign = -1.0 if key == "perplexity" else 1.0
    by_model: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_model.setdefault(model_of(row), []).append(i)
    fronts: dict[tuple[str, str | None], list[int]] = {}
    for source, members in by_model.items():
        kept = [  # pareto_front wants lower x and higher y: speed negated, perplexity too
            (i, -speed, sign * q)
            for i in members
            if (speed := decode_tokens_per_s(rows[i], batch)) is not None
            and (q := generation_quality(rows[i], rows, key)) is not None
        ]
        if kept:
            # pareto_front sorts by x, the negated speed: the fastest first
            fronts[(source, key)] = [kept[j][0] for j in pareto_front([(x, y) for _i, x, y in kept])]
    return fronts
