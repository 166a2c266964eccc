"""quantize.weight_only with clip_search: each group is rounded on the clipped range closest to its float
weights, stored exactly as plain round-to-nearest codes are."""

from __future__ import annotations

import pytest


def _error(layer, weight) -> float:
    import torch

    return float((layer.dequantize(torch.float32) - weight).pow(2).sum())


# Squared error with the search over without it, at most (Student-t weights: 4 bits 0.94 / 0.97; at 8 bits
# the step is fine enough that clipping an outlier never pays, so the search keeps the full ranges).
@pytest.mark.parametrize(("bits", "symmetric", "ratio"), [(4, True, 0.96), (4, False, 0.98), (8, True, 1.0)])
def test_clipped_ranges_round_closer_group_by_group(bits, symmetric, ratio):
    import torch

    from studio.techniques.clip_search import clipped_weight
    from studio.techniques.quantized_layers import WeightOnlyLinear

    torch.manual_seed(0)
    weight = torch.distributions.StudentT(3.0).sample((48, 256))  # heavy tails: outliers in most groups
    plain = WeightOnlyLinear.from_float(weight, None, bits, 64, symmetric)
    clipped = WeightOnlyLinear.from_float(
        clipped_weight(weight, bits, 64, symmetric), None, bits, 64, symmetric
    )
    per_group = lambda layer: (layer.dequantize(torch.float32) - weight).pow(2).reshape(48, 4, 64).sum(-1)  # noqa: E731
    assert bool((per_group(clipped) <= per_group(plain) + 1e-6).all())  # ratio 1.0 is among those tried
    assert _error(clipped, weight) <= ratio * _error(plain, weight)
    assert clipped.qweight.shape == plain.qweight.shape and clipped.scales.shape == plain.scales.shape


def test_weight_only_clip_search_stores_closer_codes_that_reopen(bert_classifier, tmp_path):
    import torch

    from studio.checkpoints import open_checkpoint
    from studio.pipeline import execute_steps, load_recipe, plan, save_state

    model = open_checkpoint(bert_classifier)
    errors = {}
    for clip in (False, True):
        recipe = tmp_path / f"clip-{clip}.yaml"
        recipe.write_text(
            f"version: 1\nmodel: {bert_classifier}\nsteps:\n  - technique: quantize.weight_only\n"
            f"    params: {{bits: 4, group_size: 16, embeddings: true, clip_search: {str(clip).lower()}}}\n"
        )
        planned = plan(load_recipe(recipe), model)
        state, _ = execute_steps(planned, tmp_path / f"work-{clip}", [], lambda _e: None)
        layers = {n: m for n, m in state.module.named_modules() if type(m).__name__.startswith("WeightOnly")}
        floats = dict(model.module.named_modules())
        errors[clip] = sum(_error(m, floats[n].weight.detach()) for n, m in layers.items())
        save_state(state, tmp_path / f"artifact-{clip}", [], 16)
    assert errors[True] < 0.95 * errors[False]
    reopened = open_checkpoint(tmp_path / "artifact-True")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(reopened.module(input_ids=ids).logits, state.module(input_ids=ids).logits)
