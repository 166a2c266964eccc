"""The training loop of the recovery blocks (train.lora, quantize.qat): some of a compressed model's
parameters are trained on the calibration data toward the original, everything else stays frozen.

The objective is distill's: the output term (KL divergence of softened logits, or 1 - cosine plus the
relative squared error of pooled embeddings for encoders) mixed with hidden-state matching, built from
studio/techniques/distill.py's pieces; or, with `task_loss`, the family's own task loss (cross-entropy
against the calibration labels for classifiers, next-token loss for LMs). Each step's loss is emitted as
the `distill_loss` metric, the curve the Run tab plots.

Unlike distill, the caller chooses which parameters train (adapters, fake-quantized weights), so the
frozen base is never touched: a quantized base stays exactly as it was (QLoRA).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from studio.errors import BadInput
from studio.techniques.base import RunContext


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    learning_rate: float
    batch_size: int = 16
    temperature: float = 2.0
    hidden_share: float = 0.5  # weight of hidden-state matching; the output term gets the rest
    task_loss: bool = False
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    steps: int
    examples: int
    loss_start: float  # mean of the first steps (up to 10)
    loss_end: float  # mean of the last steps (up to 10)
    objective: str
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "examples": self.examples,
            "loss_start": self.loss_start,
            "loss_end": self.loss_end,
            "objective": self.objective,
            "seconds": round(self.seconds, 3),
        }


def _batches(ctx: RunContext, family: Any, size: int, seed: int, device: Any) -> tuple[list[Any], int]:
    """Fixed mini-batches, tokenised once; a short last batch is joined to the one before."""
    from studio.techniques.distill import to_device

    examples = list(ctx.calibration)
    random.Random(seed).shuffle(examples)
    size = min(size, len(examples))
    chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
    if len(chunks) > 1 and len(chunks[-1]) < size:
        chunks[-2] = chunks[-2] + chunks.pop()
    return [to_device(family.batch(ctx.original, c, ctx.sequence_length), device) for c in chunks], len(
        examples
    )


def train_toward_original(
    student: Any,
    trainable: list[Any],
    ctx: RunContext,
    s: TrainSettings,
    technique: str,
    train_mode: Sequence[Any] = (),
) -> TrainResult:
    """Train `trainable` (parameters of `student`) for `s.steps` AdamW steps; the student ends on the CPU
    in eval mode with every parameter's requires_grad as it was. The student runs in eval mode (dropout
    off) except the `train_mode` submodules (an adapter's own dropout, say)."""
    import torch

    from studio.families import FeatureExtraction, TextClassification, family_for
    from studio.techniques.distill import (
        TeacherOutputs,
        batch_order,
        embedding_loss,
        hidden_loss,
        logit_kd,
        model_outputs,
        output_mask,
    )

    if not ctx.calibration:
        raise BadInput(f"{technique} needs training examples: set the recipe's data.calibration")
    if not ctx.original.runnable:
        raise BadInput("the original checkpoint holds weights only: there is no teacher to run")
    if not trainable:
        raise BadInput(f"{technique}: nothing to train")
    teacher = ctx.original.module
    device = torch.device(ctx.device)
    if next(teacher.parameters(), torch.empty(0)).device != device:
        teacher = copy.deepcopy(teacher).to(device)  # the original stays where it is, unchanged
    student.to(device)
    family = family_for(ctx.original)
    is_embedding = isinstance(family, FeatureExtraction)
    ctx.progress(0.0, "preparing batches")
    batches, n_examples = _batches(ctx, family, s.batch_size, s.seed, device)
    if s.task_loss and isinstance(family, TextClassification) and any(b.labels is None for b in batches):
        raise BadInput(
            f"{technique}: loss 'task' needs a label on every calibration example; this data has none "
            "(use loss 'distill', which trains toward the original's outputs)"
        )
    want_hidden = not s.task_loss and s.hidden_share > 0
    if s.task_loss:
        objective = "the task loss"
    elif is_embedding:
        objective = "1 - cosine + relative MSE of pooled embeddings"
    else:
        objective = f"KL divergence of logits at temperature {s.temperature:g}, times T^2"
    if want_hidden:
        objective += f", {s.hidden_share:g} of it hidden-state matching"

    every = list(student.parameters())
    old_grad = [p.requires_grad for p in every]
    chosen = {id(p) for p in trainable}
    optimizer = torch.optim.AdamW(trainable, lr=s.learning_rate, weight_decay=0.0)
    ctx.log(
        f"{technique}: training {sum(p.numel() for p in trainable):,} weights for {s.steps} steps on "
        f"{n_examples} examples ({len(batches)} batches); objective: {objective}"
    )
    losses: list[float] = []
    teacher_outputs = TeacherOutputs(teacher, family, want_hidden)
    indices = batch_order(random.Random(s.seed), len(batches))
    started = time.perf_counter()
    student.eval()  # dropout off: trained deterministically toward the teacher
    for sub in train_mode:
        sub.train()
    try:
        for p in every:
            p.requires_grad_(id(p) in chosen)
        for step in range(s.steps):
            index = next(indices)
            batch = batches[index]
            t_out = teacher_outputs.get(index, batch)
            extra: dict[str, float] = {}
            if s.task_loss:
                loss, _what = family.loss(student, batch, t_out.primary)
            else:
                s_out = model_outputs(student, family, batch, want_hidden)
                if is_embedding:
                    loss = embedding_loss(s_out.primary, t_out.primary)
                else:
                    mask = output_mask(family, batch)
                    loss = logit_kd(s_out.primary, t_out.primary, s.temperature, mask)
                extra["output_loss"] = float(loss.detach())
                hid, _pairs = hidden_loss(s_out, t_out) if want_hidden else (None, 0)
                if hid is not None:
                    extra["hidden_loss"] = float(hid.detach())
                    loss = (1.0 - s.hidden_share) * loss + s.hidden_share * hid
            if not torch.isfinite(loss):
                raise BadInput(
                    f"{technique}: the training loss became {float(loss)} at step {step + 1}: "
                    "lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            value = float(loss.detach())
            losses.append(value)
            ctx.metric("distill_loss", value, iteration=step, **extra)
            ctx.progress((step + 1) / s.steps, f"step {step + 1}/{s.steps}: loss {value:.4g}")
    finally:
        optimizer.zero_grad(set_to_none=True)
        teacher_outputs.clear()
        for p, g in zip(every, old_grad, strict=True):
            p.requires_grad_(g)
        student.eval()
        student.to(torch.device("cpu"))
    window = max(1, min(10, len(losses) // 2))
    result = TrainResult(
        steps=s.steps,
        examples=n_examples,
        loss_start=sum(losses[:window]) / window,
        loss_end=sum(losses[-window:]) / window,
        objective=objective,
        seconds=time.perf_counter() - started,
    )
    ctx.log(
        f"{technique}: loss {result.loss_start:.4g} -> {result.loss_end:.4g} (mean of the first and last "
        f"{window} steps) in {result.seconds:.1f} s"
    )
    return result
