"""quantize.gptq on builtin:tinylm and by hand: the error-compensation step against its closed form, the
lazy Cholesky implementation against a textbook per-column one (on a layer and on the whole model), held-out
perplexity below round-to-nearest at the same bits and group size, the saved variant reopening with the
same logits and the size of a weight-only one, and the bad-input refusals."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import warnings
from pathlib import Path

import pytest

from studio.checkpoints import open_checkpoint
from studio.errors import BadInput
from studio.evaluation.data import Example
from studio.techniques import gptq
from studio.techniques.base import RunContext, StageState, get_technique, initial_state
from studio.techniques.torch_io import save_torch_variant

WINDOW = 256
CALIBRATION_TOKENS = 4096
# Stdlib modules whose docstrings the model was trained on (calibration is in-domain, as it should be); the
# evaluation text is the docstrings of the modules training.json lists as held out.
CALIBRATION_MODULES = ("json", "argparse", "functools", "pathlib", "shutil", "textwrap", "csv")


def docstrings(modules) -> list[str]:
    out = []
    for name in modules:
        with warnings.catch_warnings():  # a held-out module may be deprecated (mailcap)
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, lambda o: inspect.isfunction(o) or inspect.isclass(o)):
            doc = inspect.getdoc(obj)
            if getattr(obj, "__module__", None) == name and doc and len(doc.split()) > 20:
                out.append(doc)
        if inspect.getdoc(module):
            out.append(inspect.getdoc(module))
    return out


@pytest.fixture(scope="module")
def tinylm():
    return open_checkpoint("builtin:tinylm")


@pytest.fixture(scope="module")
def calibration(tinylm):
    examples, tokens = [], 0
    for text in docstrings(CALIBRATION_MODULES):
        examples.append(Example(text=text))
        tokens += len(tinylm.tokenizer(text)["input_ids"])
        if tokens >= CALIBRATION_TOKENS:
            return examples
    raise AssertionError(f"only {tokens} calibration tokens")


@pytest.fixture(scope="module")
def held_out_ids(tinylm):
    import torch

    record = json.loads((tinylm.path / "training.json").read_text())
    ids: list[int] = []
    for text in docstrings(record["held_out_modules"]):
        ids += tinylm.tokenizer(text)["input_ids"]
    return torch.tensor(ids[:4096])


def perplexity(module, ids) -> float:
    import torch

    from studio.evaluation.quality import sliding_window_perplexity

    def logits_of(chunk):
        with torch.no_grad():
            return module(input_ids=chunk).logits

    return sliding_window_perplexity(logits_of, ids, WINDOW, WINDOW)


def apply(model, technique_id, params, calibration, workdir, state=None):
    technique = get_technique(technique_id)()
    p = technique.Params(**params)
    technique.check(p, model)
    events: list[dict] = []
    ctx = RunContext(
        original=model, workdir=workdir, calibration=calibration, sequence_length=WINDOW, emit=events.append
    )
    return technique.run(state or initial_state(model), p, ctx), events


# ---------------------------------------------------------------------------------------------- by hand


def test_error_compensation_of_one_row_by_hand():
    """1 row, 4 columns (4-bit codes come in pairs), a known Hessian, no damping: each column's rounding
    error moves every column after it by -err * Hinv[q, j] / Hinv[q, q], Hinv being the inverse of the
    Hessian restricted to the columns not yet quantized (q and those after it)."""
    import torch

    w = torch.tensor([[0.61, -0.20, 0.47, 0.05]])
    h = torch.tensor(
        [[2.0, 1.7, 0.6, 0.2], [1.7, 2.0, 1.1, 0.4], [0.6, 1.1, 1.0, 0.3], [0.2, 0.4, 0.3, 0.5]],
        dtype=torch.float64,
    )
    scale, _ = gptq.group_params(w, 4, True, torch.float32)  # one group: the scale of the original row
    s = float(scale[0])

    def q(x: float) -> float:
        return s * max(-8, min(7, round(x / s)))

    cols = [float(v) for v in w[0]]
    expected = []
    for k in range(4):  # written out: quantize column k, push its error onto columns k+1..3
        expected.append(q(cols[k]))
        hinv = torch.linalg.inv(h[k:, k:])
        err = cols[k] - expected[k]
        for j in range(k + 1, 4):
            cols[j] -= err * float(hinv[0, j - k] / hinv[0, 0])

    result = gptq.gptq_quantize(w, h, 4, 4, True, damp=0.0)
    assert result.dequantized[0].tolist() == pytest.approx(expected, abs=1e-6)
    rtn = [q(float(v)) for v in w[0]]
    assert result.dequantized[0].tolist() != pytest.approx(rtn, abs=1e-6)  # the compensation changed codes


def textbook_gptq(weight, hessian, bits, group_size, symmetric, act_order=False, damp=0.01, block=None):
    """GPTQ as the optimal-brain-surgeon recursion, one column at a time and without Cholesky or lazy
    blocks: quantize column q, move every column not yet quantized by -err * Hinv[q, j] / Hinv[q, q],
    then remove q from the inverse Hessian (Hinv -= Hinv[:, q] Hinv[q, :] / Hinv[q, q]). float64."""
    import torch

    w = weight.detach().to(torch.float64).clone()
    rows, cols = w.shape
    groups = cols // group_size
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    order = torch.argsort(torch.diag(h), descending=True).tolist() if act_order else list(range(cols))
    params: dict[int, tuple] = {}
    if act_order or groups == 1:
        for k in range(groups):
            params[k] = gptq.group_params(
                w[:, k * group_size : (k + 1) * group_size].float(), bits, symmetric, weight.dtype
            )
    codes = torch.empty(rows, cols)
    deq = torch.empty(rows, cols, dtype=torch.float64)
    for n, col in enumerate(order):
        k = col // group_size
        if k not in params:  # natural order: the group's scale from its updated weights, when reached
            params[k] = gptq.group_params(w[:, col : col + group_size].float(), bits, symmetric, weight.dtype)
        scale, zero = params[k]
        s = scale.double()
        if symmetric:
            c = torch.round(w[:, col] / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            codes[:, col], deq[:, col] = (c + 8 if bits == 4 else c), c * s
        else:
            z = zero.double()
            c = (torch.round(w[:, col] / s) + z).clamp(0, 2**bits - 1)
            codes[:, col], deq[:, col] = c, (c - z) * s
        err = (w[:, col] - deq[:, col]) / hinv[col, col]
        rest = order[n + 1 :]
        w[:, rest] -= err[:, None] * hinv[col, rest][None, :]
        hinv = hinv - torch.outer(hinv[:, col], hinv[col, :]) / hinv[col, col]
    scales = torch.stack([params[k][0] for k in range(groups)], dim=1)
    zeros = None if symmetric else torch.stack([params[k][1] for k in range(groups)], dim=1)
    return gptq.QuantizedWeight(codes, scales, zeros, deq.float())


@pytest.mark.parametrize(
    ("bits", "group", "symmetric", "act_order"),
    [(4, 32, True, False), (4, 32, False, True), (8, 256, True, False), (4, 64, True, True)],
)
def test_lazy_cholesky_gptq_equals_the_textbook_recursion_and_beats_rtn(bits, group, symmetric, act_order):
    import torch

    from studio.techniques.quantized_layers import WeightOnlyLinear

    torch.manual_seed(0)
    mix = torch.randn(256, 256) / 16
    x = torch.randn(2048, 256) @ mix + 0.3 * torch.randn(2048, 256)  # correlated inputs, as real ones are
    x[:, 7] = 0  # a dead input
    weight = torch.randn(48, 256) * 0.05
    hess = gptq.Hessian(256)
    for chunk in x.split(512):
        hess.add(chunk)
    h = hess.matrix()
    assert torch.allclose(h, 2 * x.double().T @ x.double() / len(x), rtol=1e-4, atol=1e-5)

    fast = gptq.gptq_quantize(weight, h, bits, group, symmetric, act_order, damp=0.01)
    slow = textbook_gptq(weight, h, bits, group, symmetric, act_order, damp=0.01)
    assert (fast.codes == slow.codes).float().mean() > 0.995  # a tie rounded the other way, at most
    assert torch.allclose(fast.scales, slow.scales, rtol=1e-4)

    layer = gptq.weight_only_layer(fast, None, bits, group, symmetric)
    assert torch.equal(layer.dequantize(torch.float32), fast.dequantized)  # stored exactly as computed
    rtn = WeightOnlyLinear.from_float(weight, None, bits, group, symmetric).dequantize(torch.float32)

    def output_error(q):
        return float(((x @ (weight - q).T) ** 2).sum())

    assert output_error(fast.dequantized) < 0.8 * output_error(rtn)


# ---------------------------------------------------------------------------------------------- tinylm


@pytest.fixture(scope="module")
def tinylm_results(tinylm, calibration, held_out_ids, tmp_path_factory):
    work = tmp_path_factory.mktemp("gptq")
    out = {"float": perplexity(tinylm.module, held_out_ids)}
    cases = {
        "rtn": ("quantize.weight_only", {"bits": 4, "group_size": 32}),
        "gptq": ("quantize.gptq", {"bits": 4, "group_size": 32}),
    }
    states = {}
    for key, (technique_id, params) in cases.items():
        state, events = apply(tinylm, technique_id, params, calibration, work)
        states[key] = (state, events)
        out[key] = perplexity(state.module, held_out_ids)
    return out, states


def test_tinylm_gptq_int4_perplexity_below_rtn_int4_at_the_same_group_size(tinylm_results):
    ppl, states = tinylm_results
    # Measured: float 80.26, RTN 80.66, GPTQ 80.39 (4,173 calibration tokens).
    assert ppl["float"] <= ppl["gptq"] < ppl["rtn"], ppl
    assert ppl["gptq"] - ppl["float"] < 0.5 * (ppl["rtn"] - ppl["float"]), ppl
    state, events = states["gptq"]
    record = state.transforms[-1]
    assert record["technique"] == "quantize.gptq" and len(record["modules"]) == 28  # 4 blocks x 7
    assert "lm_head" not in record["modules"]  # tied to the embedding: stays float
    metrics = {e["name"]: e["value"] for e in events if e["type"] == "metric"}
    assert metrics["quantized_layers"] == 28
    assert metrics["quantized_weight_bytes_after"] < metrics["quantized_weight_bytes_before"] / 5


def test_saved_gptq_variant_reopens_with_the_same_logits_and_the_size_of_weight_only(
    tinylm_results, tmp_path
):
    import torch

    from studio.techniques.quantized_layers import WeightOnlyLinear

    _, states = tinylm_results
    folders = {}
    for key in ("gptq", "rtn"):
        state = states[key][0]
        folders[key] = tmp_path / key
        save_torch_variant(state.module, state.transforms, folders[key], state.model.path)
    reopened = open_checkpoint(folders["gptq"])
    assert isinstance(reopened.module.model.layers[2].mlp.down_proj, WeightOnlyLinear)
    ids = torch.arange(40).reshape(1, -1) + 5
    with torch.no_grad():
        before = states["gptq"][0].module(input_ids=ids).logits
        after = reopened.module(input_ids=ids).logits
    assert torch.equal(before, after)
    sizes = {k: (f / "model.safetensors").stat().st_size for k, f in folders.items()}
    assert abs(sizes["gptq"] - sizes["rtn"]) < 4096, sizes  # the same tensors; only the header differs


@pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None,
    reason="GPTQModel is not installed (gptqmodel==7.6.0 installs beside torch 2.13 / transformers 5.23; "
    "it compiles a CPU packing extension on first use, minutes)",
)
def test_gptq_matches_gptqmodel_on_tinylm(
    tinylm, calibration, held_out_ids, tinylm_results, tmp_path, monkeypatch
):
    """GPTQModel's GPTQ on the same model, the same calibration windows and the same settings (INT4,
    groups of 32, symmetric, no act-order, damp 0.01): held-out perplexity within 1% of the studio's.
    Measured: studio 80.39, GPTQModel 7.6.0 80.45. Its symmetric grid differs slightly (a zero point of 8
    and max|w| / 7.5 steps against the studio's max|w| / 8), so the codes are not compared."""
    from gptqmodel import GPTQModel, QuantizeConfig

    monkeypatch.chdir(tmp_path)  # GPTQModel writes a logs/ folder into the working directory
    ppl, _ = tinylm_results
    stream: list[int] = []
    for example in calibration:
        stream += tinylm.tokenizer(example.text, verbose=False)["input_ids"]
    windows = [stream[i : i + WINDOW] for i in range(0, len(stream), WINDOW)]
    config = QuantizeConfig(bits=4, group_size=32, sym=True, desc_act=False, damp_percent=0.01)
    model = GPTQModel.load(str(tinylm.path), config, device="cpu")
    model.quantize([{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows], batch_size=1)
    model.save(str(tmp_path / "gptqmodel"))
    theirs = perplexity(GPTQModel.load(str(tmp_path / "gptqmodel"), device="cpu").model.eval(), held_out_ids)
    assert theirs == pytest.approx(ppl["gptq"], rel=0.01), (theirs, ppl["gptq"])


def test_gptq_equals_a_second_implementation_on_tinylm(
    tinylm, calibration, held_out_ids, tinylm_results, tmp_path, monkeypatch
):
    """The same block-by-block pass with the textbook per-column recursion in place of the lazy Cholesky
    one: held-out perplexity within 1% (runs where GPTQModel is not installed, too)."""
    ppl, _ = tinylm_results
    monkeypatch.setattr(gptq, "gptq_quantize", textbook_gptq)
    state, _ = apply(tinylm, "quantize.gptq", {"bits": 4, "group_size": 32}, calibration, tmp_path)
    second = perplexity(state.module, held_out_ids)
    assert second == pytest.approx(ppl["gptq"], rel=0.01), (second, ppl["gptq"])
    assert second < ppl["rtn"]


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_small_llama_and_gpt2_quantize_and_reload(fixture, request, tmp_path):
    import torch

    from studio.techniques.quantized_layers import WeightOnlyLinear

    model = open_checkpoint(request.getfixturevalue(fixture))
    calibration = [Example(text=t) for t in docstrings(("json", "argparse"))]
    technique = get_technique("quantize.gptq")()
    p = technique.Params(bits=4, group_size=16)
    technique.check(p, model)
    ctx = RunContext(original=model, workdir=tmp_path, calibration=calibration, sequence_length=64)
    state = technique.run(initial_state(model), p, ctx)
    assert (
        sum(isinstance(m, WeightOnlyLinear) for m in state.module.modules())
        == len(state.transforms[-1]["modules"])
        > 0
    )
    ids = torch.arange(20).reshape(1, -1) + 3
    with torch.no_grad():
        out = state.module(input_ids=ids).logits
        ref = model.module(input_ids=ids).logits
    assert torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9
    save_torch_variant(state.module, state.transforms, tmp_path / "v", state.model.path)
    with torch.no_grad():
        assert torch.equal(open_checkpoint(tmp_path / "v").module(input_ids=ids).logits, out)


# ---------------------------------------------------------------------------------------------- bad input


def test_refusals_name_the_problem(tinylm, tmp_path):
    import torch

    technique = get_technique("quantize.gptq")()
    with pytest.raises(BadInput, match=r"group_size 128 does not divide the input width 192 of layer "):
        technique.check(technique.Params(bits=4), tinylm)  # the default group of 128 does not fit 192
    with pytest.raises(BadInput, match=r"'model\.layers\.9' matches no Linear layer"):
        technique.check(technique.Params(group_size=32, exclude=["model.layers.9"]), tinylm)
    with pytest.raises(ValueError, match="bits"):
        technique.Params(bits=3)

    short = [Example(text="A short sentence.")] * 3
    ctx = RunContext(original=tinylm, workdir=tmp_path, calibration=short, sequence_length=WINDOW)
    state = initial_state(tinylm)
    with pytest.raises(
        BadInput,
        match=r"needs at least 512 calibration tokens and the calibration data gives 21 \(3 examples\)",
    ):
        technique.run(state, technique.Params(group_size=32), ctx)
    assert not any(type(m).__name__ == "WeightOnlyLinear" for m in state.module.modules())  # nothing changed

    convs = StageState("torch", tinylm, module=torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3)))
    with pytest.raises(BadInput, match="the model has no Linear layer to quantize"):
        technique.run(convs, technique.Params(group_size=32), ctx)


