"""Per-layer sensitivity for causal LMs: 4-bit GPTQ / AWQ / round-to-nearest per layer, the KV cache per
decoder layer, and the mixed-precision choice under a bits-per-weight budget.

On builtin:tinylm (4 Llama blocks with grouped-query attention, input widths 192 and 512, float32) with a
few short calibration windows, and on the small random Llama of conftest. What must hold: every scheme
measures and ranks the same layers; GPTQ, which compensates each rounding error on the layer's inputs,
loses no more than round-to-nearest for most layers; AWQ leaves o_proj unscaled under grouped-query
attention (so there it is exactly round-to-nearest); a budget is respected by the bits actually stored
(codes and float32 scales counted) and a tighter one never estimates more fidelity; kv-bits reports one
row per decoder layer; bad budgets and bits exit 2."""

from __future__ import annotations

import json

import pytest

from studio.checkpoints import open_checkpoint
from studio.cli import main
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.evaluation.kv_quant import KVCacheSpec
from studio.sensitivity import choose_within_budget_from_report, layer_sensitivity
from studio.techniques.base import RunContext, get_technique, initial_state

SEQ = 64
GROUP = 64  # tinylm's widths (192, 512) are not multiples of the default 128
INT4_G64_BITS = 4 + 32 / GROUP  # 4-bit codes and one float32 scale per 64 weights


@pytest.fixture(scope="module")
def tinylm():
    return open_checkpoint("builtin:tinylm")


@pytest.fixture(scope="module")
def examples():
    return load_examples("builtin:sentences", 8)  # about 250 tokens: 4 windows of 64


@pytest.fixture(scope="module")
def reports(tinylm, examples):
    return {
        scheme: layer_sensitivity(tinylm, scheme, examples, SEQ, "one", group_size=GROUP)
        for scheme in ("int4", "int4-gptq", "int4-awq")
    }


def _context(model, tmp_path, examples, seq=SEQ):
    events: list = []
    ctx = RunContext(
        original=model, workdir=tmp_path, calibration=examples, sequence_length=seq, emit=events.append
    )
    return ctx, events


def _stored_bits_per_weight(root, names) -> float:
    """Average bits per weight of `names` in a quantized model, from its tensors: a float layer's weight at
    its dtype, a weight-only layer's packed codes, scales and zero points."""
    import torch

    bits = params = 0
    for name in names:
        m = root.get_submodule(name)
        if type(m) is torch.nn.Linear:
            n = m.weight.numel()
            bits += n * m.weight.element_size() * 8
        else:
            n = m.in_features * m.out_features
            bits += sum(
                t.numel() * t.element_size() * 8 for t in (m.qweight, m.scales, m.zeros) if t is not None
            )
        params += n
    return bits / params


# ---------------------------------------------------------------------------------------------- schemes


def test_the_llm_schemes_measure_and_rank_the_same_layers(reports, tinylm):
    names = {r.layer for r in reports["int4"].layers}
    assert len(names) == 4 * 7  # q, k, v, o, gate, up, down in each block; the tied LM head stays float
    for scheme, report in reports.items():
        assert {r.layer for r in report.layers} == names, scheme
        assert report.family == "causal-lm" and "causal-lm divergence" in report.objective
        assert report.fidelity_all < report.fidelity_none
        losses = [r.fidelity_loss for r in report.ranked()]
        assert all(x is not None for x in losses)
        assert losses == sorted(losses, reverse=True) and losses[0] > 10 * max(losses[-1], 1e-9)
        assert report.bits_per_weight == pytest.approx(INT4_G64_BITS)
        assert all(r.bits_per_weight == pytest.approx(INT4_G64_BITS) for r in report.layers)
    assert reports["int4-gptq"].settings["calibration_tokens"] >= 2 * SEQ


def test_gptq_loses_no_more_than_round_to_nearest_for_most_layers(reports):
    rtn = {r.layer: r.fidelity_loss for r in reports["int4"].layers}
    gptq = {r.layer: r.fidelity_loss for r in reports["int4-gptq"].layers}
    better = [n for n in rtn if gptq[n] <= rtn[n]]
    assert len(better) >= 0.75 * len(rtn), sorted(set(rtn) - set(better))
    assert reports["int4-gptq"].fidelity_all > reports["int4"].fidelity_all


def test_awq_scales_all_but_o_proj_under_grouped_query_attention(reports):
    rtn = {r.layer: r.fidelity_loss for r in reports["int4"].layers}
    awq = {r.layer: r.fidelity_loss for r in reports["int4-awq"].layers}
    o_proj = [n for n in rtn if n.endswith("o_proj")]
    assert o_proj and all(awq[n] == pytest.approx(rtn[n], abs=1e-12) for n in o_proj)
    assert any(awq[n] != pytest.approx(rtn[n], abs=1e-9) for n in rtn if n not in o_proj)
    assert reports["int4-awq"].fidelity_all >= reports["int4"].fidelity_all - 1e-4


