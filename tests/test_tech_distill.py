"""Distillation: a damaged student trained toward the original comes back closer to it."""

from __future__ import annotations

import copy

import pytest

from studio.errors import BadInput


def _examples(n: int):
    from studio.evaluation.data import load_examples

    return load_examples("builtin:sentences", n)


def _ctx(model, examples, tmp_path, seq_len=32):
    from studio.techniques.base import RunContext

    events: list[dict] = []
    ctx = RunContext(
        original=model,
        workdir=tmp_path,
        calibration=examples,
        sequence_length=seq_len,
        step_index=3,
        emit=events.append,
    )
    return ctx, events


def _zero_smallest(module, fraction: float, only: str = "") -> dict[str, int]:
    """Magnitude-prune every Linear weight in place (done here, not by another block); zeros per layer."""
    import torch

    zeros = {}
    with torch.no_grad():
        for name, sub in module.named_modules():
            if isinstance(sub, torch.nn.Linear) and only in name:
                w = sub.weight
                k = int(w.numel() * fraction)
                threshold = w.abs().flatten().kthvalue(k).values
                w.mul_((w.abs() > threshold).to(w.dtype))
                zeros[name] = int((w == 0).sum())
    return zeros


def _losses(events):
    return [e for e in events if e["type"] == "metric" and e["name"] == "distill_loss"]


def test_registered_with_described_params():
    from studio.techniques.base import get_technique

    cls = get_technique("distill")
    info = cls.describe()
    assert info["category"] == "distillation"
    assert (info["input_kind"], info["output_kind"]) == ("torch", "torch")
    props = info["params"]["properties"]
    for name in ("steps", "learning_rate", "batch_size", "temperature", "alpha", "hidden_weight", "seed"):
        assert name in props
        assert props[name]["description"]
    assert props["steps"]["default"] == 100 and props["learning_rate"]["default"] == 5e-5


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"learning_rate": 0.0},
        {"batch_size": 0},
        {"temperature": 0.0},
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"hidden_weight": -1.0},
        {"epochs": 3},
    ],
)
def test_params_refused(bad):
    from pydantic import ValidationError

    from studio.techniques.distill import DistillParams

    with pytest.raises(ValidationError):
        DistillParams(**bad)


def test_layer_mapping_even():
    from studio.techniques.distill import layer_pairs

    assert layer_pairs(6, 6) == [(i, i) for i in range(7)]
    assert layer_pairs(3, 6) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert layer_pairs(2, 12) == [(0, 0), (1, 6), (2, 12)]


def test_minilm_pruned_student_recovers_fidelity(tmp_path):
    """60% magnitude-pruned MiniLM encoder: distilling raises fidelity and keeps the pruned weights at zero."""
    import torch
    import torch.nn.functional as F

    from studio.checkpoints import open_checkpoint
    from studio.families import family_for
    from studio.techniques.base import get_technique, initial_state

    model = open_checkpoint("builtin:minilm")
    family = family_for(model)
    data = _examples(140)
    train, held_out = data[:32], data[100:132]
    state = initial_state(model)
    zeros = _zero_smallest(state.module, 0.6, only="encoder")
    teacher_before = {k: v.clone() for k, v in model.module.state_dict().items()}

    held = family.batch(model, held_out, 64)

    def fidelity(module) -> float:
        with torch.no_grad():
            ref = family.forward(model.module, held)
            out = family.forward(module, held)
        return float(F.cosine_similarity(ref, out, dim=-1).mean())

    before = fidelity(state.module)
    assert before < 0.8  # the damage is real

    technique = get_technique("distill")
    ctx, events = _ctx(model, train, tmp_path)
    params = technique.Params(steps=24, learning_rate=1e-4, batch_size=16, alpha=0.5)
    out = technique().run(state, params, ctx)
    after = fidelity(out.module)

    losses = _losses(events)
    assert [e["iteration"] for e in losses] == list(range(24))
    assert all(e["step"] == 3 for e in losses)
    values = [e["value"] for e in losses]
    assert sum(values[-10:]) / 10 < sum(values[:10]) / 10
    assert after > before + 0.08, (before, after)
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["fraction"] == pytest.approx(1.0)
    logs = " ".join(e["message"] for e in events if e["type"] == "log")
    assert "->" in logs  # start and end loss logged

    # Sparsity kept, the teacher untouched, no structure record, student back in eval mode without grads.
    for name, sub in out.module.named_modules():
        if name in zeros:
            assert int((sub.weight == 0).sum()) == zeros[name]
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert out.kind == "torch" and out.transforms == state.transforms == []
    assert not out.module.training
    assert not any(p.requires_grad for p in out.module.parameters()) or all(
        p.requires_grad for p in out.module.parameters()
    )  # flags restored as they were
    emb = out.module.embeddings.word_embeddings.weight
    assert torch.equal(emb, model.module.embeddings.word_embeddings.weight)  # frozen by default
    assert not torch.equal(
        out.module.encoder.layer[0].output.dense.bias, model.module.encoder.layer[0].output.dense.bias
    )
    assert out.info["distillation"]["hidden_pairs"] == 7
    assert out.info["distillation"]["loss_end"] < out.info["distillation"]["loss_start"]


