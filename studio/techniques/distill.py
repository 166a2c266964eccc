"""Knowledge distillation: train the current model (student) toward the original (teacher).

After pruning, the remaining weights can be trained to make up for what was removed. The teacher is the
unchanged original checkpoint (`RunContext.original`); the student is the pipeline's current module, so
its structure is whatever earlier steps left (pruned heads or FFN neurons keep the hidden size, so
hidden states still compare layer by layer).

The loss is `alpha * output_term + (1 - alpha) * hidden_weight * hidden_term`:
- output term, for models with logits (classifiers, causal LMs, seq2seq): Hinton et al.'s KL divergence
  between the teacher's and the student's softened distributions, times T^2 so the gradient scale does
  not depend on the temperature; per token, padding and unlabeled positions left out. For embedding
  models (no logits): 1 - cosine plus the relative squared error of the pooled embeddings, the output the
  studio compares for fidelity.
- hidden term: the squared error of the hidden states divided by the teacher's mean square (so it does
  not depend on the model's activation scale), averaged over the layers both models have; a student with
  fewer layers is mapped onto the teacher's evenly (TinyBERT's uniform mapping).

Weights that are exactly zero before training (left by unstructured pruning) are kept at zero, so
distilling a pruned model does not undo its sparsity. Embedding tables are frozen unless asked for:
compression leaves them as they were, and they are half of a small encoder's weights (optimizer state
and time). Teacher outputs are computed once per batch and reused across epochs (up to 512 MB).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from pydantic import Field, model_validator

from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register


class DistillParams(Params):
    steps: int = Field(100, ge=1, le=1_000_000, description="Optimizer steps (one mini-batch each)")
    learning_rate: float = Field(5e-5, gt=0.0, le=1.0, description="AdamW learning rate")
    batch_size: int = Field(16, ge=1, le=4096, description="Calibration examples per step")
    temperature: float = Field(
        2.0, gt=0.0, le=100.0, description="Softmax temperature of the logit KD term (Hinton et al.)"
    )
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the output term; 1 - alpha goes to hidden-state matching",
    )
    hidden_weight: float = Field(1.0, ge=0.0, le=1000.0, description="Extra scale of the hidden-state term")
    keep_sparsity: bool = Field(
        True, description="Keep weights that are exactly zero before training (pruned) at zero"
    )
    train_embeddings: bool = Field(
        False,
        description="Also train the embedding tables (compression leaves them as they were; frozen by default)",
    )
    seed: int = Field(0, ge=0, description="Seed of the batch order")
    around_quantized: bool = Field(
        False,
        description="after weight-only quantization: train only the float parameters left beside the "
        "quantized layers (biases, LayerNorms, layers kept float) toward the original; the codes and "
        "scales stay as stored. Recovers part of what 4-bit weights lose (MiniLM: mean cosine +0.004-0.006)",
    )
    train_scales: bool = Field(
        False,
        description="with around_quantized: also train the weight-only layers' scales (one per group of "
        "weights), the integer codes fixed (PEQA, Kim et al. 2023): the stored size does not change",
    )

    @model_validator(mode="after")
    def _scales_need_around(self) -> DistillParams:
        if self.train_scales and not self.around_quantized:
            raise ValueError("train_scales trains a quantized model's scales: it needs around_quantized")
        return self


# Quantized layers whose forward passes gradients on to their inputs (weights dequantized in float, or a
# table lookup): `around_quantized` trains the float parameters around them. FBGEMM's int8 kernels do not.
# Each with the buffer of its float scales (what `train_scales` trains).
SCALES_OF = {"WeightOnlyLinear": "scales", "WeightOnlyEmbedding": "scales", "Int8Embedding": "weight_scale"}
TRAINABLE_AROUND = tuple(SCALES_OF)


def quantized_scales(module: Any) -> list[tuple[Any, str]]:
    """(layer, buffer name) of the float scales of a module's weight-only layers: what `train_scales`
    trains."""
    found = ((m, SCALES_OF[type(m).__name__]) for m in module.modules() if type(m).__name__ in SCALES_OF)
    return [(m, name) for m, name in found if getattr(m, name).is_floating_point()]


def train_in_float32(layers: list[tuple[Any, str]]) -> tuple[list[Any], Any]:
    """The scale buffers as float32 tensors to train (float16 scales would take Adam's updates, a
    thousandth of a scale, at the edge of their precision), and a function that stores them back in
    their own dtypes (a float16 scale rounded once, at the end)."""
    import torch

    dtypes = [getattr(m, name).dtype for m, name in layers]
    for m, name in layers:
        setattr(m, name, getattr(m, name).detach().to(torch.float32).requires_grad_(True))

    def store() -> None:
        for (m, name), dtype in zip(layers, dtypes, strict=True):
            setattr(m, name, getattr(m, name).detach().to(dtype))

    return [getattr(m, name) for m, name in layers], store


def passes_gradients(module: Any, name: str) -> bool:
    """Whether the quantized part `name` (from `quantized_parts`) is one `around_quantized` trains around."""
    try:
        sub = module.get_submodule(name)
    except AttributeError:  # a parameter of an unusual type, not a layer
        return False
    return type(sub).__name__ in TRAINABLE_AROUND


@dataclass
class Outputs:
    primary: Any  # logits, or pooled embeddings for feature-extraction models
    hidden: list[tuple[list[Any], Any]]  # (hidden states per layer, position mask or None) per stack


TEACHER_CACHE_BYTES = 512 << 20  # teacher outputs kept across epochs up to this size


def outputs_nbytes(out: Outputs) -> int:
    tensors = [out.primary] + [h for states, _ in out.hidden for h in states]
    return sum(t.numel() * t.element_size() for t in tensors)


class TeacherOutputs:
    """The teacher's outputs per fixed batch, computed once and kept while they fit TEACHER_CACHE_BYTES (the
    teacher never changes; `distill` and the recovery training of `train.lora` / `quantize.qat` share it)."""

    def __init__(self, teacher: Any, family: Any, want_hidden: bool) -> None:
        self.teacher, self.family, self.want_hidden = teacher, family, want_hidden
        self.kept: dict[int, Outputs] = {}
        self.bytes = 0

    def get(self, index: int, batch: Any) -> Outputs:
        import torch

        out = self.kept.get(index)
        if out is None:
            with torch.no_grad():
                out = model_outputs(self.teacher, self.family, batch, self.want_hidden)
            size = outputs_nbytes(out)
            if self.bytes + size <= TEACHER_CACHE_BYTES:
                self.kept[index] = out
                self.bytes += size
        return out

    def clear(self) -> None:
        self.kept.clear()


def batch_order(rng: Any, count: int) -> Iterator[int]:
    """Batch indices for training steps: every batch once per epoch, each epoch in a new seeded order."""
    while True:
        order = list(range(count))
        rng.shuffle(order)
        while order:
            yield order.pop()


def _is_hf(module: Any) -> bool:
    return hasattr(module, "config") and hasattr(module, "forward")


def quantized_parts(module: Any) -> list[str]:
    """Names of layers that hold quantized (non-float) weights: they cannot be trained."""
    import torch

    found: list[str] = []
    for name, sub in module.named_modules():
        if "quantized" in type(sub).__module__:
            if not any(name.startswith(f + ".") for f in found):
                found.append(name or type(sub).__name__)
            continue
        for pname, p in sub.named_parameters(recurse=False):
            plain = type(p) in (torch.Tensor, torch.nn.Parameter)
            if not plain or not p.is_floating_point():
                found.append(f"{name}.{pname}" if name else pname)
    return found


def model_outputs(module: Any, family: Any, batch: Any, want_hidden: bool) -> Outputs:
    from studio.families import FeatureExtraction, Seq2Seq

    if not _is_hf(module):
        return Outputs(family.forward(module, batch), [])
    kwargs = dict(batch.inputs)
    if isinstance(family, Seq2Seq):
        kwargs["labels"] = batch.labels
    out = module(**kwargs, output_hidden_states=want_hidden or isinstance(family, FeatureExtraction))
    if isinstance(family, FeatureExtraction):
        last = getattr(out, "last_hidden_state", None)
        primary = family.from_primary(last if last is not None else out.hidden_states[-1], batch)
    elif getattr(out, "logits", None) is not None:
        primary = out.logits
    else:
        primary = out[0]
    hidden: list[tuple[list[Any], Any]] = []
    if want_hidden:
        mask = batch.inputs.get("attention_mask")
        enc = getattr(out, "encoder_hidden_states", None)
        dec = getattr(out, "decoder_hidden_states", None)
        if enc is not None or dec is not None:
            dec_mask = None if batch.labels is None else (batch.labels != -100)
            hidden = [(list(enc or ()), mask), (list(dec or ()), dec_mask)]
        elif getattr(out, "hidden_states", None) is not None:
            hidden = [(list(out.hidden_states), mask)]
    return Outputs(primary, hidden)


def layer_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student index, teacher index) of the hidden states compared.

    Index 0 is the embeddings output; a student with fewer (or more) layers maps each of its layers to the
    teacher layer at the same relative depth.
    """
    if student_layers <= 0 or teacher_layers <= 0:
        return []
    if student_layers == teacher_layers:
        return [(i, i) for i in range(student_layers + 1)]
    return [(j, round(j * teacher_layers / student_layers)) for j in range(student_layers + 1)]