def recipe(tmp_path: Path, params: str, examples: int = 8) -> Path:
    path = tmp_path / "gptq.yaml"
    path.write_text(
        "version: 1\nmodel: builtin:tinylm\n"
        f"data: {{calibration_examples: {examples}, evaluation_examples: 4}}\n"
        f"steps:\n  - technique: quantize.gptq\n    params: {params}\n"
    )
    return path


@pytest.mark.parametrize(
    ("params", "examples", "message"),
    [
        ("{bits: 3, group_size: 32}", 8, "bits"),
        ("{bits: 4, group_size: 48}", 8, "group_size 48 does not divide the input width 512"),
        ("{bits: 4, group_size: 32}", 2, "needs at least 512 calibration tokens"),
    ],
)
def test_cli_refuses_with_exit_2_and_writes_nothing(params, examples, message, tmp_path, capsys, monkeypatch):
    from studio.cli import main

    monkeypatch.chdir(tmp_path)
    workspace = tmp_path / "ws"
    code = main(["run", str(recipe(tmp_path, params, examples)), "--workspace", str(workspace)])
    assert code == 2
    assert message in capsys.readouterr().err
    variants = workspace / "variants"
    assert not variants.exists() or not any(variants.iterdir())


def test_shipped_recipe_is_valid():
    from studio.pipeline import load_recipe, plan
    from studio.resources import resource

    for name, technique_id in (
        ("tinylm-gptq-int4.yaml", "quantize.gptq"),
        ("tinylm-awq-int4.yaml", "quantize.awq"),
    ):
        r = load_recipe(resource("recipes", "generation", name))
        plan(r)
        step = r.steps[0]
        assert step.technique == technique_id and step.params["bits"] == 4


