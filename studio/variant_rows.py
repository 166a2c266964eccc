"""What a row of the workspace means when variants of several models sit side by side.

A workspace collects the variants of every model a user ran pipelines on. Their quality numbers are
comparable only within one model and one metric (the fidelity cosine of an embedding model and the top-1
agreement of a language model are different scales), and each model has its own original. These helpers
name a row's model and metric, so views can group or filter by them and never rank across them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import PurePath
from typing import Any

from studio.report import label, pareto_front, quality_score

METRIC_NAMES = {
    "fidelity_cosine": "cosine",
    "top1_agreement": "top-1 agreement",
    "output_cosine": "output cosine",
}


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
    key, value = quality_score(row, list(rows))
    if value is None:
        return None
    if key != "reference":
        return key
    source = model_of(row)
    for other in rows:
        if other is not row and other["kind"] != "baseline" and model_of(other) == source:
            k, v = quality_score(other, list(rows))
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
        front = pareto_front([points[i] for i in kept])  # type: ignore[misc]
        fronts[key] = [kept[j] for j in front]
    return fronts
