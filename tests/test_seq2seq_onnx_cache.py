"""ONNX variants of seq2seq models that generate by themselves: export.onnx with_cache on Marian.

On the small random Marian of conftest (2 + 2 layers, width 32, 4 heads): the export writes model.onnx
(encoder + decoder, both caches out) and decoder_with_past.onnx (one decoder step, caches in), verified
against torch; ONNX Runtime alone then generates torch's greedy tokens, padded sources included; its
generation metrics are measured like a torch variant's and its KV-cache bytes are the cache arrays'
bytes; its translations score BLEU and chrF 100 against torch's; a graph without the cache is refused
saying how to export one; and one real `model-studio run` goes end to end. Sizes are tiny (sources of 12
tokens, 6 new tokens); no assertion depends on speed.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from studio.checkpoints import open_checkpoint
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.evaluation.latency import TimingPolicy
from studio.techniques.base import RunContext, get_technique, initial_state

FAST = TimingPolicy(warmup_runs=1, warmup_seconds=0.0, min_runs=3, min_seconds=0.0, max_runs=4)
PROMPT, NEW = 12, 6
LAYERS, HEADS, HEAD_DIM = 2, 4, 8  # marian_config(): 2 decoder layers, 4 heads of 32 / 4


def examples(n=6):
    return load_examples("builtin:translation-en-de", n)


def run_step(state, workdir, **params):
    events = []
    ctx = RunContext(
        original=state.model,
        workdir=workdir,
        calibration=examples(4),
        sequence_length=24,
        step_index=0,
        emit=events.append,
    )
    cls = get_technique("export.onnx")
    return cls().run(state, cls.Params(**params), ctx), events


def metric(events, name):
    return next(e.value for e in reversed(events) if getattr(e, "name", None) == name)


def spec(batch_sizes=(1, 2)):
    from studio.pipeline import GenerationSpec

    return GenerationSpec(prompt_tokens=PROMPT, new_tokens=NEW, batch_sizes=list(batch_sizes))


@pytest.fixture(scope="module")
def exported(marian, tmp_path_factory):
    """export.onnx with_cache of the small Marian, once per module: (model, state, events)."""
    model = open_checkpoint(str(marian))
    state, events = run_step(initial_state(model), tmp_path_factory.mktemp("marian-cache"), with_cache=True)
    return model, state, events


@pytest.fixture(scope="module")
def uncached(marian, tmp_path_factory):
    model = open_checkpoint(str(marian))
    state, _ = run_step(initial_state(model), tmp_path_factory.mktemp("marian-plain"))  # with_cache off
    return model, state


def recomputed_greedy(module, ids, mask, steps):
    """Greedy tokens with no cache at all: encoder and the whole decoded sequence again for every token."""
    import torch

    decoded = torch.zeros((len(ids), 1), dtype=torch.long)  # decoder_start_token_id 0
    with torch.no_grad():
        for _ in range(steps):
            out = module(input_ids=ids, attention_mask=mask, decoder_input_ids=decoded, use_cache=False)
            decoded = torch.cat([decoded, out.logits[:, -1].argmax(-1)[:, None]], dim=1)
    return decoded[:, 1:]


# ------------------------------------------------------------------------------------------------ export


def test_the_export_writes_two_verified_graphs_and_records_the_layout(exported):
    import onnxruntime as ort

    from studio.checkpoints.onnx_graph import read_metadata

    _, state, events = exported
    assert state.kind == "onnx" and state.path.name == "model.onnx"
    assert metric(events, "onnx_max_abs_diff") < 1e-4  # teacher forcing through model.onnx
    assert metric(events, "onnx_decode_max_abs_diff") < 1e-4  # greedy steps through both caches
    assert any("the greedy tokens are torch's" in getattr(e, "message", "") for e in events)
    layout = json.loads(read_metadata(state.path)["studio.seq2seq_cache"])
    assert layout == {
        "layers": LAYERS, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
        "decoder": "decoder_with_past.onnx",
    }  # fmt: skip
    prefill = ort.InferenceSession(str(state.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in prefill.get_inputs()] == ["input_ids", "attention_mask", "decoder_input_ids"]
    outputs = [o.name for o in prefill.get_outputs()]
    assert outputs[:5] == [
        "logits", "present.0.decoder.key", "present.0.decoder.value", "present.0.encoder.key",
        "present.0.encoder.value",
    ]  # fmt: skip
    assert len(outputs) == 1 + 4 * LAYERS
    decoder = ort.InferenceSession(
        str(state.path.parent / "decoder_with_past.onnx"), providers=["CPUExecutionProvider"]
    )
    inputs = {i.name: i.shape for i in decoder.get_inputs()}
    assert "input_ids" not in inputs  # the encoder is not in the step graph
    assert inputs["past_key_values.1.decoder.key"] == ["batch", HEADS, "past_decoder_sequence", HEAD_DIM]
    assert inputs["past_key_values.1.encoder.value"] == ["batch", HEADS, "sequence", HEAD_DIM]
    assert [o.name for o in decoder.get_outputs()] == [
        "logits", "present.0.decoder.key", "present.0.decoder.value", "present.1.decoder.key",
        "present.1.decoder.value",
    ]  # fmt: skip


def test_onnx_greedy_output_is_torchs(exported):
    from studio.evaluation.generation import generation_prompts, greedy_tokens

    model, state, _ = exported
    prompts = generation_prompts(model, examples(), 3, PROMPT)
    torch_tokens = greedy_tokens(model.module, "seq2seq", prompts, NEW)
    onnx_tokens = greedy_tokens(state.path, "seq2seq", prompts, NEW, "onnx")
    assert onnx_tokens.shape == (3, NEW)
    assert onnx_tokens.tolist() == torch_tokens.tolist()


def test_padded_sources_generate_what_recomputing_everything_generates(exported):
    """Sources of different lengths in one batch: the encoder mask reaches both graphs' cross-attention."""
    import torch

    from studio.evaluation.onnx_generation import OnnxSeq2SeqLoop
    from studio.families import family_for

    model, state, _ = exported
    batch = family_for(model).batch(model, examples(4), 24)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert (mask == 0).any()  # really padded
    loop = OnnxSeq2SeqLoop(state.path)
    logits, s = loop.start(ids, mask)
    tokens = [logits.argmax(-1)]
    for _ in range(NEW - 1):
        tokens.append(loop.step(tokens[-1], s))
    assert torch.stack(tokens, 1).tolist() == recomputed_greedy(model.module, ids, mask, NEW).tolist()