# ---------------------------------------------------------------------------------------------- AWQ


def test_awq_scales_are_normalised_and_folding_them_leaves_the_float_block_unchanged(tinylm):
    import copy

    import torch

    from studio.techniques import awq, layerwise

    magnitude = torch.tensor([0.01, 0.5, 2.0, 8.0])
    assert torch.equal(awq.scales_for(magnitude, 0.0), torch.ones(4))
    s = awq.scales_for(magnitude, 0.5)
    assert float((s.max() * s.min()).sqrt()) == pytest.approx(1.0)
    assert torch.all(s[1:] > s[:-1])  # larger activations, larger scales

    module = copy.deepcopy(tinylm.module)
    block = module.model.layers[1]
    ids = torch.arange(30).reshape(1, -1) + 4
    calls = layerwise.capture_first_block(module, block, [ids])
    before = layerwise.run_block(block, calls)[0].hidden()
    torch.manual_seed(0)
    for producer, group in awq.SCALED_GROUPS:
        prod, layers = block.get_submodule(producer), [block.get_submodule(n) for n in group]
        if prod.weight.shape[0] != layers[0].weight.shape[1]:
            continue
        s = torch.rand(layers[0].weight.shape[1]) * 3 + 0.2
        with torch.no_grad():
            for m in layers:
                m.weight.mul_(s)
        awq.fold_inverse(prod, s)
    after = layerwise.run_block(block, calls)[0].hidden()
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def awq_results(tinylm, calibration, held_out_ids, tmp_path_factory):
    work = tmp_path_factory.mktemp("awq")
    out = {}
    for key, technique_id in (("rtn", "quantize.weight_only"), ("awq", "quantize.awq")):
        state, events = apply(tinylm, technique_id, {"bits": 4, "group_size": 64}, calibration, work)
        out[key] = (perplexity(state.module, held_out_ids), state, events)
    return out


