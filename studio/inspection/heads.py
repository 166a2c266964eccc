"""Attention-head importance as a (blocks x heads) matrix.

Two methods:
- `gradient` (Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?"): the expected
  absolute gradient of the family's loss with respect to a head-mask variable held at 1, accumulated batch
  by batch as the authors' code does.
- `ablation`: zero one head at a time and measure how far the model's output moves from the original
  (1 - cosine of embeddings, or KL divergence of logits).
Both are normalised per layer by the L2 norm of that layer's scores, as the paper does; raw scores are kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.evaluation.data import Example
from studio.families import Batch, family_for
from studio.inspection.attention import AttentionBlock, head_mask, require_attention_blocks

METHODS = ("gradient", "ablation")

Progress = Callable[[float, str], None]


@dataclass
class HeadImportance:
    method: str
    objective: str
    blocks: list[dict[str, Any]]
    importance: list[list[float | None]]  # per-layer L2-normalised; None where a layer has fewer heads
    raw: list[list[float | None]]
    examples: int
    sequence_length: int
    seconds: float
    skipped_blocks: list[str] = field(default_factory=list)

    @property
    def layers(self) -> int:
        return len(self.blocks)

    @property
    def heads(self) -> int:
        return max((b["heads"] for b in self.blocks), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "objective": self.objective,
            "normalization": "per layer, divided by the L2 norm of the layer's scores (Michel et al. 2019)",
            "layers": self.layers,
            "heads": self.heads,
            "blocks": self.blocks,
            "skipped_blocks": self.skipped_blocks,
            "importance": self.importance,
            "raw": self.raw,
            "examples": self.examples,
            "sequence_length": self.sequence_length,
            "seconds": round(self.seconds, 3),
        }

    def ranked(self) -> list[tuple[int, int, float]]:
        """(layer, head, score) from least to most important."""
        cells = [
            (i, j, v) for i, row in enumerate(self.importance) for j, v in enumerate(row) if v is not None
        ]
        return sorted(cells, key=lambda c: c[2])


def _batches(examples: Sequence[Example], size: int) -> list[Sequence[Example]]:
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def _normalise(rows: list[list[float]]) -> list[list[float]]:
    out = []
    for row in rows:
        norm = math.sqrt(sum(v * v for v in row))
        out.append([v / norm if norm > 0 else 0.0 for v in row])
    return out


def _pad(rows: list[list[float]], width: int) -> list[list[float | None]]:
    return [[*row, *([None] * (width - len(row)))] for row in rows]


def compute_head_importance(
    model: LoadedModel,
    examples: Sequence[Example],
    *,
    method: str = "gradient",
    sequence_length: int = 128,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> HeadImportance:
    """Head importance of `model` on `examples`; `progress(fraction, message)` is called as it goes."""
    import torch

    if method not in METHODS:
        raise BadInput(f"unknown head-importance method '{method}' (expected one of: {', '.join(METHODS)})")
    if not examples:
        raise BadInput("head importance needs at least one example")
    if model.format == "onnx":
        raise BadInput("head importance needs a torch model; this is an ONNX graph", path=model.path)
    module = model.module
    blocks, skipped = require_attention_blocks(module, model.path)
    family = family_for(model)
    report = progress or (lambda _f, _m: None)
    started = time.perf_counter()

    batches = [family.batch(model, chunk, sequence_length) for chunk in _batches(examples, batch_size)]
    with torch.no_grad():
        references = [family.forward(module, b) for b in batches]

    if method == "gradient":
        raw, objective = _gradient(module, family, blocks, batches, references, report)
    else:
        raw, objective = _ablation(module, family, blocks, batches, references, report)
    width = max(b.num_heads for b in blocks)
    return HeadImportance(
        method=method,
        objective=objective,
        blocks=[b.describe() for b in blocks],
        importance=_pad(_normalise(raw), width),
        raw=_pad(raw, width),
        examples=len(examples),
        sequence_length=sequence_length,
        seconds=time.perf_counter() - started,
        skipped_blocks=skipped,
    )


def _gradient(
    module: Any,
    family: Any,
    blocks: list[AttentionBlock],
    batches: list[Batch],
    references: list[Any],
    report: Progress,
) -> tuple[list[list[float]], str]:
    import torch

    totals = [torch.zeros(b.num_heads) for b in blocks]
    masks = [torch.ones(b.num_heads, requires_grad=True) for b in blocks]
    requires = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)  # only the mask needs gradients: saves memory and time
    objective = ""
    try:
        with head_mask(blocks, masks):
            for i, (batch, ref) in enumerate(zip(batches, references, strict=True)):
                loss, objective = family.loss(module, batch, ref)
                grads = torch.autograd.grad(loss, masks, allow_unused=True)
                for total, g in zip(totals, grads, strict=True):
                    if g is not None:
                        total += g.detach().abs()
                report((i + 1) / len(batches), f"gradient importance: batch {i + 1}/{len(batches)}")
    finally:
        for p, r in zip(module.parameters(), requires, strict=True):
            p.requires_grad_(r)
    rows = [(t / len(batches)).tolist() for t in totals]
    return rows, f"gradient of the {objective} w.r.t. a head mask at 1 (mean |dL/dmask| over batches)"


def _ablation(
    module: Any,
    family: Any,
    blocks: list[AttentionBlock],
    batches: list[Batch],
    references: list[Any],
    report: Progress,
) -> tuple[list[list[float]], str]:
    import torch

    values = [torch.ones(b.num_heads) for b in blocks]
    rows: list[list[float]] = [[0.0] * b.num_heads for b in blocks]
    total = sum(b.num_heads for b in blocks)
    done = 0
    with torch.no_grad(), head_mask(blocks, values):
        for i, block in enumerate(blocks):
            for h in range(block.num_heads):
                values[i][h] = 0.0
                change = [
                    family.divergence(ref, family.forward(module, batch), batch)
                    for batch, ref in zip(batches, references, strict=True)
                ]
                values[i][h] = 1.0
                rows[i][h] = sum(change) / len(change)
                done += 1
                report(done / total, f"ablation: {block.name} head {h} ({done}/{total})")
    measure = {
        "feature-extraction": "1 - cosine of pooled embeddings",
        "seq2seq": "KL divergence of teacher-forced decoder logits",
    }.get(family.name, "KL divergence of output logits")
    return rows, f"output change when the head is zeroed: {measure}, mean over batches"