def _relative_mse(s: Any, t: Any, mask: Any) -> Any:
    s, t = s.float(), t.float()
    err = (s - t).pow(2)
    ref = t.pow(2)
    if mask is not None and tuple(mask.shape) == tuple(err.shape[: mask.dim()]):
        m = mask.to(err.dtype).reshape(*mask.shape, *([1] * (err.dim() - mask.dim())))
        err, ref = err * m, ref * m
    return err.sum() / ref.sum().clamp(min=1e-12)


def hidden_loss(student: Outputs, teacher: Outputs) -> tuple[Any, int]:
    """Mean relative squared error over the matched hidden states, and how many pairs were compared."""
    terms = []
    for (s_states, mask), (t_states, _) in zip(student.hidden, teacher.hidden, strict=False):
        for i, j in layer_pairs(len(s_states) - 1, len(t_states) - 1):
            s, t = s_states[i], t_states[j]
            if s.shape != t.shape:
                continue
            terms.append(_relative_mse(s, t, mask))
    if not terms:
        return None, 0
    import torch

    return torch.stack(terms).mean(), len(terms)


def logit_kd(student: Any, teacher: Any, temperature: float, mask: Any) -> Any:
    """KL(teacher_T || student_T) * T^2, averaged over rows (and over unmasked positions)."""
    import torch.nn.functional as F

    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    if mask is not None and tuple(mask.shape) == tuple(kl.shape):
        m = mask.to(kl.dtype)
        kl = (kl * m).sum() / m.sum().clamp(min=1)
    else:
        kl = kl.mean()
    return kl * temperature * temperature


