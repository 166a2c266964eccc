"""Model families: how a model is fed and judged (recognising one is `studio.checkpoints.recognise`).

A family knows which inputs its models take (text, text + targets, images), which output the studio
compares between variants (pooled embeddings, logits), and which loss measures it. Inspection (head
importance), techniques (distillation) and evaluation (fidelity) all go through these objects so the
same model is always fed and judged the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from studio.errors import BadInput

if TYPE_CHECKING:
    import torch

    from studio.checkpoints.base import LoadedModel
    from studio.evaluation.data import Example


@dataclass
class Batch:
    """Model inputs plus what the family needs to judge outputs (attention mask, targets)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None  # class ids (classifier) or target token ids (LMs, seq2seq)


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def accepted_inputs(model: LoadedModel) -> tuple[str, ...]:
    """The text inputs the model's forward takes (Marian and GPT-2 take no token_type_ids)."""
    import inspect

    if model.format in ("onnx", "openvino"):  # the graph's (the IR's) inputs, recorded when it was opened
        return tuple(k for k in TEXT_INPUTS if k in (model.input_names or ()))
    try:
        params = inspect.signature(model.module.forward).parameters
    except (TypeError, ValueError):
        return TEXT_INPUTS
    names: tuple[str, ...]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and "input_ids" not in params:
        names = TEXT_INPUTS
    else:
        names = tuple(k for k in TEXT_INPUTS if k in params)
    # GPT-2's forward takes token_type_ids but adds a token embedding for them: only models with a
    # segment embedding (BERT's type_vocab_size) should get the tokenizer's segment ids.
    if not getattr(model.config, "type_vocab_size", 0):
        names = tuple(k for k in names if k != "token_type_ids")
    return names


def _hf_primary(out: Any) -> torch.Tensor:
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


