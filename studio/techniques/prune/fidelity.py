"""How far a pruned module moved from the original: the advisory metrics every pruning block reports."""

from __future__ import annotations

from typing import Any

from studio.techniques.base import RunContext

FIDELITY_EXAMPLES = 16


def report_fidelity(ctx: RunContext, model: Any, module: Any) -> dict[str, float]:
    """How far the pruned module moved from the original on up to 16 calibration examples, as metrics:
    `fidelity_cosine` (mean cosine of pooled embeddings) for encoders, `output_divergence` for every family."""
    import torch

    from studio.families import FeatureExtraction, family_for

    examples = list(ctx.calibration)[:FIDELITY_EXAMPLES]
    if not examples or not ctx.original.runnable or ctx.original.format == "onnx":
        return {}
    family = family_for(model)
    if family.takes_text and model.tokenizer_dir is None:
        return {}
    try:
        batch = family.batch(ctx.original, examples, min(ctx.sequence_length, 128))
        with torch.no_grad():
            reference = family.forward(ctx.original.module, batch).float()
            output = family.forward(module, batch).float()
    except Exception as exc:  # advisory only: e.g. an exported reference graph fixed to another batch size
        ctx.log(f"fidelity not measured: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", "warning")
        return {}
    out = {"output_divergence": family.divergence(reference, output, batch)}
    if isinstance(family, FeatureExtraction):
        out["fidelity_cosine"] = float(
            torch.nn.functional.cosine_similarity(reference, output, dim=-1).mean()
        )
    for name, value in out.items():
        ctx.metric(name, value, examples=len(examples))
    return out
