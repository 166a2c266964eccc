"""Pruning techniques on real models: magnitude (zeros), structured (FFN neurons / conv channels) and heads."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from studio.checkpoints import open_checkpoint
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.families import family_for
from studio.inspection.attention import find_attention_blocks
from studio.inspection.heads import compute_head_importance
from studio.techniques.base import RunContext, StageState, get_technique, initial_state
from studio.techniques.prune.ffn import find_ffns
from studio.techniques.prune.head_selection import select_heads_per_layer
from studio.techniques.prune.head_surgery import HeadLayout
from studio.techniques.prune.heads import HeadsParams, HeadsPrune
from studio.techniques.prune.magnitude import (
    DEFAULT_EXCLUDE,
    MagnitudeParams,
    MagnitudePrune,
    prunable_layers,
    schedule_targets,
    weight_sparsity,
)
from studio.techniques.prune.structured import StructuredParams, StructuredPrune
from studio.techniques.torch_io import save_torch_variant

SEQ = 32


@pytest.fixture(scope="module")
def minilm():
    return open_checkpoint("builtin:minilm")


@pytest.fixture(scope="module")
def sentences():
    return load_examples("builtin:sentences", 16)


class Events(list):
    def metric(self, name):
        return [e["value"] for e in self if e["type"] == "metric" and e["name"] == name][-1]

    def progress(self):
        return [e for e in self if e["type"] == "progress"]


def _ctx(model, tmp_path, examples, events):
    return RunContext(
        original=model, workdir=tmp_path, calibration=examples, sequence_length=SEQ, emit=events.append
    )


def _params_count(module):
    return sum(p.numel() for p in module.parameters())


def _outputs(model, module, examples):
    import torch

    family = family_for(model)
    batch = family.batch(model, examples, SEQ)
    with torch.no_grad():
        return family.forward(module, batch)


def _save_and_reload(state, tmp_path, name="variant"):
    folder = tmp_path / name
    save_torch_variant(state.module, state.transforms, folder, state.model.path)
    return folder, open_checkpoint(folder)


def _cosine(a, b):
    import torch

    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


# ------------------------------------------------------------------------------------------ registry


def test_registered_with_schemas():
    for tid in ("prune.magnitude", "prune.structured", "prune.heads"):
        info = get_technique(tid).describe()
        assert info["category"] == "pruning"
        assert (info["input_kind"], info["output_kind"]) == ("torch", "torch")
        assert all(p.get("description") for p in info["params"]["properties"].values())
    assert HeadsPrune.families == ("feature-extraction", "text-classification", "causal-lm", "seq2seq")


# ----------------------------------------------------------------------------------------- magnitude


def test_magnitude_global_minilm_saves_real_zeros(minilm, sentences, tmp_path):
    import torch
    from safetensors import safe_open

    events = Events()
    state = initial_state(minilm)
    original_embeddings = minilm.module.embeddings.word_embeddings.weight.detach().clone()
    out = MagnitudePrune().run(
        state, MagnitudeParams(sparsity=0.5, scope="global"), _ctx(minilm, tmp_path, sentences, events)
    )

    layers = prunable_layers(out.module, DEFAULT_EXCLUDE, keep_output_layer=True)
    assert len(layers) == 36  # q, k, v, attention output, intermediate, output in 6 layers (pooler kept)
    assert weight_sparsity(layers) == pytest.approx(0.5, abs=1e-4)
    assert events.metric("sparsity") == pytest.approx(0.5, abs=1e-4)
    per_layer = [float((m.weight == 0).float().mean()) for _, m in layers]
    assert max(per_layer) - min(per_layer) > 0.05  # one global threshold: layers differ
    assert torch.equal(out.module.embeddings.word_embeddings.weight, original_embeddings)  # excluded
    assert float((out.module.pooler.dense.weight == 0).float().mean()) < 0.01  # the output layer stays dense
    assert out.transforms == []  # shapes unchanged: nothing to restore
    assert 0.5 < events.metric("fidelity_cosine") < 1.0

    folder, reloaded = _save_and_reload(out, tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not [k for k in keys if k.endswith(("_orig", "_mask"))]
        w = f.get_tensor("encoder.layer.0.intermediate.dense.weight")
    assert float((w == 0).float().mean()) > 0.2
    assert torch.equal(
        _outputs(minilm, out.module, sentences[:4]), _outputs(reloaded, reloaded.module, sentences[:4])
    )


def test_magnitude_layer_scope_iterative_on_gpt2(request, sentences, tmp_path):
    gpt2 = open_checkpoint(request.getfixturevalue("gpt2"))
    events = Events()
    params = MagnitudeParams(sparsity=0.6, scope="layer", iterations=3)
    out = MagnitudePrune().run(initial_state(gpt2), params, _ctx(gpt2, tmp_path, sentences[:4], events))
    layers = prunable_layers(out.module, params.exclude, params.keep_output_layer)
    assert {type(m).__name__ for _, m in layers} == {"Conv1D"}  # GPT-2's transposed linear layers
    for name, m in layers:
        assert float((m.weight == 0).float().mean()) == pytest.approx(0.6, abs=1e-3), name
    assert float((out.module.lm_head.weight == 0).float().mean()) == 0.0  # tied to the embedding: excluded
    assert len(events.progress()) == 3
    assert not any(n.endswith(("_orig", "_mask")) for n in out.module.state_dict())


def test_iterative_schedule_reaches_the_one_shot_mask(request, sentences, tmp_path):
    bert = open_checkpoint(request.getfixturevalue("bert_classifier"))
    cubic = schedule_targets(0.8, 4, "cubic")
    assert cubic[-1] == 0.8 and cubic[0] > 0.8 / 4  # cubic prunes most early
    assert schedule_targets(0.8, 4, "linear") == pytest.approx([0.2, 0.4, 0.6, 0.8])
    runs = []
    for iterations in (1, 4):
        params = MagnitudeParams(sparsity=0.8, iterations=iterations)
        out = MagnitudePrune().run(initial_state(bert), params, _ctx(bert, tmp_path, [], Events()))
        runs.append(out.module.state_dict())
    assert all((runs[0][k] == 0).equal(runs[1][k] == 0) for k in runs[0])


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_prunes_an_exported_program(cnn_pt2, scope, tmp_path):
    """An ExportedProgram's module has no Conv2d / Linear layers (plain holders of weight and bias), so
    prune.magnitude found "no prunable layers"; it now prunes the weights the graph uses as layer weights."""
    import torch

    from tests.conftest import SmallCNN

    loaded = open_checkpoint(cnn_pt2)
    module = loaded.module
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = module(x)
    layers = prunable_layers(module, [], keep_output_layer=True)
    assert [n for n, _ in layers] == ["0", "3"]  # the convolutions; the classifier "7" is the output layer
    assert [n for n, _ in prunable_layers(module, ["3"], keep_output_layer=False)] == ["0", "7"]
    batch_norm = module.get_submodule("1").weight.clone()  # a norm's scale is no layer weight

    events = Events()
    state = StageState("torch", loaded, module=module)
    out = MagnitudePrune().run(
        state, MagnitudeParams(sparsity=0.5, scope=scope), _ctx(loaded, tmp_path, [], events)
    )
    pruned = {n: out.module.get_submodule(n).weight for n in ("0", "3")}
    if scope == "layer":
        for w in pruned.values():
            assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    zeros = sum(int((w == 0).sum()) for w in pruned.values())
    assert zeros == round(0.5 * sum(w.numel() for w in pruned.values()))
    assert events.metric("sparsity") == pytest.approx(0.5, abs=1e-3)
    assert not (out.module.get_submodule("7").weight == 0).any()  # the output layer stays dense
    assert torch.equal(out.module.get_submodule("1").weight, batch_norm)

    # the graph reads the pruned weights: its outputs are those of the original network with those zeros
    reference = SmallCNN.make()
    with torch.no_grad():
        for name, w in pruned.items():
            reference[int(name)].weight.copy_(w)
        after = out.module(x)
        assert torch.allclose(after, reference(x), atol=1e-5) and not torch.allclose(after, before)
    files = save_torch_variant(out.module, out.transforms, tmp_path / "v", None, example_inputs=(x,))
    reopened = open_checkpoint(files[0])
    with torch.no_grad():
        assert torch.equal(reopened.module(x), after)
    assert int((reopened.module.get_submodule("3").weight == 0).sum()) == int((pruned["3"] == 0).sum())


def test_magnitude_params_are_strict():
    for bad in (
        {"sparsity": -0.1},
        {"sparsity": 1.0},
        {"sparsity": float("nan")},
        {"iterations": 0},
        {"scope": "x"},
    ):
        with pytest.raises(ValidationError):
            MagnitudeParams(**bad)
    assert MagnitudeParams(sparsity=0.0).sparsity == 0.0


# ---------------------------------------------------------------------------------------- structured


def test_structured_minilm_half_of_the_ffn(minilm, sentences, tmp_path):
    events = Events()
    before = _params_count(minilm.module)
    out = StructuredPrune().run(
        initial_state(minilm), StructuredParams(fraction=0.5), _ctx(minilm, tmp_path, sentences, events)
    )
    hidden, inter = 384, 1536
    removed = 6 * (inter // 2) * (2 * hidden + 1)  # up rows + their biases, down columns
    assert before - _params_count(out.module) == removed
    for layer in out.module.encoder.layer:
        assert tuple(layer.intermediate.dense.weight.shape) == (768, hidden)
        assert tuple(layer.output.dense.weight.shape) == (hidden, 768)
    assert out.transforms == [
        {"technique": "prune.structured", "ffn_sizes": {f"encoder.layer.{i}": 768 for i in range(6)}}
    ]
    assert 0.3 < events.metric("fidelity_cosine") < 1.0

    folder, reloaded = _save_and_reload(out, tmp_path)
    assert json.loads((folder / "config.json").read_text())["studio_transforms"] == out.transforms
    import torch

    assert torch.equal(
        _outputs(minilm, out.module, sentences), _outputs(reloaded, reloaded.module, sentences)
    )


@pytest.mark.parametrize("name", ["gpt2", "llama", "marian"])
def test_structured_small_models(request, name, sentences, tmp_path):
    import torch

    model = open_checkpoint(request.getfixturevalue(name))
    sizes = {f.name: f.size for f in find_ffns(model.module)}
    out = StructuredPrune().run(
        initial_state(model), StructuredParams(fraction=0.5), _ctx(model, tmp_path, sentences[:4], Events())
    )
    assert len(sizes) == (4 if name == "marian" else 2)
    assert out.transforms[-1]["ffn_sizes"] == {k: v // 2 for k, v in sizes.items()}
    assert {f.name: f.size for f in find_ffns(out.module)} == {k: v // 2 for k, v in sizes.items()}
    _, reloaded = _save_and_reload(out, tmp_path)
    assert torch.equal(
        _outputs(model, out.module, sentences[:4]), _outputs(model, reloaded.module, sentences[:4])
    )


def test_structured_explicit_sizes_and_rounding(request, sentences, tmp_path):
    bert = open_checkpoint(request.getfixturevalue("bert_classifier"))
    params = StructuredParams(fraction=None, sizes={"0": 24})
    out = StructuredPrune().run(initial_state(bert), params, _ctx(bert, tmp_path, [], Events()))
    assert out.transforms[-1]["ffn_sizes"] == {"bert.encoder.layer.0": 24, "bert.encoder.layer.1": 64}
    out = StructuredPrune().run(
        initial_state(bert), StructuredParams(fraction=0.3, round_to=16), _ctx(bert, tmp_path, [], Events())
    )
    assert set(out.transforms[-1]["ffn_sizes"].values()) == {48}  # 64 * 0.7 = 44.8 -> a multiple of 16
    with pytest.raises(BadInput, match="not an FFN block"):
        StructuredPrune().run(
            initial_state(bert), StructuredParams(sizes={"nope": 8}), _ctx(bert, tmp_path, [], Events())
        )


def test_structured_cnn_channels(cnn_pt2, tmp_path):
    import torch

    from tests.conftest import SmallCNN

    loaded = open_checkpoint(cnn_pt2)
    events = Events()
    state = StageState("torch", loaded, module=SmallCNN.make())
    out = StructuredPrune().run(
        state, StructuredParams(fraction=0.5, round_to=4), _ctx(loaded, tmp_path, [], events)
    )
    net = out.module
    assert (net[0].out_channels, net[1].num_features, net[3].in_channels, net[3].out_channels) == (4, 4, 4, 8)
    assert net[7].in_features == 8 and net[7].out_features == 10  # the classifier keeps its classes
    assert out.transforms[-1]["channels"] == {"0": 4, "3": 8}
    assert events.metric("parameters") < 0.5 * _params_count(SmallCNN.make())

    x = torch.randn(2, 3, 32, 32)
    # a plain module has no config: it is saved as an ExportedProgram, which needs example inputs
    files = save_torch_variant(net, out.transforms, tmp_path / "cnn", None, example_inputs=(x,))
    assert [f.name for f in files] == ["model.pt2"]
    reloaded = open_checkpoint(tmp_path / "cnn" / "model.pt2")
    with torch.no_grad():
        assert torch.equal(reloaded.module(x), net(x))
        fresh = StructuredPrune.restore(SmallCNN.make(), out.transforms[-1])  # shapes only, then weights
        fresh.load_state_dict(net.state_dict())
        assert torch.equal(fresh.eval()(x), net(x))

    with pytest.raises(BadInput, match="no Conv layers"):  # an exported graph has no layers to cut
        StructuredPrune().run(
            StageState("torch", loaded, module=loaded.module),
            StructuredParams(),
            _ctx(loaded, tmp_path, [], Events()),
        )


def test_structured_params_are_strict():
    for bad in (
        {"fraction": 1.5},
        {"fraction": 0.0},
        {"fraction": -0.2},
        {"round_to": 0},
        {"fraction": None},
    ):
        with pytest.raises(ValidationError):
            StructuredParams(**bad)


# --------------------------------------------------------------------------------------------- heads


def test_heads_minilm_quarter_by_importance(minilm, sentences, tmp_path):
    import torch

    events = Events()
    before = _params_count(minilm.module)
    ctx = _ctx(minilm, tmp_path, sentences, events)
    out = HeadsPrune().run(initial_state(minilm), HeadsParams(fraction=0.25), ctx)

    blocks, _ = find_attention_blocks(out.module)
    assert sum(b.num_heads for b in blocks) == 72 - 18
    assert [b.num_heads for b in blocks] == [9] * 6  # balance: layers, what ONNX Runtime's fusion needs
    assert out.info["attention_heads"] == {b.name: b.num_heads for b in blocks}  # for later steps
    assert all(b.num_heads >= 1 for b in blocks)
    assert events.metric("heads_removed") == 18
    per_head = 3 * (384 * 32 + 32) + 32 * 384  # q, k, v rows + biases, output-projection columns
    assert before - _params_count(out.module) == 18 * per_head
    record = out.transforms[-1]
    assert record["technique"] == "prune.heads" and record["method"] == "gradient"
    assert sum(len(h) for h in record["pruned"].values()) == 18
    assert any("gradient importance" in e["message"] for e in events.progress())

    _, reloaded = _save_and_reload(out, tmp_path)
    assert [b.num_heads for b in find_attention_blocks(reloaded.module)[0]] == [b.num_heads for b in blocks]
    pruned = _outputs(minilm, out.module, sentences)
    assert torch.equal(pruned, _outputs(reloaded, reloaded.module, sentences))

    # importance is used: removing the 18 *most* important heads instead hurts much more
    reference = _outputs(minilm, minilm.module, sentences)
    fidelity = events.metric("fidelity_cosine")
    assert fidelity == pytest.approx(_cosine(reference, pruned), abs=1e-5)
    ranked = compute_head_importance(minilm, sentences, sequence_length=SEQ).ranked()
    worst: dict[int, list[int]] = {}
    for layer, head, _ in reversed(ranked):
        if sum(len(h) for h in worst.values()) == 18:
            break
        if len(worst.get(layer, [])) < 11:
            worst.setdefault(layer, []).append(head)
    opposite = HeadsPrune().run(
        initial_state(minilm), HeadsParams(heads=worst), _ctx(minilm, tmp_path, sentences, Events())
    )
    worst_fidelity = _cosine(reference, _outputs(minilm, opposite.module, sentences))
    assert fidelity > worst_fidelity + 0.03, (fidelity, worst_fidelity)  # measured 0.926 vs 0.853


@pytest.mark.parametrize(
    ("name", "heads", "expect"),
    [
        ("gpt2", {0: [1], 1: [0, 3]}, [3, 2]),
        ("llama", {0: [0, 1], 1: [1, 3]}, [2, 2]),  # a whole KV group; one query head per group
        ("marian", {0: [1], 3: [0, 2]}, [3, 4, 4, 2]),  # block 3: the decoder's second self-attention
    ],
)
def test_heads_explicit_small_models(request, name, heads, expect, sentences, tmp_path):
    import torch

    model = open_checkpoint(request.getfixturevalue(name))
    out = HeadsPrune().run(
        initial_state(model), HeadsParams(heads=heads), _ctx(model, tmp_path, sentences[:4], Events())
    )
    assert [b.num_heads for b in find_attention_blocks(out.module)[0]] == expect
    if name == "llama":
        attn0, attn1 = (layer.self_attn for layer in out.module.model.layers)
        assert (attn0.k_proj.out_features, attn0.num_key_value_groups) == (
            8,
            2,
        )  # group 0 and its KV head gone
        assert (attn1.k_proj.out_features, attn1.num_key_value_groups) == (16, 1)  # KV heads kept
        assert out.transforms[-1]["pruned_kv"] == {
            "model.layers.0.self_attn": [0],
            "model.layers.1.self_attn": [],
        }
    if name == "marian":
        assert find_attention_blocks(out.module)[1] == [
            "model.decoder.layers.0.encoder_attn",
            "model.decoder.layers.1.encoder_attn",
        ]  # cross-attention untouched
    _, reloaded = _save_and_reload(out, tmp_path)
    assert [b.num_heads for b in find_attention_blocks(reloaded.module)[0]] == expect
    assert torch.equal(
        _outputs(model, out.module, sentences[:4]), _outputs(model, reloaded.module, sentences[:4])
    )


def test_select_heads_per_layer_keeps_counts_equal_and_never_removes_more_than_asked():
    layouts = [HeadLayout("bert", 4, 4, 8)] * 3
    scores = [[0.4, 0.1, 0.3, 0.2], [0.9, 0.8, 0.05, 0.7], [0.2, 0.6, 0.5, 0.01]]
    assert select_heads_per_layer(layouts, scores, 3) == {0: [1], 1: [2], 2: [3]}  # each layer's least
    assert select_heads_per_layer(layouts, scores, 5) == {0: [1], 1: [2], 2: [3]}  # 6 would overshoot
    assert select_heads_per_layer(layouts, scores, 6) == {0: [1, 3], 1: [2, 3], 2: [0, 3]}
    assert select_heads_per_layer(layouts, scores, 2) is None  # fewer heads than layers: not evenly
    gqa = [HeadLayout("qkv", 4, 2, 8)] * 2  # groups of two query heads per KV head
    assert select_heads_per_layer(gqa, [[1, 1, 0, 0], [0, 0, 1, 1]], 4) == {0: [2, 3], 1: [0, 1]}
    assert select_heads_per_layer(gqa, [[1, 1, 0, 0], [0, 0, 1, 1]], 3) is None  # whole groups only
    uneven = [HeadLayout("bert", 4, 4, 8), HeadLayout("bert", 2, 2, 8)]  # an earlier uneven pruning
    assert select_heads_per_layer(uneven, [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6]], 2) == {0: [0, 1]}


@pytest.mark.parametrize(("balance", "count"), [("layers", 2), ("global", 2), ("layers", 1)])
def test_heads_balance_and_the_uneven_warning(request, balance, count, sentences, tmp_path):
    model = open_checkpoint(request.getfixturevalue("bert_classifier"))
    events = Events()
    ctx = RunContext(
        original=model,
        workdir=tmp_path,
        calibration=sentences[:8],
        sequence_length=SEQ,
        later_steps=["export.onnx", "onnx.optimize"],
        emit=events.append,
    )
    out = HeadsPrune().run(initial_state(model), HeadsParams(count=count, balance=balance), ctx)
    counts = [b.num_heads for b in find_attention_blocks(out.module)[0]]
    assert sum(counts) == 8 - count
    warnings = [e["message"] for e in events if e["type"] == "log" and e["level"] == "warning"]
    if balance == "layers" and count == 2:
        assert counts == [3, 3] and not warnings
    if count == 1:  # one head from two layers: not evenly, so ranked across layers, and said so
        assert any("cannot be removed evenly from 2 layers" in w for w in warnings)
    if len(set(counts)) > 1:
        assert any("uneven head counts" in w and "onnx.optimize" in w for w in warnings)


def test_heads_gqa_by_importance_removes_whole_groups(request, sentences, tmp_path):
    llama = open_checkpoint(request.getfixturevalue("llama"))
    events = Events()
    out = HeadsPrune().run(
        initial_state(llama), HeadsParams(count=3), _ctx(llama, tmp_path, sentences[:4], events)
    )
    assert events.metric("heads_removed") == 2  # groups of 2 query heads: rounded down to one group
    assert sorted(b.num_heads for b in find_attention_blocks(out.module)[0]) == [2, 4]
    with pytest.raises(BadInput, match="grouped-query"):
        HeadsPrune().run(
            initial_state(llama), HeadsParams(heads={0: [0]}), _ctx(llama, tmp_path, [], Events())
        )


def test_heads_refusals(request, cnn_pt2, sentences, tmp_path):
    bert = open_checkpoint(request.getfixturevalue("bert_classifier"))
    with pytest.raises(ValidationError, match="exactly one"):
        HeadsParams(fraction=0.25, count=3)
    with pytest.raises(ValidationError, match="exactly one"):
        HeadsParams()
    for bad in (
        {"fraction": 1.5},
        {"fraction": 0.0},
        {"count": 0},
        {"heads": {0: [-1]}},
        {"heads": {0: [1, 1]}},
    ):
        with pytest.raises(ValidationError):
            HeadsParams(**bad)
    assert HeadsParams.model_validate_json('{"heads": {"1": [0, 2]}}').heads == {1: [0, 2]}  # GUI JSON
    ctx = _ctx(bert, tmp_path, sentences[:4], Events())
    with pytest.raises(BadInput, match="keeps at least one head"):
        HeadsPrune().run(initial_state(bert), HeadsParams(heads={0: [0, 1, 2, 3]}), ctx)
    with pytest.raises(BadInput, match="at most 6"):
        HeadsPrune().run(initial_state(bert), HeadsParams(count=7), ctx)
    with pytest.raises(BadInput, match="has 4 heads"):
        HeadsPrune().run(initial_state(bert), HeadsParams(heads={1: [4]}), ctx)
    with pytest.raises(BadInput, match="image-classification"):
        HeadsPrune().check(HeadsParams(fraction=0.25), open_checkpoint(cnn_pt2))
    StructuredPrune().check(StructuredParams(), open_checkpoint(cnn_pt2))  # applies to CNNs
