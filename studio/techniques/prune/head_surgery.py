"""Removing attention heads from one block: how the block stores its heads (BERT query/key/value, GPT-2
c_attn, q/k/v projections with grouped-query attention) and slicing their weights.

Head indices refer to the block as it is when the slice happens, so several pruning steps replay in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from studio.errors import BadInput
from studio.techniques.prune.surgery import keep_inputs, keep_outputs, out_features


@dataclasses.dataclass
class HeadLayout:
    """How one attention block stores its heads (see `head_layout`)."""

    style: str  # "bert" | "gpt2" | "qkv"
    heads: int  # query heads
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def head_layout(block: Any) -> HeadLayout:
    m = block.module
    if hasattr(getattr(m, "self", None), "query") and hasattr(getattr(m, "output", None), "dense"):
        return HeadLayout("bert", block.num_heads, block.num_heads, block.head_dim)
    if hasattr(m, "c_attn") and hasattr(m, "c_proj") and not hasattr(m, "q_attn"):
        return HeadLayout("gpt2", block.num_heads, block.num_heads, block.head_dim)
    if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj")):
        kv = out_features(m.k_proj) // block.head_dim
        if kv < 1 or block.num_heads % kv or out_features(m.v_proj) != out_features(m.k_proj):
            raise BadInput(
                f"{block.name}: unsupported attention layout ({block.num_heads} heads, {kv} KV heads)"
            )
        return HeadLayout("qkv", block.num_heads, kv, block.head_dim)
    raise BadInput(
        f"{block.name}: cannot remove heads from a {type(m).__name__} (supported: BERT-style query/key/value, "
        "GPT-2 c_attn, q_proj/k_proj/v_proj attention)"
    )


def kv_heads_removed(name: str, layout: HeadLayout, removed: Sequence[int]) -> list[int]:
    """Which KV heads go with the removed query heads under grouped-query attention.

    A KV head serves a group of consecutive query heads. Either whole groups are removed (the KV head goes
    with them) or every group loses the same number of query heads and all KV heads stay (the model needs
    equal groups). Any other pattern is refused.
    """
    g = layout.group
    removed_set = set(removed)
    if g == 1:
        return sorted(removed_set)
    whole = [k for k in range(layout.kv_heads) if all(k * g + j in removed_set for j in range(g))]
    if removed_set == {k * g + j for k in whole for j in range(g)}:
        return whole
    per_group = [sum(1 for j in range(g) if k * g + j in removed_set) for k in range(layout.kv_heads)]
    if len(set(per_group)) == 1 and per_group[0] < g:
        return []
    raise BadInput(
        f"{name}: grouped-query attention ({layout.heads} query heads share {layout.kv_heads} KV heads, "
        f"{g} per group) can only lose whole groups of query heads, or the same number of query heads "
        f"from every group; heads {sorted(removed_set)} are neither"
    )


def _head_columns(heads: Sequence[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def prune_block_heads(block: Any, removed: Sequence[int], kv_removed: Sequence[int] | None = None) -> None:
    """Physically remove query heads `removed` (and KV heads `kv_removed`) from one attention block and
    update the head-count attributes the transformers 5 forward uses."""
    layout = head_layout(block)
    if not removed:
        return
    if len(set(removed)) >= layout.heads or any(h >= layout.heads for h in removed):
        raise BadInput(f"{block.name}: cannot remove heads {sorted(removed)} of {layout.heads}")
    m, hd = block.module, layout.head_dim
    keep = [h for h in range(layout.heads) if h not in set(removed)]
    cols = _head_columns(keep, hd)
    if layout.style == "bert":
        s = m.self
        for layer in (s.query, s.key, s.value):
            keep_outputs(layer, cols)
        keep_inputs(m.output.dense, cols)
        s.num_attention_heads = len(keep)
        s.all_head_size = len(keep) * hd
    elif layout.style == "gpt2":
        width = layout.heads * hd  # c_attn holds q | k | v, each `width` wide
        keep_outputs(m.c_attn, [c + part * width for part in range(3) for c in cols])
        keep_inputs(m.c_proj, cols)
        m.num_heads = len(keep)
        m.split_size = len(keep) * hd
    else:
        if kv_removed is None:
            kv_removed = kv_heads_removed(block.name, layout, removed)
        keep_kv = [k for k in range(layout.kv_heads) if k not in set(kv_removed)]
        keep_outputs(m.q_proj, cols)
        if kv_removed:
            kv_cols = _head_columns(keep_kv, hd)
            keep_outputs(m.k_proj, kv_cols)
            keep_outputs(m.v_proj, kv_cols)
        keep_inputs(m.o_proj if hasattr(m, "o_proj") else m.out_proj, cols)
        for attr, value in (
            ("num_heads", len(keep)),
            ("num_attention_heads", len(keep)),
            ("num_key_value_heads", len(keep_kv)),
            ("num_key_value_groups", len(keep) // len(keep_kv)),
        ):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, value)
