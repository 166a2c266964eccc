"""Which heads prune.heads removes, from their importance scores: ranked across layers, or the same number
in every layer (which keeps ONNX Runtime's attention fusion)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from studio.techniques.prune.head_surgery import HeadLayout


def select_heads(
    blocks: Sequence[Any], layouts: Sequence[HeadLayout], scores: Sequence[Sequence[float]], target: int
) -> tuple[dict[int, list[int]], list[str]]:
    """The `target` least important heads across layers, never a whole layer.

    Under grouped-query attention the unit removed is a KV group (scored by the sum of its query heads), so
    the number removed is rounded down to whole groups (at least one group). Returns the choice and notes.
    """
    units = []  # (score, block index, heads)
    for i, (layout, row) in enumerate(zip(layouts, scores, strict=True)):
        g = layout.group
        for k in range(layout.kv_heads):
            heads = list(range(k * g, (k + 1) * g))
            units.append((sum(row[h] for h in heads), i, heads))
    units.sort(key=lambda u: u[0])
    chosen: dict[int, list[int]] = {}
    left = {i: layout.kv_heads for i, layout in enumerate(layouts)}
    removed, notes = 0, []
    for _score, i, heads in units:
        if removed >= target:
            break
        if left[i] <= 1:
            continue  # one head (group) per layer is always kept
        if removed + len(heads) > target and removed > 0:
            continue  # a KV group larger than what is left to remove: never overshoot (after the first)
        chosen.setdefault(i, []).extend(heads)
        left[i] -= 1
        removed += len(heads)
    if removed != target:
        notes.append(
            f"removed {removed} heads instead of {target}: grouped-query attention removes whole KV groups, "
            "and every layer keeps at least one"
        )
    return {i: sorted(h) for i, h in chosen.items()}, notes


def select_heads_per_layer(
    layouts: Sequence[HeadLayout], scores: Sequence[Sequence[float]], target: int
) -> dict[int, list[int]] | None:
    """At most `target` heads removed so that every layer keeps the same number (a multiple of its KV
    group size under grouped-query attention), each layer losing its least important heads (whole KV groups,
    scored by the sum of their query heads); None when no such choice removes anything."""
    total = sum(layout.heads for layout in layouts)
    group = max(layout.group for layout in layouts)
    keep = max(math.ceil((total - target) / len(layouts)), 1)  # never more removed than asked
    keep = math.ceil(keep / group) * group
    if keep >= max(layout.heads for layout in layouts) or any(
        keep > layout.heads or keep % layout.group for layout in layouts
    ):
        return None
    chosen: dict[int, list[int]] = {}
    for i, (layout, row) in enumerate(zip(layouts, scores, strict=True)):
        g = layout.group
        units = sorted(
            (sum(row[h] for h in range(k * g, (k + 1) * g)), list(range(k * g, (k + 1) * g)))
            for k in range(layout.kv_heads)
        )
        drop = (layout.heads - keep) // g
        if drop:
            chosen[i] = sorted(h for _score, heads in units[:drop] for h in heads)
    return chosen or None


def uneven_heads_note(counts: Sequence[int]) -> str | None:
    """A warning when layers end with different head counts (onnx.optimize cannot fuse their attention)."""
    if len(set(counts)) <= 1:
        return None
    return (
        f"layers keep uneven head counts ({', '.join(map(str, counts))}): ONNX Runtime's attention fusion "
        "(onnx.optimize) takes one head count for the whole graph, so these layers stay unfused and run "
        "slower; prune the same number of heads in every layer to keep it"
    )