def test_tinylm_awq_int4_perplexity_below_rtn_int4_at_the_same_group_size(awq_results, tmp_path):
    import torch

    (rtn, _, _), (ppl, state, events) = awq_results["rtn"], awq_results["awq"]
    # Measured (groups of 64): float 80.26, RTN 80.74, AWQ 80.56. With groups of 32 AWQ gains nothing
    # measurable on tinylm (80.67 against 80.66): fine groups already follow the weights' scale.
    assert ppl < rtn, (ppl, rtn)
    record = state.transforms[-1]
    assert record["technique"] == "quantize.awq" and len(record["modules"]) == 28
    assert any("of round-to-nearest's output error" in getattr(e, "message", "") for e in events)

    save_torch_variant(state.module, state.transforms, tmp_path / "awq", state.model.path)
    ids = torch.arange(40).reshape(1, -1) + 5
    with torch.no_grad():  # the folded norm weights travel in the saved state dict
        assert torch.equal(
            open_checkpoint(tmp_path / "awq").module(input_ids=ids).logits, state.module(input_ids=ids).logits
        )


def test_awq_refuses_a_family_it_cannot_fold_into(gpt2):
    model = open_checkpoint(gpt2)
    technique = get_technique("quantize.awq")()
    with pytest.raises(BadInput, match=r"quantize\.awq applies to Llama-style decoder blocks .* GPT2Block"):
        technique.check(technique.Params(group_size=16), model)


def test_calibration_texts_take_both_sentences_of_a_pair():
    # MiniLM's sentence pairs give twice the tokens this way: enough for its 1536-wide FFN output layers
    from studio.evaluation.data import Example, load_examples
    from studio.techniques.gptq import calibration_texts

    pairs = [Example(text="a b", text_pair="c d"), Example(text="e"), Example(text="f", text_pair="g")]
    assert [e.text for e in calibration_texts(pairs, 2)] == ["a b", "c d", "e"]
    texts = calibration_texts(load_examples("builtin:sentence-pairs"), 128)
    assert len(texts) == 240 and texts[1].text != texts[0].text and texts[1].text_pair is None
