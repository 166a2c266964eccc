"""quantize.smoothquant on builtin:tinylm: the norm -> Linear groups it finds, the smoothing alone leaving the
float logits as they were, the W8A8 layer's integer arithmetic by hand, held-out perplexity near float and
no worse than W8A8 without smoothing (clearly better once the model has an outlier channel), the saved
variant reopening with the same logits, the refusals, and the shipped recipes through `model-studio run`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from studio.checkpoints import open_checkpoint
from studio.errors import BadInput
from studio.evaluation.data import Example
from studio.techniques import layerwise, smoothquant
from studio.techniques.base import RunContext, get_technique, initial_state
from studio.techniques.torch_io import save_torch_variant
from tests.test_tech_gptq import CALIBRATION_MODULES, apply, docstrings, perplexity

RECIPES = Path(__file__).resolve().parents[1] / "resources" / "recipes" / "generation"
CALIBRATION_EXAMPLES = 24


@pytest.fixture(scope="module")
def tinylm():
    return open_checkpoint("builtin:tinylm")


@pytest.fixture(scope="module")
def calibration():
    return [Example(text=t) for t in docstrings(CALIBRATION_MODULES)][:CALIBRATION_EXAMPLES]


@pytest.fixture(scope="module")
def held_out_ids(tinylm):
    import torch

    record = json.loads((tinylm.path / "training.json").read_text())
    ids: list[int] = []
    for text in docstrings(record["held_out_modules"]):
        ids += tinylm.tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids[:2048])


def logits(module, ids):
    import torch

    with torch.no_grad():
        return module(input_ids=ids.reshape(1, -1)[:, :128]).logits


def plain_w8a8(model, calibration, static: bool):
    """The same W8A8 layers on the unsmoothed model (the tied LM head float, as SmoothQuant keeps it)."""
    root = copy.deepcopy(model.module)
    windows = layerwise.calibration_windows(model, calibration, 256, 1, "test")
    cal = smoothquant.calibrate(root, windows)
    names = [n for n in cal.channel_max if n != "lm_head"]
    maxima = {n: cal.channel_max[n].max() for n in names} if static else None
    smoothquant.quantize_w8a8(root, names, maxima, lambda *_: None)
    return root


def with_outlier_channels(model, factor: float = 40.0):
    """The same float function with outlier activations: a few channels of every norm's output multiplied by
    `factor` and the weight columns reading them divided by it, as trained LLMs have them."""
    import torch

    outlier = copy.copy(model)
    outlier.module = copy.deepcopy(model.module)
    channels = torch.tensor([3, 71, 150])
    with torch.no_grad():
        for block in outlier.module.model.layers:
            for norm, readers in (
                (
                    block.input_layernorm,
                    (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj),
                ),
                (block.post_attention_layernorm, (block.mlp.gate_proj, block.mlp.up_proj)),
            ):
                norm.weight[channels] *= factor
                for layer in readers:
                    layer.weight[:, channels] /= factor
    return outlier


# ---------------------------------------------------------------------------------------------- by hand


def test_scales_follow_the_formula_and_clamp():
    import torch

    act = torch.tensor([4.0, 0.25, 0.0])
    w1 = torch.tensor([[1.0, -2.0, 0.5], [0.5, 0.1, -0.5]])
    w2 = torch.tensor([[-3.0, 0.5, 0.25]])
    s = smoothquant.smoothing_scales(act, [w1, w2], 0.5)
    w_max = torch.tensor([3.0, 2.0, 0.5])
    expected = (act.clamp(min=1e-5) ** 0.5) / (w_max**0.5)
    assert s.tolist() == pytest.approx(expected.clamp(min=1e-5).tolist(), rel=1e-6)
    assert smoothquant.smoothing_scales(act, [w1, w2], 1.0)[0] == pytest.approx(4.0)  # all to the weights


def test_w8a8_layer_computes_integer_products_per_token_and_static():
    import torch

    from studio.techniques.quantized_layers import W8A8Linear

    torch.manual_seed(0)
    w, b = torch.randn(6, 8), torch.randn(6)
    x = torch.randn(2, 3, 8) * torch.tensor([1.0] * 7 + [20.0])  # one large channel
    layer = W8A8Linear.from_float(w, b)
    sw = w.abs().amax(dim=1) / 127
    qw = torch.round(w / sw[:, None]).clamp(-127, 127)
    rows = x.reshape(-1, 8)
    sx = rows.abs().amax(dim=1, keepdim=True) / 127
    qx = torch.round(rows / sx).clamp(-127, 127)
    expected = ((qx @ qw.T) * sx * sw + b).reshape(2, 3, 6)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert not torch.allclose(layer(x), x @ w.T + b, atol=1e-4)  # it does quantize

    static = W8A8Linear.from_float(w, b, input_max=2.0)  # the large channel saturates at 2.0
    qs = torch.round(rows / (2.0 / 127)).clamp(-127, 127)
    expected = ((qs @ qw.T) * (2.0 / 127) * sw + b).reshape(2, 3, 6)
    assert static.static and not layer.static
    assert torch.allclose(static(x), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- tinylm


def test_groups_are_the_norms_before_qkv_and_gate_up(tinylm, calibration):
    windows = layerwise.calibration_windows(tinylm, calibration[:2], 64, 1, "test")
    groups = smoothquant.calibrate(copy.deepcopy(tinylm.module), windows).groups
    assert groups["model.layers.0.input_layernorm"] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert groups["model.layers.3.post_attention_layernorm"] == [
        "model.layers.3.mlp.gate_proj",
        "model.layers.3.mlp.up_proj",
    ]
    # the head reads a slice of the final norm's output (the positions whose logits are kept), another tensor
    assert "model.norm" not in groups
    assert len(groups) == 8


def test_smoothing_alone_leaves_the_float_outputs_equal(tinylm, calibration, held_out_ids, tmp_path):
    import torch

    state, events = apply(tinylm, "quantize.smoothquant", {"smooth_only": True}, calibration, tmp_path)
    before, after = logits(tinylm.module, held_out_ids), logits(state.module, held_out_ids)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-4
    norm = "model.layers.1.input_layernorm.weight"
    moved = state.module.state_dict()[norm] / tinylm.module.state_dict()[norm]
    assert float((moved - 1).abs().min()) > 0.1  # every channel of the norm was rescaled ...
    assert float(moved.std() / moved.mean()) > 0.02  # ... each by its own factor
    assert torch.equal(state.module.lm_head.weight, tinylm.module.lm_head.weight)  # tied: left alone
    assert state.transforms[-1]["modules"] == [] and len(state.transforms[-1]["smoothed"]) == 8
    drift = [e.value for e in events if getattr(e, "name", None) == "smoothing_logit_drift"]
    assert drift and drift[0] < 1e-4


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_w8a8_perplexity_is_near_float_and_smoothing_wins_over_outliers(
    tinylm, calibration, held_out_ids, activations, tmp_path
):
    static = activations == "static"
    float_ppl = perplexity(tinylm.module, held_out_ids)
    sq, _ = apply(tinylm, "quantize.smoothquant", {"activations": activations}, calibration, tmp_path)
    sq_ppl = perplexity(sq.module, held_out_ids)
    plain_ppl = perplexity(plain_w8a8(tinylm, calibration, static), held_out_ids)
    assert sq_ppl < float_ppl * 1.02
    assert plain_ppl < float_ppl * 1.02
    # tinylm has no outlier channels of its own, so here smoothing can only tie; give it some
    outlier = with_outlier_channels(tinylm)
    assert perplexity(outlier.module, held_out_ids) == pytest.approx(float_ppl, rel=1e-4)
    sq_out, _ = apply(outlier, "quantize.smoothquant", {"activations": activations}, calibration, tmp_path)
    sq_out_ppl = perplexity(sq_out.module, held_out_ids)
    plain_out_ppl = perplexity(plain_w8a8(outlier, calibration, static), held_out_ids)
    print(
        f"{activations}: float {float_ppl:.3f}, smoothquant {sq_ppl:.3f}, plain W8A8 {plain_ppl:.3f}; "
        f"with outliers: smoothquant {sq_out_ppl:.3f}, plain W8A8 {plain_out_ppl:.3f}"
    )
    assert sq_out_ppl < float_ppl * 1.02
    # the outliers hurt plain W8A8, and smoothing takes most of that loss away
    assert plain_out_ppl - float_ppl > 4 * (sq_out_ppl - float_ppl) > 0


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_saved_variant_reopens_with_the_same_logits(tinylm, calibration, held_out_ids, activations, tmp_path):
    import torch

    state, _ = apply(tinylm, "quantize.smoothquant", {"activations": activations}, calibration, tmp_path)
    save_torch_variant(state.module, state.transforms, tmp_path / "v", tinylm.path)
    back = open_checkpoint(str(tmp_path / "v"))
    layer = back.module.model.layers[2].mlp.down_proj
    assert type(layer).__name__ == "W8A8Linear" and layer.static == (activations == "static")
    assert torch.equal(logits(back.module, held_out_ids), logits(state.module, held_out_ids))


def test_refusals_name_the_problem(tinylm, calibration, tmp_path):
    with pytest.raises(BadInput, match="calibration text and the run has none"):
        apply(tinylm, "quantize.smoothquant", {}, [], tmp_path)
    # every norm has a reader kept float: nothing left to fold the smoothing into
    exclude = ["model.layers.*.self_attn.q_proj", "model.layers.*.mlp.gate_proj"]
    with pytest.raises(BadInput, match=r"LlamaForCausalLM \(causal-lm\) has no norm layer"):
        apply(tinylm, "quantize.smoothquant", {"exclude": exclude}, calibration, tmp_path)
    with pytest.raises(BadInput, match="matches no Linear layer"):
        apply(tinylm, "quantize.smoothquant", {"exclude": ["nothing.here"]}, calibration, tmp_path)


def test_an_encoder_is_refused_by_family(bert_classifier, calibration, tmp_path):
    model = open_checkpoint(str(bert_classifier))
    with pytest.raises(BadInput, match="does not apply to text-classification models"):
        apply(model, "quantize.smoothquant", {}, calibration, tmp_path)


def test_gpt2_conv1d_layers_smooth_without_changing_outputs(gpt2, calibration, tmp_path):
    import torch

    model = open_checkpoint(str(gpt2))
    technique = get_technique("quantize.smoothquant")()
    p = technique.Params(smooth_only=True)
    ctx = RunContext(original=model, workdir=tmp_path, calibration=calibration, sequence_length=64)
    state = technique.run(initial_state(model), p, ctx)  # windows within the model's 128 positions
    assert "transformer.h.0.ln_1" in state.transforms[-1]["smoothed"]
    ids = torch.arange(1, 33).reshape(1, -1) % model.config.vocab_size
    before, after = logits(model.module, ids), logits(state.module, ids)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-4


# ---------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["tinylm-smoothquant.yaml", "tinylm-smoothquant-onnx-static.yaml"])
def test_shipped_recipe_runs_end_to_end(name, tmp_path, capsys):
    """The shipped recipe through `model-studio run`, with less data and no timing so it stays short."""
    from studio.cli import main

    recipe = yaml.safe_load((RECIPES / name).read_text())
    recipe["data"] = {"calibration_examples": 16, "evaluation_examples": 8}
    recipe["evaluate"] = {"batch_sizes": [1], "sequence_length": 64, "latency": False}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--workspace", str(tmp_path / "ws"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    variant = result["variants"][0]
    assert variant["kind"] == ("onnx" if "onnx" in name else "torch")
    quality = variant["metrics"]["quality"]
    assert quality["top1_agreement"] > 0.85
