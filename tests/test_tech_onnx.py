"""ONNX blocks on real models: export (verified, dynamic axes), fusion, dynamic/static INT8, float16,
and the runners that feed torch and ONNX Runtime the same way."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from studio.checkpoints import open_checkpoint
from studio.checkpoints.onnx_graph import op_counts
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.evaluation.runners import OnnxRunner, TorchRunner, make_runner
from studio.families import family_for
from studio.techniques.base import RunContext, StageState, get_technique, initial_state
from studio.techniques.onnx.quantization import DYNAMIC_OP_TYPES

SEQ = 32


class Events(list):
    def __call__(self, event: dict) -> None:
        self.append(event)

    def metric(self, name: str) -> float:
        return next(e["value"] for e in reversed(self) if e["type"] == "metric" and e["name"] == name)

    def logs(self) -> str:
        return "\n".join(e["message"] for e in self if e["type"] == "log")


def run_step(state, technique_id, workdir, *, later=(), index=0, examples=None, **params):
    events = Events()
    ctx = RunContext(
        original=state.model,
        workdir=workdir,
        calibration=examples if examples is not None else load_examples("builtin:sentences", 8),
        sequence_length=SEQ,
        step_index=index,
        later_steps=list(later),
        emit=events,
    )
    cls = get_technique(technique_id)
    return cls().run(state, cls.Params(**params), ctx), events


def cosine(a, b) -> float:
    import torch.nn.functional as F

    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def minilm():
    return open_checkpoint("builtin:minilm")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def sentences():
    return load_examples("builtin:sentences", 16)


@pytest.fixture(scope="module")
def reference(minilm, sentences):
    """Original torch embeddings of 16 sentences."""
    batch = family_for(minilm).batch(minilm, sentences, SEQ)
    return batch, TorchRunner(minilm.module, minilm)(batch)


@pytest.fixture(scope="module")
def exported(minilm, work):
    return run_step(initial_state(minilm), "export.onnx", work, later=["onnx.optimize"])


@pytest.fixture(scope="module")
def optimized(exported, work):
    return run_step(exported[0], "onnx.optimize", work, index=1)


# ---------------------------------------------------------------------------------------------- export


def test_export_is_verified_and_carries_metadata_and_side_files(minilm, exported):
    from studio.checkpoints.onnx_graph import read_metadata

    state, events = exported
    assert state.kind == "onnx" and state.path.name == "model.onnx"
    assert events.metric("onnx_max_abs_diff") < 1e-4
    assert "eager attention" in events.logs()
    assert minilm.module.config._attn_implementation == "sdpa"  # the torch model is left as it was
    props = read_metadata(state.path)
    assert props["studio.family"] == "feature-extraction"
    assert props["studio.architecture"] == "BertModel"
    assert (props["studio.pooling"], props["studio.normalize"]) == ("mean", "true")
    for name in ("tokenizer.json", "vocab.txt", "modules.json", "1_Pooling"):
        assert (state.path.parent / name).exists(), name
    reopened = open_checkpoint(state.path)
    assert reopened.family == "feature-extraction" and reopened.tokenizer_dir == state.path.parent
    # the file alone (its own tokenizer files, the inputs its graph declares) gives the same embeddings
    texts = load_examples("builtin:sentences", 4)
    alone = make_runner("onnx", reopened, threads=1)
    options = alone.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    embeddings = alone(family_for(reopened).batch(reopened, texts, SEQ))
    assert (
        cosine(embeddings, TorchRunner(minilm.module, minilm)(family_for(minilm).batch(minilm, texts, SEQ)))
        > 0.9999
    )
    graph = [i.name for i in OnnxRunner(state.path, minilm).session.get_inputs()]
    assert sorted(graph) == ["attention_mask", "input_ids", "token_type_ids"]


def test_dynamic_axes_run_at_other_batch_and_sequence_sizes(minilm, exported):
    family = family_for(minilm)
    texts = load_examples("builtin:sentences", 40)
    onnx_run, torch_run = make_runner(exported[0]), make_runner("torch", minilm)
    shapes = set()
    for chunk, seq in ((texts[:3], 12), (texts[8:40], 64)):
        batch = family.batch(minilm, chunk, seq)
        shapes.add(tuple(batch.inputs["input_ids"].shape))
        out, ref = onnx_run(batch), torch_run(batch)
        assert out.shape == ref.shape
        assert float((out - ref).abs().max()) < 1e-4
    assert len(shapes) == 2 and len({s[0] for s in shapes}) == 2 and len({s[1] for s in shapes}) == 2


def test_export_param_validation():
    params = get_technique("export.onnx").Params
    with pytest.raises(ValidationError, match="opset"):
        params(opset=21)  # TorchScript exporter stops at 20
    with pytest.raises(ValidationError):
        params(opset=9)
    assert params(opset=21, exporter="dynamo").opset == 21


# ---------------------------------------------------------------------------------------------- passes


def test_optimize_fuses_attention_layernorm_and_gelu(exported, optimized, reference, minilm):
    state, events = optimized
    counts = op_counts(state.path)
    assert counts["Attention"] == 6
    assert counts["SkipLayerNormalization"] >= 6
    assert counts["BiasGelu"] + counts["Gelu"] + counts["FastGelu"] >= 6
    assert events.metric("fused_Attention") == 6
    assert sum(counts.values()) < sum(op_counts(exported[0].path).values()) / 4
    batch, ref = reference
    assert float((make_runner(state)(batch) - ref).abs().max()) < 1e-4


def test_quantize_dynamic_per_channel_is_small_and_faithful(exported, optimized, reference, work):
    source = optimized[0].path
    before = sha(source)
    state, _ = run_step(
        optimized[0],
        "onnx.quantize_dynamic",
        work,
        index=2,
        per_channel=True,
        op_types=["MatMul", "Attention", "EmbedLayerNormalization", "Gather"],
    )
    assert sha(source) == before and state.path != source  # the input file is untouched
    assert state.path.stat().st_size < 0.30 * exported[0].path.stat().st_size
    counts = op_counts(state.path)
    assert counts["MatMulInteger"] == 18 and counts["QAttention"] == 6
    batch, ref = reference
    assert cosine(make_runner(state)(batch), ref) >= 0.98
    assert (state.path.parent / "tokenizer.json").is_file()


def test_graph_weights_carry_their_torch_names_transposed_back_and_dequantized(
    minilm, exported, optimized, work
):
    """The exporter renames weights (`onnx::MatMul_N`, stored transposed); the graph's tensors read back under
    the torch names, equal to the torch weights, and INT8 weights of a quantized graph read back dequantized."""
    import torch

    from studio.compare import weight_differences

    torch_weights = dict(minilm.module.state_dict())
    graph = {r.name: r for r in open_checkpoint(exported[0].path).tensors()}
    ffn = "encoder.layer.3.intermediate.dense.weight"  # a Linear weight: stored transposed in the graph
    assert graph[ffn].shape == tuple(torch_weights[ffn].shape) == (1536, 384)
    assert torch.equal(graph[ffn].load(), torch_weights[ffn])
    assert weight_differences(minilm, open_checkpoint(exported[0].path))["matched"] >= 100
    # the fusion joins Q, K and V into one Attention weight: it reads back as the three torch weights
    fused = {r.name: r for r in open_checkpoint(optimized[0].path).tensors()}
    for part in ("query", "key", "value"):
        name = f"encoder.layer.2.attention.self.{part}.weight"
        assert fused[name].shape == (384, 384) and torch.equal(fused[name].load(), torch_weights[name])
        bias = name.replace(".weight", ".bias")
        assert torch.equal(fused[bias].load(), torch_weights[bias])
    assert weight_differences(minilm, open_checkpoint(optimized[0].path))["matched"] >= 100

    state, _ = run_step(optimized[0], "onnx.quantize_dynamic", work, index=2, per_channel=True)
    tensors = {r.name: r for r in open_checkpoint(state.path).tensors()}
    assert tensors[ffn].dtype == "int8" and tensors[ffn].shape == (1536, 384)
    original, dequantized = torch_weights[ffn], tensors[ffn].load()
    relative = float((dequantized - original).norm() / original.norm())
    assert 0 < relative < 0.05  # INT8 rounding: changed, but close (per channel: scale = max|w| / 127)
    per_channel_bound = original.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((dequantized - original).abs() <= per_channel_bound * 1.01).all())
    query = "encoder.layer.2.attention.self.query.weight"  # part of a fused, quantized Attention weight
    assert tensors[query].dtype == "int8" and tensors[query].shape == (384, 384)
    error = (tensors[query].load() - torch_weights[query]).abs()
    assert 0 < float(error.max()) <= float(torch_weights[query].abs().max()) / 127 * 1.01
    diffs = {d["name"]: d for d in weight_differences(minilm, open_checkpoint(state.path))["layers"]}
    assert diffs[ffn]["change"] == "values" and diffs[ffn]["relative_l2"] == pytest.approx(relative, rel=1e-3)


def test_quantize_dynamic_default_op_types_and_refusals(exported, work):
    state, _ = run_step(exported[0], "onnx.quantize_dynamic", work, index=3)
    assert op_counts(state.path)["MatMulInteger"] > 0
    assert state.info["quantization"] == "dynamic-int8"
    params = get_technique("onnx.quantize_dynamic").Params
    with pytest.raises(ValidationError, match="Softmax"):
        params(op_types=["Softmax"])
    with pytest.raises(BadInput, match="already quantized"):
        run_step(state, "onnx.quantize_dynamic", work, index=4)
    with pytest.raises(BadInput, match="no node named"):
        run_step(exported[0], "onnx.quantize_dynamic", work, index=5, exclude_nodes=["/no/such/node"])


def test_ort_op_type_lists_match_onnxruntime():
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    assert set(DYNAMIC_OP_TYPES) - {"Gemm"} <= set(IntegerOpsRegistry)


def test_quantize_static_qdq(optimized, reference, work):
    state, events = run_step(
        optimized[0], "onnx.quantize_static", work, index=6, examples=load_examples("builtin:sentences", 8)
    )
    counts = op_counts(state.path)
    assert counts["QuantizeLinear"] >= 6 and counts["DequantizeLinear"] >= 18
    assert "calibrating on 8 examples" in events.logs()
    batch, ref = reference
    out = make_runner(state)(batch)
    assert out.isfinite().all()
    assert cosine(out, ref) > 0.85  # activations in INT8 cost more than weights alone
    assert not list(state.path.parent.glob("_*"))  # no scratch files left


def test_onnx_half(exported, reference, work):
    from studio.checkpoints.onnx_graph import float_initializer_types

    state, _ = run_step(exported[0], "onnx.half", work, index=7)
    assert float_initializer_types(state.path) == {"float16"}
    ratio = state.path.stat().st_size / exported[0].path.stat().st_size
    assert 0.45 < ratio < 0.56
    batch, ref = reference
    runner = make_runner(state)
    assert runner.session.get_inputs()[0].type == "tensor(int64)"
    assert cosine(runner(batch), ref) > 0.999
    assert state.info["dtype"] == "float16"
    with pytest.raises(BadInput, match=r"before onnx\.half"):
        run_step(state, "onnx.quantize_dynamic", work, index=8)


def test_precision_half_then_export_gives_a_half_graph(minilm, reference, work):
    from studio.checkpoints.onnx_graph import float_initializer_types

    state = initial_state(minilm)
    state, _ = run_step(state, "precision.half", work, index=9, dtype="float16")
    onnx_state, events = run_step(state, "export.onnx", work, index=10)
    assert float_initializer_types(onnx_state.path) == {"float16"}
    assert onnx_state.info["dtype"] == "float16"
    assert events.metric("onnx_max_abs_diff") < 1e-2
    batch, ref = reference
    assert cosine(make_runner(onnx_state)(batch), ref) > 0.999


def test_bfloat16_is_exported_as_float16(bert_classifier, work):
    from studio.checkpoints.onnx_graph import float_initializer_types

    model = open_checkpoint(bert_classifier)
    state, _ = run_step(initial_state(model), "precision.half", work / "bf16", dtype="bfloat16")
    onnx_state, events = run_step(state, "export.onnx", work / "bf16", index=1)
    assert float_initializer_types(onnx_state.path) == {"float16"}
    assert "exported as float16" in events.logs()
    assert events.metric("onnx_max_abs_diff") < 1e-2
    assert next(state.module.parameters()).dtype.is_floating_point  # the pipeline's module is untouched
    assert str(next(state.module.parameters()).dtype) == "torch.bfloat16"


# ---------------------------------------------------------------------------------------------- families


# op fused by onnx.optimize: ORT's bert fusions for BERT, its GPT-2 fusions for GPT-2 and Llama (RMSNorm
# as SimplifiedLayerNormalization), its BART fusions for Marian
FUSED = {
    "bert_classifier": "Attention",
    "gpt2": "SkipLayerNormalization",
    "llama": "SkipSimplifiedLayerNormalization",
    "marian": "SkipLayerNormalization",
}


@pytest.mark.parametrize("name", list(FUSED))
def test_export_optimize_and_run_other_families(request, name, work):
    model = open_checkpoint(request.getfixturevalue(name))
    folder = work / name
    state, events = run_step(initial_state(model), "export.onnx", folder, later=["onnx.optimize"])
    assert events.metric("onnx_max_abs_diff") < 1e-4
    family = family_for(model)
    batch = family.batch(model, load_examples("builtin:sentences", 5), 24)
    ref = make_runner("torch", model)(batch)
    out = make_runner(state)(batch)
    assert out.shape == ref.shape and float((out - ref).abs().max()) < 1e-4
    expected = [*batch.inputs, "decoder_input_ids"] if name == "marian" else list(batch.inputs)
    assert sorted(i.name for i in make_runner(state).session.get_inputs()) == sorted(expected)
    assert {"llama": "token_type_ids", "marian": "token_type_ids"}.get(name) not in expected

    optimized, events = run_step(state, "onnx.optimize", folder, index=1)
    assert events.metric(f"fused_{FUSED[name]}") >= 2
    assert op_counts(optimized.path)[FUSED[name]] >= 2
    assert float((make_runner(optimized)(batch) - ref).abs().max()) < 1e-3


def test_dynamo_exporter(bert_classifier, work):
    model = open_checkpoint(bert_classifier)
    state, events = run_step(
        initial_state(model), "export.onnx", work / "dynamo", exporter="dynamo", opset=18
    )
    assert events.metric("onnx_max_abs_diff") < 1e-4
    assert "opset 18" in events.logs()
    batch = family_for(model).batch(model, load_examples("builtin:sentences", 11), 40)
    ref = make_runner("torch", model)(batch)
    assert float((make_runner(state)(batch) - ref).abs().max()) < 1e-4


def test_cnn_export_optimize_and_quantize(cnn_pt2, work):
    from tests.conftest import SmallCNN

    model = open_checkpoint(cnn_pt2)
    state = StageState("torch", model, module=SmallCNN.make())
    onnx_state, events = run_step(state, "export.onnx", work / "cnn", later=["onnx.optimize"])
    assert events.metric("onnx_max_abs_diff") < 1e-4
    family = family_for(model)
    batch = family.batch(model, load_examples("builtin:sentences", 3), SEQ)
    ref = make_runner("torch", model, artifact=SmallCNN.make())(batch)
    assert float((make_runner(onnx_state)(batch) - ref).abs().max()) < 1e-4
    optimized, events = run_step(onnx_state, "onnx.optimize", work / "cnn", index=1)
    assert "generic graph optimizations" in events.logs()
    assert op_counts(optimized.path)["BatchNormalization"] == 0  # folded into the convolution
    assert float((make_runner(optimized)(batch) - ref).abs().max()) < 1e-4
    quantized, _ = run_step(onnx_state, "onnx.quantize_static", work / "cnn", index=2, samples=4)
    assert op_counts(quantized.path)["QuantizeLinear"] > 0
    assert make_runner(quantized)(batch).shape == ref.shape


def test_make_runner_refuses_unknown_kind(minilm):
    with pytest.raises(BadInput, match="no runner"):
        make_runner("tflite", minilm)


def test_passes_keep_external_weights_external(bert_classifier, work):
    """Graphs over 2 GB keep their weights in a side file; every pass must read and write that form."""
    import shutil

    import onnx

    from studio.checkpoints.onnx_graph import onnx_size, uses_external_data

    model = open_checkpoint(bert_classifier)
    state, _ = run_step(initial_state(model), "export.onnx", work / "ext", verify=False)
    folder = work / "ext" / "external"
    shutil.copytree(state.path.parent, folder)
    onnx.save_model(
        onnx.load(str(state.path)),
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
    )
    state = StageState("onnx", model, path=folder / "model.onnx", info=state.info)
    batch = family_for(model).batch(model, load_examples("builtin:sentences", 4), SEQ)
    ref = make_runner("torch", model)(batch)
    for index, technique in enumerate(("onnx.optimize", "onnx.quantize_dynamic"), start=1):
        state, _ = run_step(state, technique, work / "ext", index=index)
        assert uses_external_data(state.path)
        assert onnx_size(state.path) > 2 * state.path.stat().st_size  # the weights are in model.onnx.data
        assert make_runner(state)(batch).shape == ref.shape


# ---------------------------------------------------------------------------------------------- Marian configs

# (d_model, heads, tie_word_embeddings, share_encoder_decoder_embeddings): head counts, widths, tied and not
MARIAN_CONFIGS = [(32, 4, True, True), (48, 6, False, False), (32, 8, True, False), (64, 2, False, True)]


@pytest.mark.parametrize(("width", "heads", "tied", "shared"), MARIAN_CONFIGS)
def test_marian_exports_with_references_in_every_configuration(width, heads, tied, shared, tmp_path):
    """Translation references leave padding columns that the export trims from its second batch; the
    trimmed labels were a strided view, and Marian's `labels.view(-1)` failed on it ("view size is not
    compatible with input tensor's size and stride") in every configuration, with references."""
    import torch
    from transformers import MarianMTModel

    from tests.conftest import _save, marian_config

    torch.manual_seed(0)
    cfg = marian_config(width, heads, tie_word_embeddings=tied, share_encoder_decoder_embeddings=shared)
    model = open_checkpoint(_save(MarianMTModel(cfg).eval(), tmp_path / "marian"))
    references = load_examples("builtin:translation-en-de", 8)
    assert all(e.target for e in references)
    state, events = run_step(initial_state(model), "export.onnx", tmp_path / "work", examples=references)
    assert events.metric("onnx_max_abs_diff") < 1e-4
    family = family_for(model)
    batch = family.batch(model, references, SEQ)
    ref = make_runner("torch", model)(batch)
    assert float((make_runner(state)(batch) - ref).abs().max()) < 1e-4