@pytest.mark.parametrize("fixture", ["bert_classifier", "gpt2", "marian"])
def test_logit_kd_brings_outputs_back(fixture, request, tmp_path):
    import torch

    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples
    from studio.families import family_for
    from studio.techniques.base import get_technique, initial_state

    model = open_checkpoint(request.getfixturevalue(fixture))
    family = family_for(model)
    # Marian gets references, so its targets come from the data rather than from generating them.
    data = _examples(60) if fixture != "marian" else load_examples("builtin:translation-en-de", 60)
    state = initial_state(model)
    _zero_smallest(state.module, 0.6)
    held = family.batch(model, data[-16:], 32)

    def divergence(module) -> float:
        with torch.no_grad():
            return family.divergence(family.forward(model.module, held), family.forward(module, held), held)

    before = divergence(state.module)
    technique = get_technique("distill")
    ctx, events = _ctx(model, data[:24], tmp_path, seq_len=24)
    params = technique.Params(steps=20, learning_rate=2e-3, batch_size=8, temperature=2.0, alpha=0.7)
    out = technique().run(state, params, ctx)
    values = [e["value"] for e in _losses(events)]
    assert len(values) == 20
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5
    assert "KL divergence" in out.info["distillation"]["output_term"]
    assert out.info["distillation"]["hidden_pairs"] > 0
    assert divergence(out.module) < before


def test_student_with_fewer_layers_maps_evenly(bert_classifier, tmp_path):
    """A 1-layer student of a 2-layer teacher: hidden states pair (0, 0) and (1, 2)."""
    import torch

    from studio.checkpoints import open_checkpoint
    from studio.techniques.base import StageState, get_technique

    model = open_checkpoint(bert_classifier)
    student = copy.deepcopy(model.module)
    student.bert.encoder.layer = torch.nn.ModuleList(list(student.bert.encoder.layer)[:1])
    student.config.num_hidden_layers = 1
    state = StageState("torch", model, module=student)
    technique = get_technique("distill")
    ctx, events = _ctx(model, _examples(16), tmp_path)
    out = technique().run(state, technique.Params(steps=12, learning_rate=2e-3, batch_size=8, alpha=0.0), ctx)
    assert out.info["distillation"]["hidden_pairs"] == 2
    values = [e["value"] for e in _losses(events)]
    assert sum(values[-4:]) < sum(values[:4])


def test_refuses_quantized_student(bert_classifier, tmp_path):
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from studio.checkpoints import open_checkpoint
    from studio.techniques.base import get_technique, initial_state

    model = open_checkpoint(bert_classifier)
    state = initial_state(model)
    quantize_(state.module, Int8WeightOnlyConfig(), filter_fn=lambda m, _n: isinstance(m, torch.nn.Linear))
    technique = get_technique("distill")
    ctx, _ = _ctx(model, _examples(8), tmp_path)
    with pytest.raises(BadInput, match="distill before quantizing"):
        technique().run(state, technique.Params(steps=1), ctx)


def test_needs_calibration_examples(bert_classifier, tmp_path):
    from studio.checkpoints import open_checkpoint
    from studio.techniques.base import get_technique, initial_state

    model = open_checkpoint(bert_classifier)
    technique = get_technique("distill")
    ctx, _ = _ctx(model, [], tmp_path)
    with pytest.raises(BadInput, match="calibration"):
        technique().run(initial_state(model), technique.Params(steps=1), ctx)
