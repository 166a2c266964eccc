"""Quality per family, always as fidelity against the baseline and, when the data has labels, as the task metric.

The baseline and the variant are run on the same batches in lockstep, so per-token outputs (LM logits)
never have to be kept for the whole data set. Each accumulator also remembers per-example scores, so a
comparison can show the examples where two models disagree most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from studio.errors import BadInput
from studio.families import Batch


@dataclass
class Disagreement:
    index: int  # example index in the evaluation data
    score: float  # lower = more different (cosine, agreement, sentence BLEU)
    detail: str = ""


@dataclass
class QualityAccumulator:
    family: str
    examples: list[Any]
    per_example: list[float] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    offset: int = 0

    def _add(self, name: str, value: float, count: float = 1.0) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0.0) + count

    def _mean(self, name: str) -> float | None:
        c = self.counts.get(name, 0.0)
        return self.sums[name] / c if c else None

    def add(self, batch: Batch, base: Any, var: Any) -> None:
        import torch
        import torch.nn.functional as F

        base, var = base.float(), var.float()
        n = base.shape[0]
        if self.family == "feature-extraction":
            cos = F.cosine_similarity(base, var, dim=-1)
            self.per_example += cos.tolist()
            self.details += [""] * n
        elif self.family in ("text-classification", "image-classification"):
            agree = (base.argmax(-1) == var.argmax(-1)).float()
            cos = F.cosine_similarity(base, var, dim=-1)
            self.per_example += (agree + cos / 10).tolist()  # disagreements first, then by output cosine
            self.details += [
                f"baseline class {int(b)}, variant class {int(v)}"
                for b, v in zip(base.argmax(-1), var.argmax(-1), strict=True)
            ]
            self._add("top1_agreement", float(agree.sum()), n)
            self._add("output_cosine", float(cos.sum()), n)
            if batch.labels is not None and self.family == "text-classification":
                self._add("baseline_accuracy", float((base.argmax(-1) == batch.labels).sum()), n)
                self._add("accuracy", float((var.argmax(-1) == batch.labels).sum()), n)
        elif self.family == "causal-lm":
            ids = batch.inputs["input_ids"]
            mask = batch.inputs.get("attention_mask", torch.ones_like(ids)).float()
            tgt, m = ids[:, 1:], mask[:, 1:]
            for name, logits in (("baseline_nll", base), ("nll", var)):
                logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
                nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                self._add(name, float((nll * m).sum()), float(m.sum()))
            self._token_metrics(base, var, mask, n)
        elif self.family == "seq2seq":
            targets = (batch.labels != -100).float() if batch.labels is not None else None
            self._token_metrics(base, var, targets, n)
        else:
            diff = (base - var).flatten(1).pow(2).mean(1).sqrt()
            self.per_example += (-diff).tolist()
            self.details += [""] * n
            self._add("rmse", float(diff.sum()), n)
        self.offset += n

    def _token_metrics(self, base: Any, var: Any, mask: Any, n: int) -> None:
        import torch.nn.functional as F

        agree = (base.argmax(-1) == var.argmax(-1)).float()
        p = F.log_softmax(base.double(), dim=-1)
        q = F.log_softmax(var.double(), dim=-1)
        kl = (p.exp() * (p - q)).sum(-1).clamp(min=0)
        m = mask if mask is not None else agree.new_ones(agree.shape)
        self._add("top1_agreement", float((agree * m).sum()), float(m.sum()))
        self._add("kl_divergence", float((kl * m).sum()), float(m.sum()))
        per = ((agree * m).sum(1) / m.sum(1).clamp(min=1)).tolist()
        self.per_example += per
        self.details += [f"{a * 100:.0f}% of tokens agree" for a in per]

    def results(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(baseline quality, variant quality)."""
        base: dict[str, Any] = {}
        var: dict[str, Any] = {}
        if self.family == "feature-extraction":
            var["fidelity_cosine"] = sum(self.per_example) / len(self.per_example)
            var["fidelity_cosine_min"] = min(self.per_example)
            base["fidelity_cosine"] = 1.0
        for name in ("top1_agreement", "output_cosine", "kl_divergence", "rmse"):
            if self._mean(name) is not None:
                var[name] = self._mean(name)
        if "top1_agreement" in var:
            base["top1_agreement"] = 1.0
        if self._mean("accuracy") is not None:
            var["accuracy"] = self._mean("accuracy")
            base["accuracy"] = self._mean("baseline_accuracy")
        nll, baseline_nll = self._mean("nll"), self._mean("baseline_nll")
        if nll is not None and baseline_nll is not None:  # added together, so both or neither
            var["perplexity"] = math.exp(nll)
            base["perplexity"] = math.exp(baseline_nll)
        return base, var

    def worst(self, k: int = 5) -> list[dict[str, Any]]:
        order = sorted(range(len(self.per_example)), key=lambda i: self.per_example[i])[:k]
        return [
            {
                "index": i,
                "text": getattr(self.examples[i], "text", ""),
                "score": round(self.per_example[i], 6),
                "detail": self.details[i],
            }
            for i in order
        ]