def test_sub_batch_tensors_are_contiguous(marian):
    from studio.techniques.onnx.export import sub_batch

    model = open_checkpoint(marian)
    batch = family_for(model).batch(model, load_examples("builtin:translation-en-de", 8), SEQ)
    lengths = (batch.labels != -100).sum(1)
    shortest = sorted(range(len(lengths)), key=lambda i: int(lengths[i]))[:2]
    part = sub_batch(batch, sorted(shortest))
    assert part.labels.shape[1] < batch.labels.shape[1]  # columns were trimmed: a slice before the fix
    assert part.labels.is_contiguous() and all(v.is_contiguous() for v in part.inputs.values())
    part.labels.view(-1)  # what the model's loss does


# ---------------------------------------------------------------------------------------------- fusions after head pruning


def _pruned_and_optimized(model, heads, folder):
    """prune.heads with explicit heads, export, onnx.optimize: the optimized state and its events."""
    pruned, _ = run_step(
        initial_state(model), "prune.heads", folder, later=["export.onnx", "onnx.optimize"], heads=heads
    )
    exported, _ = run_step(pruned, "export.onnx", folder, index=1, later=["onnx.optimize"])
    optimized, events = run_step(exported, "onnx.optimize", folder, index=2)
    return pruned, optimized, events


