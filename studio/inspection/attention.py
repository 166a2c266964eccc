"""Finding attention blocks in a torch model and masking their heads.

transformers 5 has no `head_mask`: a head is masked by scaling its slice of the input of the attention
output projection (o_proj / out_proj / c_proj / BERT's output.dense), which is exactly the concatenated
per-head context. A forward pre-hook does the scaling, so the model code is untouched and the hook
multiplies by exactly 1.0 when a head is kept (bit-identical outputs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from studio.errors import BadInput

_OUT_PROJ_NAMES = ("o_proj", "out_proj", "c_proj")


@dataclass
class AttentionBlock:
    name: str  # module path of the attention block
    kind: str  # "self-attention", "encoder self-attention", "decoder self-attention"
    module: Any  # the attention module itself
    out_proj: Any  # the output projection whose input is the concatenated head outputs
    num_heads: int
    head_dim: int

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "heads": self.num_heads, "head_dim": self.head_dim}


def _in_features(proj: Any) -> int:
    if hasattr(proj, "in_features"):
        return int(proj.in_features)
    return int(proj.weight.shape[0])  # transformers Conv1D stores weight as (in, out)


def _head_dim(module: Any) -> int | None:
    for attr in ("head_dim", "attention_head_size", "head_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _is_cross_attention(name: str, module: Any) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or any(
        part in name for part in ("encoder_attn", "crossattention", "cross_attn")
    )


def find_attention_blocks(model: Any) -> tuple[list[AttentionBlock], list[str]]:
    """Self-attention blocks whose heads can be masked, and the names of attention blocks skipped (cross-attention)."""
    blocks: list[AttentionBlock] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if "Attention" not in type(module).__name__:
            continue
        if any(name.startswith(b.name + ".") for b in blocks):
            continue  # e.g. BertSelfAttention inside BertAttention
        out_proj, head_owner = None, module
        for attr in _OUT_PROJ_NAMES:
            if hasattr(module, attr):
                out_proj = getattr(module, attr)
                break
        if out_proj is None and hasattr(module, "output") and hasattr(module.output, "dense"):
            out_proj, head_owner = module.output.dense, getattr(module, "self", module)
        if out_proj is None or not hasattr(out_proj, "weight"):
            continue
        if _is_cross_attention(name, module):
            skipped.append(name)
            continue
        head_dim = _head_dim(head_owner)
        if head_dim is None:
            heads = getattr(head_owner, "num_heads", None) or getattr(head_owner, "num_attention_heads", None)
            if not heads:
                continue
            head_dim = _in_features(out_proj) // int(heads)
        width = _in_features(out_proj)
        if width % head_dim:
            continue
        parts = name.split(".")
        kind = (
            "encoder self-attention"
            if "encoder" in parts
            else "decoder self-attention"
            if "decoder" in parts
            else "self-attention"
        )
        blocks.append(AttentionBlock(name, kind, module, out_proj, width // head_dim, head_dim))
    return blocks, skipped


def require_attention_blocks(model: Any, path: Any = None) -> tuple[list[AttentionBlock], list[str]]:
    blocks, skipped = find_attention_blocks(model)
    if not blocks:
        raise BadInput(
            "the model has no attention heads the studio recognises (no self-attention block with an output "
            "projection), so there is no head importance to compute",
            path=path,
        )
    return blocks, skipped


class HeadMask:
    """Per-block head masks applied by forward pre-hooks; `values[i]` is a (num_heads,) tensor for block i."""

    def __init__(self, blocks: list[AttentionBlock], values: list[Any]) -> None:
        self.blocks = blocks
        self.values = values

    def _hook(self, index: int):
        block = self.blocks[index]

        def pre_hook(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            scale = self.values[index].to(x.dtype).repeat_interleave(block.head_dim)
            return (x * scale, *args[1:])

        return pre_hook


@contextmanager
def head_mask(blocks: list[AttentionBlock], values: list[Any] | None = None) -> Iterator[HeadMask]:
    """Install head-masking hooks for the duration of the block; values default to ones (no change)."""
    import torch

    if values is None:
        values = [torch.ones(b.num_heads) for b in blocks]
    mask = HeadMask(blocks, values)
    handles = [b.out_proj.register_forward_pre_hook(mask._hook(i)) for i, b in enumerate(blocks)]
    try:
        yield mask
    finally:
        for h in handles:
            h.remove()