def test_the_small_llama_runs_every_weight_scheme(llama, examples):
    model = open_checkpoint(str(llama))
    for scheme in ("int4", "int4-gptq", "int4-awq"):
        report = layer_sensitivity(model, scheme, examples[:4], 32, "both", group_size=32)
        if scheme == "int4":  # round-to-nearest also takes this model's LM head, which is not tied
            assert len(report.layers) == 2 * 7 + 1 and "lm_head" in {r.layer for r in report.layers}
        else:  # GPTQ and AWQ quantize the decoder blocks only: the head stays float, and is said to
            assert len(report.layers) == 2 * 7
            assert report.settings["kept_float_outside_blocks"] == ["lm_head"]
        assert all(r.recovered is not None and r.fidelity_loss is not None for r in report.layers)
        assert (
            report.to_dict()["exclusion_parameter"]["technique"]
            == {
                "int4": "quantize.weight_only",
                "int4-gptq": "quantize.gptq",
                "int4-awq": "quantize.awq",
            }[scheme]
        )


# ---------------------------------------------------------------------------------------------- budget


def test_a_budget_is_respected_and_a_tighter_one_never_estimates_more(reports):
    report = reports["int4-gptq"]
    params = {r.layer: r.parameters for r in report.layers}
    total = sum(params.values())
    previous = None
    kept_any = False
    for budget in (4.5, 4.6, 5.0, 6.0, 8.0, 12.0, 16.0):
        choice = choose_within_budget_from_report(report, budget)
        kept = set(choice["excluded"])
        # tinylm is float32: a layer kept float stores 32 bits per weight
        bits = sum(params[n] * (32 if n in kept else INT4_G64_BITS) for n in params) / total
        assert bits <= budget + 1e-9 and choice["bits_per_weight"] == pytest.approx(bits)
        if previous is not None:
            assert choice["estimated_fidelity"] >= previous
        previous = choice["estimated_fidelity"]
        kept_any = kept_any or bool(kept)
        if budget == 4.5:
            assert kept == set()
    assert kept_any


def test_weight_only_block_budget_is_met_by_the_stored_bits(tinylm, examples, tmp_path):
    technique = get_technique("quantize.weight_only")()
    p = technique.Params(bits=4, group_size=GROUP, max_bits_per_weight=5.0)
    ctx, events = _context(tinylm, tmp_path, examples)
    state = technique.run(initial_state(tinylm), p, ctx)
    inside = [
        n for n, m in tinylm.module.named_modules() if n.startswith("model.layers.") and hasattr(m, "weight")
    ]
    inside = [n for n in inside if n.endswith("_proj")]
    stored = _stored_bits_per_weight(state.module, inside)
    assert stored <= 5.0
    floats = [n for n in inside if type(state.module.get_submodule(n)).__name__ == "Linear"]
    assert floats, "a budget of 5 bits leaves room for a small layer kept float"
    metric = next(
        e for e in events if e["type"] == "metric" and e["name"] == "mixed_precision_bits_per_weight"
    )
    assert metric["value"] == pytest.approx(stored)


def test_gptq_block_budget_on_the_small_llama(llama, examples, tmp_path):
    model = open_checkpoint(str(llama))
    technique = get_technique("quantize.gptq")()
    p = technique.Params(bits=4, group_size=32, max_bits_per_weight=6.0, calibration_examples=8)
    ctx, events = _context(model, tmp_path, examples, seq=32)
    state = technique.run(initial_state(model), p, ctx)
    inside = [
        n for n, _ in model.module.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")
    ]
    assert _stored_bits_per_weight(state.module, inside) <= 6.0
    assert any("at most 6 bits per weight" in e["message"] for e in events if e["type"] == "log")

    tight = technique.Params(bits=4, group_size=32, max_bits_per_weight=4.5, calibration_examples=8)
    with pytest.raises(BadInput, match="below what the scheme itself stores"):  # 4 + 32/32 = 5 bits
        technique.run(initial_state(model), tight, _context(model, tmp_path, examples, seq=32)[0])


@pytest.mark.parametrize("budget", [3.0, 17.0])
def test_block_budgets_outside_the_range_are_refused(budget):
    from pydantic import ValidationError

    for tid in ("quantize.weight_only", "quantize.gptq", "quantize.awq"):
        with pytest.raises(ValidationError, match="max_bits_per_weight"):
            get_technique(tid).Params(bits=4, max_bits_per_weight=budget)