def test_even_head_pruning_keeps_the_attention_fusion(bert_classifier, tmp_path):
    """The same number of heads left in every layer: the fusions get that head count (detection from the
    graph finds none in transformers 5's graphs) and fuse as on the unpruned model."""
    model = open_checkpoint(bert_classifier)
    pruned, optimized, events = _pruned_and_optimized(model, {0: [1], 1: [3]}, tmp_path / "even")
    ops = op_counts(optimized.path)
    assert ops["Attention"] == 2 and ops["EmbedLayerNormalization"] == 1
    assert events.metric("fusions_missing") == 0
    assert not [e for e in events if e["type"] == "log" and e["level"] == "warning"]
    assert "fusing with 3 heads per layer, attention width 24" in events.logs()
    batch = family_for(model).batch(model, load_examples("builtin:sentences", 5), SEQ)
    ref = make_runner("torch", model, artifact=pruned.module)(batch)
    assert float((make_runner(optimized)(batch) - ref).abs().max()) < 1e-4


def test_uneven_head_pruning_warns_which_fusions_did_not_happen(bert_classifier, tmp_path):
    model = open_checkpoint(bert_classifier)
    pruned, optimized, events = _pruned_and_optimized(model, {0: [1, 2]}, tmp_path / "uneven")
    ops = op_counts(optimized.path)
    assert "Attention" not in ops  # one head count for the whole graph cannot fit 2 and 4 heads
    assert events.metric("fusions_missing") == 2
    (warning,) = [e["message"] for e in events if e["type"] == "log" and e["level"] == "warning"]
    assert "Attention: 0 of 2 attention layers fused" in warning
    assert "EmbedLayerNormalization: not fused" in warning
    assert "uneven head counts across layers (2, 4)" in warning and "balance: layers" in warning
    batch = family_for(model).batch(model, load_examples("builtin:sentences", 5), SEQ)
    ref = make_runner("torch", model, artifact=pruned.module)(batch)
    assert float((make_runner(optimized)(batch) - ref).abs().max()) < 1e-4  # slower, still right


def test_seq2seq_config_without_start_or_pad_token_is_refused_clearly(marian):
    """A Marian config with neither decoder_start_token_id nor pad_token_id failed in masked_fill with a
    TypeError; it is a BadInput that says which config fields to set."""
    from types import SimpleNamespace

    from studio.errors import BadInput

    model = open_checkpoint(marian)
    family = family_for(model)
    batch = family.batch(model, load_examples("builtin:translation-en-de", 2), SEQ)
    # transformers 5's MarianConfig refuses None itself; other seq2seq configs (and older files) allow it
    config = SimpleNamespace(decoder_start_token_id=None, pad_token_id=None)
    with pytest.raises(BadInput, match="decoder_start_token_id nor pad_token_id"):
        family.decoder_input_ids(batch, config)
