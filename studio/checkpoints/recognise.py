"""Which family a checkpoint belongs to, told from what opening it already read.

Each format reader calls one recogniser: a Hugging Face folder by its architecture name and config, a
weights-only file by its tensor names, a torch module by its layers, an ONNX graph by its inputs and
outputs. The names returned are the studio's family vocabulary (`FAMILIES`); `studio.families` gives
each name the object that feeds and judges such a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Every family a checkpoint can be recognised as (or declare in its ONNX metadata, or a recipe's task);
# `studio.families.FAMILY_CLASSES` has one class for each.
FAMILIES = (
    "feature-extraction",
    "text-classification",
    "causal-lm",
    "seq2seq",
    "image-classification",
    "generic",
)


def family_from_architecture(arch: str, config: Any) -> str:
    if arch.endswith(("ForSequenceClassification", "ForTokenClassification", "ForMultipleChoice")):
        return "text-classification"
    if arch.endswith("ForImageClassification"):
        return "image-classification"
    if getattr(config, "is_encoder_decoder", False) and (
        arch.endswith(("ForConditionalGeneration", "MTModel", "ForSeq2SeqLM"))
        or arch == "AutoModelForSeq2SeqLM"
    ):
        return "seq2seq"
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    model_type = getattr(config, "model_type", "")
    if model_type in ("resnet", "convnext", "vit", "mobilenet_v2", "efficientnet", "regnet"):
        return "image-classification"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "feature-extraction"


def family_from_tensor_names(names: Sequence[str]) -> str:
    """A best guess for weights-only checkpoints (informational: nothing is run from them)."""
    joined = "\n".join(names)
    if "lm_head" in joined and "decoder" in joined and "encoder" in joined:
        return "seq2seq"
    if "lm_head" in joined:
        return "causal-lm"
    if "classifier" in joined or ".score." in joined:
        return "text-classification"
    if "attention" in joined or "attn" in joined:
        return "feature-extraction"
    if "conv" in joined:
        return "image-classification"
    return "generic"


def family_from_module(module: Any) -> str:
    """Plain torch modules (TorchScript, ExportedProgram, pickled): a conv net is an image classifier."""
    names = [getattr(m, "original_name", type(m).__name__) for m in module.modules()]
    if any(n.startswith("Conv2d") for n in names):
        return "image-classification"
    if any(p.dim() == 4 for p in module.parameters()):
        return "image-classification"
    return "generic"


def family_from_onnx(model: Any) -> str:
    inputs = {i.name for i in model.graph.input}
    outputs = [o.name for o in model.graph.output]
    if "decoder_input_ids" in inputs:
        return "seq2seq"
    if "input_ids" in inputs:
        if any("hidden" in o or "embedding" in o for o in outputs):
            return "feature-extraction"
        if any(o.startswith("present") for o in outputs) or any(i.startswith("past") for i in inputs):
            return "causal-lm"
        return "feature-extraction"
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        if len(dims) == 4:
            return "image-classification"
    return "generic"
