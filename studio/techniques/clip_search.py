"""Clipped ranges for round-to-nearest weight-only codes (`quantize.weight_only` with `clip_search`).

Round-to-nearest maps each group's largest-magnitude weight to the end of the code range, so one outlier
stretches the step of every other weight in its group. Shrinking the range to a fraction of that maximum
clips the outlier but rounds the rest on a finer grid; per group, the fraction with the smallest squared
error of the dequantized weights wins (the range search of AWQ / llama.cpp, here without activations).
The codes and scales are stored exactly as without the search, so nothing changes for loading or sizing.

Measured on MiniLM (64 held-out sentences, mean cosine to float32): vocabulary table at 4 bits, groups of
128: 0.9982 -> 0.9984; 3 bits, groups of 64: 0.9949 -> 0.9957; the encoder's Linear layers at 4 bits
with the two last FFNs at 8 bits: see resources/recipes/minilm-tiny.yaml.
"""

from __future__ import annotations

from typing import Any

# Fractions of each group's largest |weight| tried as the end of its code range.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def clipped_weight(weight: Any, bits: int, group: int, symmetric: bool) -> Any:
    """`weight` [out, in] with each group of `group` input columns clamped to the range (a fraction of its
    largest |weight|) whose round-to-nearest codes are closest to the unclamped weights."""
    import torch

    from studio.techniques.quantized_layers import WeightOnlyLinear

    w = weight.detach().to(torch.float32)
    out, width = w.shape
    groups = w.reshape(out, width // group, group)
    peak = groups.abs().amax(dim=-1, keepdim=True)
    best = groups
    best_error = torch.full(peak.shape[:2], float("inf"))
    for ratio in CLIP_RATIOS:
        limit = peak * ratio
        candidate = torch.minimum(torch.maximum(groups, -limit), limit)
        layer = WeightOnlyLinear.from_float(candidate.reshape(out, width), None, bits, group, symmetric)
        error = (layer.dequantize(torch.float32).reshape(groups.shape) - groups).pow(2).sum(-1)
        better = error < best_error
        best = torch.where(better.unsqueeze(-1), candidate, best)
        best_error = torch.where(better, error, best_error)
    return best.reshape(out, width).to(weight.dtype)


def requantize_clipped(layer: Any, weight: Any) -> Any:
    """A weight-only layer (`WeightOnlyLinear` or `WeightOnlyEmbedding`) like `layer`, its codes rounded
    from `weight` (the float weight it was built from) on the best clipped ranges."""
    clipped = clipped_weight(weight, layer.bits, layer.group_size, layer.symmetric)
    return type(layer).from_float(
        clipped.to(layer.dtype), layer.bias, layer.bits, layer.group_size, layer.symmetric, layer.scales.dtype
    )
