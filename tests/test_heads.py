"""Attention-head masking and importance on real architectures."""

from __future__ import annotations

import math

import pytest

from studio.checkpoints import open_checkpoint
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.families import family_for
from studio.inspection.attention import find_attention_blocks, head_mask
from studio.inspection.heads import compute_head_importance

ARCHS = ["bert_classifier", "gpt2", "llama", "marian"]


def _model(request, name):
    return open_checkpoint("builtin:minilm" if name == "minilm" else request.getfixturevalue(name))


@pytest.fixture(scope="module")
def sentences():
    return load_examples("builtin:sentences", 8)


@pytest.mark.parametrize("name", ["minilm", *ARCHS])
def test_hook_is_bit_identical_at_ones(request, name, sentences):
    import torch

    model = _model(request, name)
    family = family_for(model)
    batch = family.batch(model, sentences, 32)
    blocks, _ = find_attention_blocks(model.module)
    with torch.no_grad():
        plain = family.forward(model.module, batch)
        with head_mask(blocks):
            hooked = family.forward(model.module, batch)
        after = family.forward(model.module, batch)
    assert torch.equal(plain, hooked)
    assert torch.equal(plain, after)  # hooks are removed


@pytest.mark.parametrize("name", ["minilm", *ARCHS])
def test_zeroing_a_head_by_hook_equals_zeroing_its_weight_slice(request, name, sentences):
    import torch

    model = _model(request, name)
    family = family_for(model)
    batch = family.batch(model, sentences, 32)
    blocks, _ = find_attention_blocks(model.module)
    block, head = blocks[-1], 1
    values = [torch.ones(b.num_heads) for b in blocks]
    values[-1][head] = 0.0
    with torch.no_grad():
        with head_mask(blocks, values):
            masked = family.forward(model.module, batch)
        w = block.out_proj.weight
        cols = slice(head * block.head_dim, (head + 1) * block.head_dim)
        saved = w.detach().clone()
        if w.shape[1] == block.num_heads * block.head_dim and type(block.out_proj).__name__ != "Conv1D":
            w[:, cols] = 0.0  # nn.Linear: (out, in)
        else:
            w[cols, :] = 0.0  # transformers Conv1D: (in, out)
        sliced = family.forward(model.module, batch)
        w.copy_(saved)
        unchanged = family.forward(model.module, batch)
    assert torch.allclose(masked, sliced, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(masked, unchanged, atol=1e-6)


def test_blocks_covered_per_architecture(request):
    expect = {
        "minilm": (6, 12, {"encoder self-attention"}),
        "bert_classifier": (2, 4, {"encoder self-attention"}),
        "gpt2": (2, 4, {"self-attention"}),
        "llama": (2, 4, {"self-attention"}),
        "marian": (4, 4, {"encoder self-attention", "decoder self-attention"}),
    }
    for name, (n_blocks, heads, kinds) in expect.items():
        blocks, skipped = find_attention_blocks(_model(request, name).module)
        assert len(blocks) == n_blocks, name
        assert {b.num_heads for b in blocks} == {heads}, name
        assert {b.kind for b in blocks} == kinds, name
        assert len(skipped) == (2 if name == "marian" else 0), name  # Marian's cross-attention


@pytest.mark.parametrize("method", ["gradient", "ablation"])
@pytest.mark.parametrize("name", ARCHS)
def test_importance_on_small_models(request, name, method, sentences):
    model = _model(request, name)
    result = compute_head_importance(model, sentences, method=method, sequence_length=24, batch_size=4)
    assert result.method == method and result.objective
    assert (result.layers, result.heads) == (4 if name == "marian" else 2, 4)
    for row in result.importance:
        assert math.isclose(math.sqrt(sum(v * v for v in row)), 1.0, rel_tol=1e-6)  # normalised per layer
    assert any(v > 0 for row in result.raw for v in row)


def test_objectives_follow_the_family(request, sentences):
    objectives = {
        name: compute_head_importance(_model(request, name), sentences[:4], sequence_length=16).objective
        for name in ["minilm", *ARCHS]
    }
    assert "InfoNCE" in objectives["minilm"]
    assert "own predictions" in objectives["bert_classifier"]
    assert "causal-LM" in objectives["gpt2"] and "causal-LM" in objectives["llama"]
    assert "greedy outputs" in objectives["marian"]


def test_classifier_uses_labels_when_given(request):
    model = open_checkpoint(request.getfixturevalue("bert_classifier"))
    labelled = load_examples("builtin:sentiment", 8)
    result = compute_head_importance(model, labelled, sequence_length=16)
    assert "given labels" in result.objective


def test_minilm_gradient_importance_is_informative(sentences):
    """On the real model, heads differ in importance and zeroing the least important head hurts less."""
    import torch

    model = open_checkpoint("builtin:minilm")
    examples = load_examples("builtin:sentences", 32)
    result = compute_head_importance(model, examples, method="gradient", sequence_length=64)
    flat = [v for row in result.importance for v in row]
    assert max(flat) > 3 * min(flat)
    (lo_l, lo_h, _), (hi_l, hi_h, _) = result.ranked()[0], result.ranked()[-1]
    family = family_for(model)
    batch = family.batch(model, examples, 64)
    blocks, _ = find_attention_blocks(model.module)

    def damage(layer, head):
        values = [torch.ones(b.num_heads) for b in blocks]
        values[layer][head] = 0.0
        with torch.no_grad(), head_mask(blocks, values):
            out = family.forward(model.module, batch)
        return family.divergence(reference, out, batch)

    with torch.no_grad():
        reference = family.forward(model.module, batch)
    assert damage(lo_l, lo_h) < damage(hi_l, hi_h)


def test_no_attention_says_so(cnn_torchscript, sentences):
    model = open_checkpoint(cnn_torchscript)
    with pytest.raises(BadInput, match="no attention heads"):
        compute_head_importance(model, sentences)


def test_onnx_is_refused(tiny_onnx, sentences):
    with pytest.raises(BadInput, match="torch model"):
        compute_head_importance(open_checkpoint(tiny_onnx), sentences)