class Family:
    name = "generic"
    takes_text = True

    def batch(self, model: LoadedModel, examples: Sequence[Example], seq_len: int) -> Batch:
        tok = model.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        enc = tok(
            [e.text for e in examples],
            padding=True,
            truncation=True,
            max_length=seq_len,
            return_tensors="pt",
        )
        accepted = accepted_inputs(model)
        inputs = {k: v for k, v in enc.items() if k in accepted}
        return Batch(inputs=inputs)

    def forward(self, module: Any, batch: Batch) -> torch.Tensor:
        """The output the family compares (pooled embeddings, logits), differentiable."""
        return self.from_primary(_hf_primary(module(**batch.inputs)), batch)

    def from_primary(self, primary: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The compared output from the model's first output (what an ONNX graph or engine returns):
        logits as they are; encoders pool their last hidden state."""
        return primary

    def loss(self, module: Any, batch: Batch, reference: torch.Tensor) -> tuple[torch.Tensor, str]:
        """A scalar training-style loss and its name; `reference` is the unmasked output (detached)."""
        raise BadInput(f"no loss is defined for {self.name} models")

    def divergence(self, reference: torch.Tensor, output: torch.Tensor, batch: Batch) -> float:
        """How far `output` moved from `reference`: 0 when identical."""
        return float((reference - output).pow(2).mean().sqrt())


def _token_kl(reference: torch.Tensor, output: torch.Tensor, mask: torch.Tensor | None) -> float:
    import torch.nn.functional as F

    p = F.log_softmax(reference.double(), dim=-1)  # float64: tiny divergences must not round to <= 0
    q = F.log_softmax(output.double(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1).clamp(min=0)
    if mask is not None and kl.dim() == mask.dim():
        return float((kl * mask).sum() / mask.sum().clamp(min=1))
    return float(kl.mean())


class FeatureExtraction(Family):
    """Encoders used for embeddings (MiniLM): compared by the cosine of pooled, normalised embeddings."""

    name = "feature-extraction"

    def __init__(self, pooling: str = "mean", normalize: bool = False, temperature: float = 0.05) -> None:
        self.pooling = pooling
        self.normalize = normalize
        self.temperature = temperature

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        import torch.nn.functional as F

        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            if attention_mask is None:
                pooled = hidden.mean(1)
            else:
                m = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, module: Any, batch: Batch) -> torch.Tensor:
        out = module(**batch.inputs, output_hidden_states=True)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]
        return self.from_primary(hidden, batch)

    def from_primary(self, primary: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.pool(primary.float(), batch.inputs.get("attention_mask"))

    def loss(self, module: Any, batch: Batch, reference: torch.Tensor) -> tuple[torch.Tensor, str]:
        """In-batch contrastive loss (InfoNCE) of each embedding against the detached original embeddings.

        A distance to the original output has zero gradient at the unmasked model; InfoNCE does not, and it
        rewards exactly what embeddings are for: telling sentences apart.
        """
        import torch
        import torch.nn.functional as F

        emb = F.normalize(self.forward(module, batch), dim=-1)
        ref = F.normalize(reference.detach(), dim=-1)
        logits = emb @ ref.T / self.temperature
        target = torch.arange(len(emb), device=emb.device)
        return F.cross_entropy(logits, target), f"InfoNCE (in-batch, temperature {self.temperature})"

    def divergence(self, reference: torch.Tensor, output: torch.Tensor, batch: Batch) -> float:
        import torch.nn.functional as F

        return float(1.0 - F.cosine_similarity(reference.float(), output.float(), dim=-1).mean())


class MaskedLM(FeatureExtraction):
    """An encoder with its masked-LM head: embeddings are compared, the loss is the masked-LM loss."""

    def loss(self, module: Any, batch: Batch, reference: torch.Tensor) -> tuple[torch.Tensor, str]:
        import torch

        ids = batch.inputs["input_ids"]
        gen = torch.Generator().manual_seed(0)
        special = ids.new_zeros(ids.shape, dtype=torch.bool)
        special[:, 0] = True
        mask = batch.inputs.get("attention_mask")
        if mask is not None:
            lengths = mask.sum(1)
            special[torch.arange(len(ids)), (lengths - 1).clamp(min=0)] = True
            special |= mask == 0
        chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & ~special
        mask_id = getattr(module.config, "mask_token_id", None) or 103
        masked = ids.masked_fill(chosen, mask_id)
        labels = ids.masked_fill(~chosen, -100)
        out = module(**{**batch.inputs, "input_ids": masked}, labels=labels)
        return out.loss, "masked-LM loss (15% of tokens masked, seed 0)"


class TextClassification(Family):
    name = "text-classification"

    def batch(self, model: LoadedModel, examples: Sequence[Example], seq_len: int) -> Batch:
        import torch

        b = super().batch(model, examples, seq_len)
        labels = [e.label for e in examples]
        if all(lbl is not None for lbl in labels):
            b.labels = torch.tensor(labels)
        return b

    def loss(self, module: Any, batch: Batch, reference: torch.Tensor) -> tuple[torch.Tensor, str]:
        import torch.nn.functional as F

        logits = self.forward(module, batch)
        if batch.labels is not None:
            return F.cross_entropy(logits, batch.labels), "cross-entropy against the given labels"
        return (
            F.cross_entropy(logits, reference.argmax(-1)),
            "cross-entropy against the model's own predictions (no labels given)",
        )

    def divergence(self, reference: torch.Tensor, output: torch.Tensor, batch: Batch) -> float:
        return _token_kl(reference, output, None)


class CausalLM(Family):
    name = "causal-lm"

    def loss(self, module: Any, batch: Batch, reference: torch.Tensor) -> tuple[torch.Tensor, str]:
        ids = batch.inputs["input_ids"]
        mask = batch.inputs.get("attention_mask")
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        out = module(**batch.inputs, labels=labels)
        return out.loss, "causal-LM loss (next-token cross-entropy on the text)"

    def divergence(self, reference: torch.Tensor, output: torch.Tensor, batch: Batch) -> float:
        return _token_kl(reference, output, batch.inputs.get("attention_mask"))


class Seq2Seq(Family):
    """Encoder-decoder models: teacher-forced on references, or on the model's own greedy outputs."""

    name = "seq2seq"

    def __init__(self, max_new_tokens: int = 32) -> None:
        self.max_new_tokens = max_new_tokens

    def batch(self, model: LoadedModel, examples: Sequence[Example], seq_len: int) -> Batch:
        import torch

        b = super().batch(model, examples, seq_len)
        tok = model.tokenizer
        targets = [e.target for e in examples]
        if all(t is not None for t in targets):
            enc = tok(
                text_target=targets, padding=True, truncation=True, max_length=seq_len, return_tensors="pt"
            )
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            self.objective = "seq2seq loss against the given references"
        else:
            if model.format == "onnx":
                raise BadInput(
                    "a seq2seq ONNX graph cannot generate its own targets here: give evaluation data with "
                    "references (a 'target' field, e.g. builtin:translation-en-de)",
                    path=model.path,
                )
            with torch.no_grad():
                gen = model.module.generate(
                    **b.inputs, max_new_tokens=min(self.max_new_tokens, seq_len), do_sample=False, num_beams=1
                )
            labels = gen[:, 1:]  # drop the decoder start token
            pad = model.module.config.pad_token_id
            if pad is not None:
                labels = labels.masked_fill(labels == pad, -100)
            self.objective = "seq2seq loss against the model's own greedy outputs (no references given)"
        b.labels = labels
        return b

    def forward(self, module: Any, batch: Batch) -> torch.Tensor:
        return module(**batch.inputs, labels=batch.labels).logits

    @staticmethod
    def decoder_input_ids(batch: Batch, config: Any) -> torch.Tensor:
        """Teacher-forcing decoder inputs: the labels shifted right behind the decoder start token
        (what the model computes internally from `labels`; an exported graph takes them explicitly)."""
        labels = batch.labels
        if labels is None:
            raise BadInput("a seq2seq batch without target token ids (labels) has no decoder inputs")
        start = (
            config.decoder_start_token_id
            if config.decoder_start_token_id is not None
            else config.pad_token_id
        )
        if start is None or config.pad_token_id is None:
            raise BadInput(
                "the seq2seq config sets neither decoder_start_token_id nor pad_token_id, so the decoder "
                "inputs cannot be built: set them in config.json (Marian uses the pad token for both)"
            )
        shifted = labels.new_full(labels.shape, start)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, config.pad_token_id)

    def loss(self, module: Any, batch: Batch, reference: torch.Tensor) -> tuple[torch.Tensor, str]:
        out = module(**batch.inputs, labels=batch.labels)
        return out.loss, getattr(self, "objective", "seq2seq loss")

    def divergence(self, reference: torch.Tensor, output: torch.Tensor, batch: Batch) -> float:
        mask = None if batch.labels is None else (batch.labels != -100).float()
        return _token_kl(reference, output, mask)