# ---------------------------------------------------------------------------------------------- KV cache


def test_kv_bits_reports_one_row_per_decoder_layer(tinylm, examples):
    spec = KVCacheSpec("turboquant", 2.0, 2.0, residual_length=8)
    report = layer_sensitivity(tinylm, "kv-bits", examples[:2], 32, "one", kv=spec)
    assert [r.layer for r in report.layers] == ["0", "1", "2", "3"]
    assert [r.module for r in report.layers] == [f"model.layers.{i}.self_attn" for i in range(4)]
    assert report.fidelity_none == pytest.approx(1.0, abs=1e-6)
    assert report.fidelity_all < report.fidelity_none - 1e-4
    assert all(0 < r.fidelity_alone < 1 and r.fidelity_loss > 0 for r in report.layers)
    assert report.settings["bits"] == 2.0 and report.bits_per_weight is None
    assert report.to_dict()["exclusion_parameter"] == {
        "technique": "kv_cache.quantize",
        "param": "float_layers",
    }


def test_float_layers_keep_those_caches_in_the_model_precision(tinylm):
    import torch
    from transformers.cache_utils import DynamicLayer

    from studio.evaluation.kv_quant import held_bytes, is_quantized_cache, quantized_cache
    from studio.techniques.kv_sensitivity import stepped_logits

    spec = KVCacheSpec("quanto", 4.0, 4.0, residual_length=4, group_size=8, float_layers=(2, 0))
    assert spec.float_layers == (0, 2) and KVCacheSpec.from_record(spec.record()) == spec
    cache = quantized_cache(tinylm.module.config, spec)
    assert [type(layer) is DynamicLayer for layer in cache.layers] == [True, False, True, False]
    assert is_quantized_cache(cache)
    ids = torch.randint(3, 4000, (1, 24))
    with torch.inference_mode():
        plain = tinylm.module(input_ids=ids).logits
    every = KVCacheSpec("quanto", 4.0, 4.0, residual_length=4, group_size=8, float_layers=(0, 1, 2, 3))
    assert torch.allclose(stepped_logits(tinylm.module, ids, every), plain, atol=1e-4)
    assert not torch.allclose(stepped_logits(tinylm.module, ids, spec), plain, atol=1e-4)
    with torch.inference_mode():
        tinylm.module(input_ids=ids, past_key_values=cache, use_cache=True)
    assert held_bytes(cache) > 0
    assert "float_layers" not in KVCacheSpec("quanto", 4.0, 4.0).record()  # unchanged records otherwise

    params = get_technique("kv_cache.quantize").Params(float_layers=[1])
    assert params.spec().float_layers == (1,)
    with pytest.raises(BadInput, match=r"float_layers \[9\]"):
        get_technique("kv_cache.quantize")().check(
            get_technique("kv_cache.quantize").Params(float_layers=[9]), tinylm
        )


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_kv_bits_and_budget_json(llama, capsys):
    args = ["sensitivity", str(llama), "--max-examples", "4", "--sequence-length", "32", "--mode", "one"]
    assert main([*args, "--scheme", "kv-bits", "--bits", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["scheme"] == "kv-bits" and len(data["layers"]) == 2 and data["bits_per_weight"] is None

    assert main([*args, "--scheme", "int4-gptq", "--group-size", "32", "--budget-bits", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bits_per_weight"] == pytest.approx(5.0)
    budget = data["budget"]
    assert budget["budget"] == 8 and budget["bits_per_weight"] <= 8
    assert budget["bits_per_weight_all_quantized"] == pytest.approx(5.0)
    assert all(row["bits_per_weight"] == pytest.approx(5.0) for row in data["layers"])


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--scheme", "int4", "--budget-bits", "3"], "below the 4 bits"),
        (["--scheme", "int4-gptq", "--budget-bits", "17"], "at most 16"),
        (["--scheme", "onnx-int8", "--budget-bits", "8"], "applies to the weight schemes"),
        (["--scheme", "int4", "--group-size", "64", "--budget-bits", "4.2"], "below what the scheme itself"),
        (["--scheme", "kv-bits", "--kv-method", "quanto", "--bits", "3"], "not supported by quanto"),
    ],
)
def test_cli_bad_budgets_and_bits_exit_2(extra, words, capsys):
    args = [
        "sensitivity",
        "builtin:tinylm",
        "--max-examples",
        "2",
        "--sequence-length",
        "16",
        "--mode",
        "one",
    ]
    assert main([*args, *extra]) == 2
    assert words in capsys.readouterr().err
