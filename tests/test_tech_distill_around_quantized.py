"""distill with around_quantized: after weight-only quantization, the float parameters left beside the
quantized layers (biases, LayerNorms) train toward the original while the stored codes and scales stay."""

from __future__ import annotations

import pytest

from studio.errors import BadInput


def _ctx(model, examples, tmp_path):
    from studio.techniques.base import RunContext

    events: list[dict] = []
    ctx = RunContext(
        original=model,
        workdir=tmp_path,
        calibration=examples,
        sequence_length=32,
        step_index=2,
        emit=events.append,
    )
    return ctx, events


def _held_out_kl(model, family, held, module) -> float:
    """KL divergence of the held-out logits, original -> `module`."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        ref = family.forward(model.module, held).log_softmax(-1)
        out = family.forward(module, held).log_softmax(-1)
    return float(F.kl_div(out, ref, log_target=True, reduction="batchmean"))


def _quantized(model, tmp_path, technique: str, **params):
    from studio.techniques.base import get_technique, initial_state

    block = get_technique(technique)
    ctx, _ = _ctx(model, [], tmp_path)
    return block().run(initial_state(model), block.Params(**params), ctx)


def test_trains_the_float_parameters_around_4bit_layers(bert_classifier, tmp_path):
    import torch

    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples
    from studio.families import family_for
    from studio.techniques.base import get_technique

    model = open_checkpoint(bert_classifier)
    family = family_for(model)
    data = load_examples("builtin:sentences", 160)
    train, held_out = data[:96], data[96:160]
    state = _quantized(model, tmp_path, "quantize.weight_only", bits=4, group_size=16, embeddings=True)
    codes_before = {
        k: v.clone() for k, v in state.module.state_dict().items() if k.endswith(("qweight", "scales"))
    }
    assert codes_before  # the classifier really holds 4-bit layers
    held = family.batch(model, held_out, 32)
    before = _held_out_kl(model, family, held, state.module)
    technique = get_technique("distill")
    ctx, _ = _ctx(model, train, tmp_path)
    params = technique.Params(steps=40, learning_rate=3e-3, batch_size=16, alpha=1.0, around_quantized=True)
    out = technique().run(state, params, ctx)
    after = _held_out_kl(model, family, held, out.module)
    assert after < before * 0.9, (before, after)  # held-out sentences, not the ones trained on
    for k, v in out.module.state_dict().items():
        if k in codes_before:
            assert torch.equal(v, codes_before[k]), k  # codes and scales as stored
    layer = out.module.bert.encoder.layer[0].output.dense
    assert type(layer).__name__ == "WeightOnlyLinear"
    assert not torch.equal(layer.bias, model.module.bert.encoder.layer[0].output.dense.bias)
    assert not layer.bias.requires_grad  # flags restored as the quantization left them


def test_refuses_layers_that_pass_no_gradients(bert_classifier, tmp_path):
    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples
    from studio.techniques.base import get_technique

    model = open_checkpoint(bert_classifier)
    state = _quantized(model, tmp_path, "quantize.dynamic_int8")
    technique = get_technique("distill")
    ctx, _ = _ctx(model, load_examples("builtin:sentences", 8), tmp_path)
    with pytest.raises(BadInput, match=r"pass no gradients \(bert\.encoder"):
        technique().run(state, technique.Params(steps=1, around_quantized=True), ctx)
    with pytest.raises(BadInput, match="distill before quantizing"):
        technique().run(state, technique.Params(steps=1), ctx)


@pytest.mark.parametrize("half", [False, True])  # float16 scales train as float32 and are stored back
def test_train_scales_tunes_the_scales_and_keeps_the_codes(bert_classifier, tmp_path, half):
    import torch

    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples
    from studio.families import family_for
    from studio.techniques.base import get_technique

    model = open_checkpoint(bert_classifier)
    family = family_for(model)
    data = load_examples("builtin:sentences", 160)
    train, held = data[:96], family.batch(model, data[96:160], 32)
    state = _quantized(
        model, tmp_path, "quantize.weight_only", bits=4, group_size=16, embeddings=True, scale_float16=half
    )
    stored = {k: v.clone() for k, v in state.module.state_dict().items() if k.endswith(("qweight", "scales"))}
    before = _held_out_kl(model, family, held, state.module)
    technique = get_technique("distill")
    ctx, _ = _ctx(model, train, tmp_path)
    params = technique.Params(
        steps=40, learning_rate=3e-3, batch_size=16, alpha=1.0, around_quantized=True, train_scales=True
    )
    out = technique().run(state, params, ctx)
    assert _held_out_kl(model, family, held, out.module) < before * 0.9
    after = out.module.state_dict()
    codes = [k for k in stored if k.endswith("qweight")]
    scales = [k for k in stored if k.endswith("scales")]
    assert codes and scales
    assert all(torch.equal(after[k], stored[k]) for k in codes)  # the integer codes as stored
    changed = [k for k in scales if not torch.equal(after[k], stored[k])]
    assert "bert.embeddings.word_embeddings.scales" in changed and len(changed) == len(scales)
    assert all(after[k].dtype == stored[k].dtype and after[k].shape == stored[k].shape for k in scales)
    assert not any(t.requires_grad for t in after.values())
    with pytest.raises(ValueError, match="needs around_quantized"):
        technique.Params(train_scales=True)