def spearman_on_pairs(scores: list[float], similarities: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(scores, similarities).statistic)


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """BLEU and chrF (sacrebleu) of generated outputs against references."""
    import sacrebleu

    return {
        "bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score),
        "chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score),
    }


def sentence_bleu(hypothesis: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score)


def sliding_window_nll(logits_of: Any, ids: Any, window: int, stride: int) -> tuple[float, int]:
    """Summed next-token NLL of the whole token stream `ids` (1-D) and how many tokens it scored.

    Windows of `window` tokens start every `stride` tokens; each window scores only the tokens no earlier
    window scored, so every token after the first is scored once, with up to `window - stride` tokens of
    context before the scored part (the usual strided perplexity: not one truncated window, and not
    windows that restart without context). `logits_of(window_ids [1, L]) -> logits [1, L, vocab]`.
    """
    import torch.nn.functional as F

    if window < 2:
        raise BadInput(f"a perplexity window needs at least 2 tokens, got {window}")
    stride = max(1, min(stride, window))
    n = int(ids.shape[0])
    total, count, scored_to = 0.0, 0, 1  # token 0 has nothing before it
    begin = 0
    while scored_to < n:
        end = min(begin + window, n)
        chunk = ids[begin:end].unsqueeze(0)
        logp = F.log_softmax(logits_of(chunk)[0, :-1].double(), dim=-1)  # position i predicts token i + 1
        first = scored_to - begin  # index in the chunk of the first token not scored yet
        targets = chunk[0, first:]
        nll = -logp[first - 1 :].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        total += float(nll.sum())
        count += int(targets.numel())
        scored_to = end
        if end == n:
            break
        begin = min(begin + stride, scored_to - 1)  # the next window keeps at least one token of context
    return total, count


def sliding_window_perplexity(logits_of: Any, ids: Any, window: int, stride: int) -> float:
    total, count = sliding_window_nll(logits_of, ids, window, stride)
    return math.exp(total / count) if count else float("nan")


def generation_match(baseline_tokens: Any, variant_tokens: Any) -> float:
    """Mean share, over prompts, of the greedy new tokens that agree with the baseline's before the first
    difference (1.0: the variant generates exactly the baseline's text)."""
    rows = []
    for base, var in zip(baseline_tokens.tolist(), variant_tokens.tolist(), strict=True):
        same = 0
        for a, b in zip(base, var, strict=True):
            if a != b:
                break
            same += 1
        rows.append(same / len(base) if base else 1.0)
    return sum(rows) / len(rows) if rows else 1.0


def generated_text_scores(
    baseline: list[str], variant: list[str], references: list[str] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(baseline quality, variant quality) of generated texts: `bleu` and `chrf` of the variant's against
    the baseline's (fidelity: 100 when it generates the same text; the baseline's own is 100), and, when
    the data has references, `reference_bleu` / `reference_chrf` of each against them.

    Equal texts score 100 without sacrebleu: corpus BLEU has no 4-grams to count in outputs of fewer than
    four words (a few new tokens) and would give 0 to a variant that generates exactly the baseline's."""
    same = {"bleu": 100.0, "chrf": 100.0} if variant == baseline else corpus_scores(variant, baseline)
    base: dict[str, Any] = {"bleu": 100.0, "chrf": 100.0}
    var: dict[str, Any] = dict(same)
    if references is not None:
        for scores, texts in ((base, baseline), (var, variant)):
            scored = corpus_scores(texts, references)
            scores["reference_bleu"], scores["reference_chrf"] = scored["bleu"], scored["chrf"]
    return base, var


def translation_quality(
    base_module: Any, variant: Any, model: Any, examples: list[Any], spec: Any, kind: str = "torch"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """BLEU and chrF of a seq2seq variant's greedy translations (a torch module, or for kind "onnx" a graph
    exported with its caches) against the torch baseline's and, where the examples have targets, against
    them: up to 8 examples, each source alone (no padding), `spec.new_tokens` new tokens at most."""
    from studio.evaluation.generation import greedy_loop, translations

    chosen = examples[: min(8, len(examples))]
    base = translations(greedy_loop("torch", base_module, "seq2seq"), model, chosen, spec)
    var = translations(greedy_loop(kind, variant, "seq2seq"), model, chosen, spec)
    targets = [getattr(e, "target", None) for e in chosen]
    references = [str(t) for t in targets] if all(t is not None for t in targets) else None
    return generated_text_scores(base, var, references)