def test_the_decoder_step_reads_the_cross_attention_cache(exported):
    """The step graph takes the encoder's keys and values from its input: other values, other logits (so
    it does not recompute them, and the cache the loop holds is the one it uses)."""
    from studio.evaluation.generation import generation_prompts
    from studio.evaluation.onnx_generation import OnnxSeq2SeqLoop

    model, state, _ = exported
    loop = OnnxSeq2SeqLoop(state.path)
    prompts = generation_prompts(model, examples(), 1, PROMPT)
    token, s = loop.prefill(prompts)
    changed = copy.deepcopy(s)
    rng = np.random.default_rng(0)
    for i in range(LAYERS):  # every layer's cross-attention values, other numbers of the same shape
        values = changed["cache"][4 * i + 3]
        changed["cache"][4 * i + 3] = rng.normal(0, 10, values.shape).astype(values.dtype)
    same = loop.advance(token, copy.deepcopy(s))
    assert float((loop.advance(token, copy.deepcopy(s)) - same).abs().max()) == 0.0
    assert float((loop.advance(token, changed) - same).abs().max()) > 1e-4


def test_a_saved_variant_folder_reopens_and_generates_alone(exported, tmp_path):
    from studio.evaluation.generation import generation_prompts, greedy_tokens

    model, state, _ = exported
    folder = tmp_path / "variant"
    shutil.copytree(state.path.parent, folder)
    reopened = open_checkpoint(str(folder))  # two graphs in the folder: model.onnx is the variant
    assert (reopened.format, reopened.family, reopened.path.name) == ("onnx", "seq2seq", "model.onnx")
    prompts = generation_prompts(reopened, examples(), 2, PROMPT)  # its own tokenizer copy
    assert (
        greedy_tokens(reopened.path, "seq2seq", prompts, NEW, "onnx").tolist()
        == greedy_tokens(model.module, "seq2seq", prompts, NEW).tolist()
    )


# ------------------------------------------------------------------------------------------------ metrics