def embedding_loss(student: Any, teacher: Any) -> Any:
    """1 - cosine plus the relative squared error of pooled embeddings (direction and scale)."""
    import torch.nn.functional as F

    s, t = student.float(), teacher.float()
    cos = F.cosine_similarity(s, t, dim=-1).mean()
    return (1.0 - cos) + (s - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-12)


def output_mask(family: Any, batch: Any) -> Any:
    from studio.families import CausalLM, Seq2Seq

    if isinstance(family, Seq2Seq):
        return None if batch.labels is None else (batch.labels != -100)
    if isinstance(family, CausalLM):
        return batch.inputs.get("attention_mask")
    return None


def to_device(batch: Any, device: Any) -> Any:
    if str(device) == "cpu":
        return batch
    return replace(
        batch,
        inputs={k: v.to(device) for k, v in batch.inputs.items()},
        labels=None if batch.labels is None else batch.labels.to(device),
    )


@register
class Distill(Technique[DistillParams]):
    id = "distill"
    title = "Distillation"
    category = "distillation"
    input_kind = "torch"
    output_kind = "torch"
    description = (
        "Trains the current model toward the original (the teacher) on the calibration data: logit KD "
        "(or embedding matching for encoders) plus hidden-state matching. Use after pruning."
    )
    Params = DistillParams

    def run(self, state: StageState, params: DistillParams, ctx: RunContext) -> StageState:
        import torch

        from studio.families import FeatureExtraction, family_for

        if state.module is None:
            raise BadInput("distill needs a torch model in memory")
        if not ctx.calibration:
            raise BadInput("distill needs training examples: set the recipe's data.calibration")
        if not ctx.original.runnable:
            raise BadInput("the original checkpoint holds weights only: there is no teacher to run")
        bad = quantized_parts(state.module)
        if params.around_quantized:
            bad = [n for n in bad if not passes_gradients(state.module, n)]
            if bad:
                raise BadInput(
                    f"distill around_quantized trains around weight-only layers only; these pass no "
                    f"gradients ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): distill before "
                    "quantizing them, or store them with quantize.weight_only"
                )
        elif bad:
            raise BadInput(
                f"the model holds quantized layers ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                "that cannot be trained: distill before quantizing (or set around_quantized, after "
                "quantize.weight_only / quantize.gptq)"
            )

        teacher = ctx.original.module
        student = state.module
        if student is teacher:  # never train the reference itself
            student = copy.deepcopy(teacher)
        device = torch.device(ctx.device)
        if next(teacher.parameters(), torch.empty(0)).device != device:
            teacher = copy.deepcopy(teacher).to(device)  # the original stays where it is, unchanged
        student.to(device)
        family = family_for(ctx.original)
        is_embedding = isinstance(family, FeatureExtraction)
        want_hidden = params.alpha < 1.0 and params.hidden_weight > 0

        # Fixed mini-batches (tokenised once; seq2seq targets generated once), visited in a seeded order.
        rng = random.Random(params.seed)
        examples = list(ctx.calibration)
        rng.shuffle(examples)
        size = min(params.batch_size, len(examples))
        chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
        if len(chunks) > 1 and len(chunks[-1]) < size:
            chunks[-2] = chunks[-2] + chunks.pop()
        ctx.progress(0.0, f"preparing {len(chunks)} batches")
        batches = [to_device(family.batch(ctx.original, c, ctx.sequence_length), device) for c in chunks]

        every = [p for p in student.parameters() if p.is_floating_point()]
        old_grad = [p.requires_grad for p in every]
        frozen = set()
        if not params.train_embeddings:  # tied output heads (GPT-2's lm_head) share these and stay too
            frozen = {id(m.weight) for m in student.modules() if isinstance(m, torch.nn.Embedding)}
        params_list = [p for p in every if id(p) not in frozen]
        if not params_list:
            raise BadInput("the model has no trainable float weights left to distill")
        masks: list[tuple[Any, Any]] = []
        if params.keep_sparsity:
            for p in params_list:
                if p.dim() >= 2:
                    zero = p.detach() == 0
                    if bool(zero.any()):
                        masks.append((p, ~zero))
        kept_zeros = sum(int((~m).sum()) for _, m in masks)
        scale_layers = quantized_scales(student) if params.train_scales else []
        if params.train_scales and not scale_layers:
            raise BadInput(
                "train_scales: the model holds no weight-only layers (quantize.weight_only) to tune"
            )
        scales, store_scales = train_in_float32(scale_layers)

        student.eval()  # dropout off: the student is trained deterministically toward the teacher
        for p in every:
            p.requires_grad_(id(p) not in frozen)
        # Adam moves every element by about its learning rate per step; a scale moves by that share of
        # its tensor's mean magnitude, so a 4-bit scale of 0.01 and a bias of 0.5 change alike relatively
        groups: list[dict[str, Any]] = [{"params": params_list}]
        groups += [
            {"params": [t], "lr": params.learning_rate * max(float(t.detach().abs().mean()), 1e-12)}
            for t in scales
        ]
        params_list = params_list + scales
        optimizer = torch.optim.AdamW(groups, lr=params.learning_rate, weight_decay=0.0)
        output_name = (
            "1 - cosine + relative MSE of pooled embeddings"
            if is_embedding
            else f"KL divergence of logits at temperature {params.temperature:g}, times T^2"
        )
        ctx.log(
            f"distilling for {params.steps} steps on {len(examples)} examples "
            f"({len(batches)} batches of about {size}); output term: {output_name}; "
            f"{sum(p.numel() for p in params_list):,} weights trained"
            f"{f' ({sum(t.numel() for t in scales):,} of them quantization scales)' if scales else ''}; "
            f"{'keeping ' + str(kept_zeros) + ' pruned weights at zero' if kept_zeros else 'no pruned weights'}"
        )

        losses: list[float] = []
        hidden_pairs = 0
        started = time.perf_counter()
        teacher_outputs = TeacherOutputs(teacher, family, want_hidden)
        indices = batch_order(rng, len(batches))
        try:
            for step in range(params.steps):
                index = next(indices)
                batch = batches[index]
                t_out = teacher_outputs.get(index, batch)
                s_out = model_outputs(student, family, batch, want_hidden)
                if is_embedding:
                    out_term = embedding_loss(s_out.primary, t_out.primary)
                else:
                    out_term = logit_kd(
                        s_out.primary, t_out.primary, params.temperature, output_mask(family, batch)
                    )
                hid_term, hidden_pairs = (None, 0)
                if want_hidden:
                    hid_term, hidden_pairs = hidden_loss(s_out, t_out)
                if hid_term is None:
                    loss = out_term
                else:
                    loss = params.alpha * out_term + (1.0 - params.alpha) * params.hidden_weight * hid_term
                if not torch.isfinite(loss):
                    raise BadInput(
                        f"the distillation loss became {float(loss)} at step {step + 1}: "
                        "lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params_list, 1.0)
                optimizer.step()
                if masks:
                    with torch.no_grad():
                        for p, keep in masks:
                            p.mul_(keep)
                value = float(loss.detach())
                losses.append(value)
                extra = {"output_loss": float(out_term.detach())}
                if hid_term is not None:
                    extra["hidden_loss"] = float(hid_term.detach())
                ctx.metric("distill_loss", value, iteration=step, **extra)
                ctx.progress((step + 1) / params.steps, f"step {step + 1}/{params.steps}: loss {value:.4g}")
        finally:
            optimizer.zero_grad(set_to_none=True)
            teacher_outputs.clear()
            for p, g in zip(every, old_grad, strict=True):
                p.requires_grad_(g)
            store_scales()
            student.eval()
            student.to(torch.device("cpu"))

        seconds = time.perf_counter() - started
        window = max(1, min(10, len(losses) // 2))
        first = sum(losses[:window]) / window
        last = sum(losses[-window:]) / window
        ctx.log(
            f"distillation loss {first:.4g} -> {last:.4g} (mean of the first and last {window} steps) "
            f"in {seconds:.1f} s; hidden-state pairs compared: {hidden_pairs}"
        )
        if want_hidden and hidden_pairs == 0:
            ctx.log("no hidden states to compare (different widths or not a transformers model)", "warning")
        info = dict(state.info)
        info["distillation"] = {
            "steps": params.steps,
            "examples": len(examples),
            "loss_start": first,
            "loss_end": last,
            "output_term": output_name,
            "hidden_pairs": hidden_pairs,
            "pruned_weights_kept_zero": kept_zeros,
            "seconds": round(seconds, 3),
        }
        return StageState(
            kind="torch",
            model=state.model,
            module=student,
            path=None,
            transforms=list(state.transforms),
            info=info,
        )