class ImageClassification(Family):
    """CNNs and vision transformers: fed seeded random images unless images are given."""

    name = "image-classification"
    takes_text = False

    def __init__(self, image_shape: tuple[int, int, int] = (3, 224, 224)) -> None:
        self.image_shape = image_shape

    def batch(self, model: LoadedModel, examples: Sequence[Example], seq_len: int) -> Batch:
        import torch

        gen = torch.Generator().manual_seed(0)
        images = torch.randn((len(examples), *self.image_shape), generator=gen)
        key = "pixel_values" if model.config is not None else "x"
        return Batch(inputs={key: images})

    def forward(self, module: Any, batch: Batch) -> torch.Tensor:
        if "x" in batch.inputs:
            return _hf_primary(module(batch.inputs["x"]))
        return _hf_primary(module(**batch.inputs))

    def loss(self, module: Any, batch: Batch, reference: torch.Tensor) -> tuple[torch.Tensor, str]:
        import torch.nn.functional as F

        return F.cross_entropy(
            self.forward(module, batch), reference.argmax(-1)
        ), "cross-entropy (own predictions)"

    def divergence(self, reference: torch.Tensor, output: torch.Tensor, batch: Batch) -> float:
        return _token_kl(reference, output, None)


# One class per family name (`studio.checkpoints.recognise.FAMILIES`); MaskedLM is a feature-extraction
# model whose loss differs, chosen by `family_for` from the architecture.
FAMILY_CLASSES: dict[str, type[Family]] = {
    cls.name: cls
    for cls in (FeatureExtraction, TextClassification, CausalLM, Seq2Seq, ImageClassification, Family)
}


def family_for(model: LoadedModel) -> Family:
    """The family object that feeds and judges `model`."""
    if model.family == "feature-extraction":
        pooling, normalize = model.pooling or "mean", model.normalize
        if model.architecture and model.architecture.endswith("ForMaskedLM"):
            return MaskedLM(pooling, normalize)
        return FeatureExtraction(pooling, normalize)
    if model.family == "image-classification":
        return ImageClassification(image_shape_of(model))
    return FAMILY_CLASSES.get(model.family, Family)()


def context_length(model: LoadedModel) -> int | None:
    """The most positions the model can attend to (None when its config does not say)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_target_positions"):
        value = getattr(config, name, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def image_shape_of(model: LoadedModel) -> tuple[int, int, int]:
    cfg = model.config
    if cfg is not None and getattr(cfg, "image_size", None):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        return (getattr(cfg, "num_channels", 3), size, size)
    return (3, 224, 224)