def test_onnx_generation_metrics_and_kv_cache_bytes(exported):
    import onnxruntime as ort
    import torch

    from studio.evaluation.generation import generation_prompts, greedy_tokens, measure_generation

    model, state, _ = exported
    out = measure_generation("onnx", state.path, model, examples(), spec(), policy=FAST)
    assert "unavailable" not in out
    for b in ("1", "2"):
        for stat in ("ttft_ms", "tpot_ms"):
            assert 0 < out[b][stat]["p50"] <= out[b][stat]["p95"] <= out[b][stat]["p99"]
            assert out[b][stat]["runs"] >= FAST.min_runs
        assert out[b]["decode_tokens_per_s"] == pytest.approx(int(b) * 1000.0 / out[b]["tpot_ms"]["p50"])
    # the caches of one pass over the start token + every new token, summed here without the studio
    prompts = generation_prompts(model, examples(), 1, PROMPT)
    decoded = torch.cat(
        [torch.zeros((1, 1), dtype=torch.long), greedy_tokens(model.module, "seq2seq", prompts, NEW)], 1
    )
    session = ort.InferenceSession(str(state.path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": prompts.numpy(), "attention_mask": np.ones_like(prompts.numpy())}
    arrays = session.run(None, {**feeds, "decoder_input_ids": decoded.numpy()})[1:]
    assert out["kv_cache_bytes"] == sum(a.nbytes for a in arrays)
    per_position = LAYERS * 2 * HEADS * HEAD_DIM * 4  # layers, k+v, heads, head dim, float32
    assert out["kv_cache_bytes"] == per_position * ((1 + NEW) + PROMPT)  # self-attention + cross-attention
    torch_out = measure_generation("torch", model.module, model, examples(), spec([1]), policy=FAST)
    assert torch_out["kv_cache_bytes"] == out["kv_cache_bytes"]  # torch's EncoderDecoderCache: the same


def test_translations_of_the_onnx_variant_score_100_against_torchs(exported):
    import torch

    from studio.evaluation.generation import greedy_loop, translations
    from studio.evaluation.quality import translation_quality

    model, state, _ = exported
    texts = translations(greedy_loop("onnx", state.path, "seq2seq"), model, examples(), spec())
    assert len(texts) == 6 and all(texts)  # real text to score, not empty strings
    base, var = translation_quality(model.module, state.path, model, examples(), spec(), "onnx")
    assert var["bleu"] == pytest.approx(100.0) and var["chrf"] == pytest.approx(100.0)
    assert base["bleu"] == base["chrf"] == 100.0
    assert var["reference_bleu"] == base["reference_bleu"]  # the same text scored against the references
    assert var["reference_chrf"] == base["reference_chrf"] < 100.0  # a random model does not translate
    noisy = copy.deepcopy(model.module)  # and a variant whose outputs differ scores below 100
    with torch.no_grad():
        for p in noisy.model.decoder.layers.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    _, other = translation_quality(model.module, noisy, model, examples(), spec())
    assert other["chrf"] < 100.0


# ------------------------------------------------------------------------------------------------ refusals


def test_a_graph_without_the_cache_is_refused_saying_how_to_export(uncached):
    from studio.evaluation.generation import measure_generation
    from studio.evaluation.onnx_generation import OnnxSeq2SeqLoop

    model, state = uncached
    assert not (state.path.parent / "decoder_with_past.onnx").exists()
    with pytest.raises(BadInput, match="with_cache: true"):
        OnnxSeq2SeqLoop(state.path)
    out = measure_generation("onnx", state.path, model, examples(), spec([1]), policy=FAST)
    assert (
        set(out) == {"prompt_tokens", "new_tokens", "unavailable"}
        and "with_cache: true" in out["unavailable"]
    )


def test_a_folder_without_its_decoder_graph_or_with_damaged_metadata_is_refused(exported, tmp_path):
    from studio.checkpoints.onnx_graph import set_metadata
    from studio.evaluation.onnx_generation import OnnxSeq2SeqLoop
    from studio.pipeline import load_recipe, plan

    _, state, _ = exported
    folder = tmp_path / "alone"
    shutil.copytree(state.path.parent, folder)
    (folder / "decoder_with_past.onnx").unlink()  # what an ONNX pass's folder would hold
    with pytest.raises(BadInput, match=r"decoder graph 'decoder_with_past\.onnx'.* is missing"):
        OnnxSeq2SeqLoop(folder / "model.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {folder}\nevaluate:\n  generation: {{prompt_tokens: 8, new_tokens: 4}}\n"
    )
    with pytest.raises(BadInput, match=r"field 'evaluate.generation': the decoder graph .* is missing"):
        plan(load_recipe(recipe), path=recipe)
    shutil.copy(state.path.parent / "decoder_with_past.onnx", folder)
    plan(load_recipe(recipe), path=recipe)  # with it back, the graph generates
    for damaged in ('{"layers": 2}', json.dumps({"layers": 2, "heads": 4, "head_dim": 8, "dtype": "float32",
                                                 "decoder": "../elsewhere.onnx"})):  # fmt: skip
        set_metadata(folder / "model.onnx", {"studio.seq2seq_cache": damaged})
        with pytest.raises(BadInput, match=r"damaged|not a file beside it"):
            OnnxSeq2SeqLoop(folder / "model.onnx")


def recipe_text(model, steps, data="data: {calibration_examples: 4, evaluation_examples: 4}\n"):
    return (
        f"version: 1\nmodel: {model}\n{data}steps:\n{steps}"
        "evaluate:\n  latency: false\n  generation: {prompt_tokens: 8, new_tokens: 4}\n"
    )


def test_recipes_asking_an_uncached_graph_to_generate_exit_2(tmp_path, marian, uncached, capsys):
    from studio.cli import main
    from studio.pipeline import load_recipe, plan

    path = tmp_path / "no-cache.yaml"
    path.write_text(recipe_text(marian, "  - technique: export.onnx\n"))
    with pytest.raises(BadInput, match=r"step 1 \(export.onnx\): field 'with_cache'.*with_cache: true"):
        plan(load_recipe(path), path=path)
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "with_cache: true" in capsys.readouterr().err
    _, state = uncached  # an opened graph exported without the cache
    path.write_text(
        f"version: 1\nmodel: {state.path}\nevaluate:\n  generation: {{prompt_tokens: 8, new_tokens: 4}}\n"
    )
    with pytest.raises(
        BadInput, match=r"field 'evaluate.generation': this seq2seq ONNX graph has no decoder"
    ):
        plan(load_recipe(path), path=path)
    assert main(["run", str(path), "--dry-run"]) == 2
    # an ONNX pass after the cache export would leave the decoder graph behind
    steps = (
        "  - technique: export.onnx\n    params: {with_cache: true}\n  - technique: onnx.quantize_dynamic\n"
    )
    path.write_text(recipe_text(marian, steps))
    with pytest.raises(BadInput, match=r"step 2 \(onnx.quantize_dynamic\).*make export.onnx the last step"):
        plan(load_recipe(path), path=path)
    path.write_text(recipe_text(marian, "  - technique: export.onnx\n    params: {with_cache: true}\n"))
    assert plan(load_recipe(path)).final_kind == "onnx"


# ------------------------------------------------------------------------------------------------ a run


def test_run_json_has_onnx_generation_metrics_and_translation_scores(tmp_path, marian):
    """One real run through the CLI and the worker: the small Marian exported with its caches."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {marian}\n"
        "data: {calibration: builtin:translation-en-de, evaluation: builtin:translation-en-de,\n"
        "       calibration_examples: 4, evaluation_examples: 4}\n"
        "steps:\n  - technique: export.onnx\n    params: {with_cache: true}\n"
        "evaluate:\n  latency: false\n  sequence_length: 16\n"
        "  generation: {prompt_tokens: 6, new_tokens: 3, batch_sizes: [1, 2]}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "studio", "run", str(recipe), "--json", "--workspace", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (variant,) = json.loads(proc.stdout)["variants"]
    metrics = variant["metrics"]
    assert metrics["runtime"] == "onnx"
    gen = metrics["generation"]
    assert "unavailable" not in gen
    for b in ("1", "2"):
        assert gen[b]["tpot_ms"]["p50"] <= gen[b]["tpot_ms"]["p95"] <= gen[b]["tpot_ms"]["p99"]
        assert gen[b]["decode_tokens_per_s"] > 0
    # self-attention: start token + 3 new tokens; cross-attention: the 6 prompt tokens
    assert gen["kv_cache_bytes"] == LAYERS * 2 * HEADS * HEAD_DIM * 4 * ((1 + 3) + 6)
    quality = metrics["quality"]
    assert quality["generation_match"] == 1.0
    assert quality["bleu"] == pytest.approx(100.0) and quality["chrf"] == pytest.approx(100.0)
    assert metrics["baseline_quality"]["reference_chrf"] == quality["reference_chrf"]
    saved = [p.name for p in (tmp_path / "ws" / "variants" / variant["id"]).iterdir()]
    assert "model.onnx" in saved and "decoder_with_past.onnx" in saved
