"""ONNX variants of causal LMs that generate by themselves: export.onnx with_cache and OnnxGreedyLoop.

On builtin:tinylm (Llama with grouped-query attention, trained) and a small random GPT-2 from a config:
the cache graph's greedy output is torch's, token for token; its generation metrics are measured like a
torch variant's; its KV-cache bytes are the present tensors' bytes; a graph without the cache is refused
with how to export one. Sizes are tiny (prompt 16, 8 new tokens); no assertion depends on speed.
"""

from __future__ import annotations

import json
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
PROMPT, NEW = 16, 8


def examples():
    return load_examples("builtin:sentences", 8)


def run_step(state, technique_id, workdir, index=0, **params):
    events = []
    ctx = RunContext(
        original=state.model,
        workdir=workdir,
        calibration=examples(),
        sequence_length=32,
        step_index=index,
        emit=events.append,
    )
    cls = get_technique(technique_id)
    return cls().run(state, cls.Params(**params), ctx), events


def metric(events, name):
    return next(e.value for e in reversed(events) if getattr(e, "name", None) == name)


def spec(batch_sizes=(1, 2)):
    from studio.pipeline import GenerationSpec

    return GenerationSpec(prompt_tokens=PROMPT, new_tokens=NEW, batch_sizes=list(batch_sizes))


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """export.onnx with_cache of tinylm and of the small GPT-2, once per module: {name: (model, state)}."""
    out = {}
    for name, source in (("tinylm", "builtin:tinylm"), ("gpt2", str(request.getfixturevalue("gpt2")))):
        model = open_checkpoint(source)
        state, events = run_step(
            initial_state(model), "export.onnx", tmp_path_factory.mktemp(name), with_cache=True
        )
        assert metric(events, "onnx_max_abs_diff") < 1e-4  # the prefill, fed a zero-length past
        assert metric(events, "onnx_decode_max_abs_diff") < 1e-4  # one step through the cache
        out[name] = (model, state)
    return out


@pytest.mark.parametrize("name", ["tinylm", "gpt2"])
def test_onnx_greedy_output_is_torchs(exported, name):
    from studio.evaluation.generation import generation_prompts, greedy_tokens

    model, state = exported[name]
    prompts = generation_prompts(model, examples(), 3, PROMPT)
    torch_tokens = greedy_tokens(model.module, "causal-lm", prompts, NEW)
    onnx_tokens = greedy_tokens(state.path, "causal-lm", prompts, NEW, "onnx")
    assert onnx_tokens.shape == (3, NEW)
    assert onnx_tokens.tolist() == torch_tokens.tolist()


def test_the_graph_records_its_cache_layout(exported):
    import onnxruntime as ort

    from studio.checkpoints.onnx_graph import read_metadata

    model, state = exported["tinylm"]
    layout = json.loads(read_metadata(state.path)["studio.kv_cache"])
    cfg = model.config
    assert (layout["layers"], layout["kv_heads"], layout["head_dim"], layout["dtype"]) == (
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,  # grouped-query attention: 2 cached heads for 6 query heads
        cfg.head_dim,
        "float32",
    )
    session = ort.InferenceSession(str(state.path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    assert list(inputs) == ["input_ids", "attention_mask", *layout["inputs"]]
    assert outputs == ["logits", *layout["outputs"]]
    assert layout["inputs"][:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert layout["outputs"][-1] == f"present.{cfg.num_hidden_layers - 1}.value"
    assert inputs["past_key_values.0.key"] == ["batch", 2, "past_sequence", 32]


def test_onnx_generation_metrics_and_kv_cache_bytes(exported):
    import onnxruntime as ort
    import torch

    from studio.evaluation.generation import generation_prompts, greedy_tokens, measure_generation

    model, state = exported["tinylm"]
    s = spec()
    out = measure_generation("onnx", state.path, model, examples(), s, policy=FAST)
    assert "unavailable" not in out
    for b in ("1", "2"):
        for stat in ("ttft_ms", "tpot_ms"):
            assert 0 < out[b][stat]["p50"] <= out[b][stat]["p95"] <= out[b][stat]["p99"]
            assert out[b][stat]["runs"] >= FAST.min_runs
        assert out[b]["decode_tokens_per_s"] == pytest.approx(int(b) * 1000.0 / out[b]["tpot_ms"]["p50"])
    # the present tensors of one forward pass over prompt + new tokens, summed here without the studio
    prompts = generation_prompts(model, examples(), 1, PROMPT)
    whole = torch.cat([prompts, greedy_tokens(model.module, "causal-lm", prompts, NEW)], dim=1).numpy()
    session = ort.InferenceSession(str(state.path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": whole, "attention_mask": np.ones_like(whole)}
    for i in session.get_inputs()[2:]:
        feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    presents = session.run(None, feeds)[1:]
    assert out["kv_cache_bytes"] == sum(a.nbytes for a in presents)
    cfg = model.config  # and torch's cache for the same context: the same bytes
    assert (
        out["kv_cache_bytes"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 24 * 4
    )
    assert out["kv_cache_bytes_per_token"] == out["kv_cache_bytes"] / (PROMPT + NEW)


def test_runners_feed_the_cache_graph_a_zero_length_past(exported):
    from studio.evaluation.runners import make_runner
    from studio.families import family_for

    model, state = exported["gpt2"]
    batch = family_for(model).batch(model, examples()[:4], 20)  # padded: the mask covers past + sequence
    ref = make_runner("torch", model)(batch)
    out = make_runner(state)(batch)
    assert out.shape == ref.shape and float((out - ref).abs().max()) < 1e-4


def test_quantize_dynamic_keeps_the_cache_working(exported, tmp_path):
    """INT8 weights, the same cache interface: the quantized graph generating with its cache gives what
    it gives recomputing the whole sequence every token, up to near ties (its cache path is right), and its cache holds
    float32 keys and values as before."""
    import torch

    from studio.evaluation.generation import generation_prompts, greedy_tokens, measure_generation
    from studio.evaluation.onnx_generation import OnnxGreedyLoop

    model, state = exported["tinylm"]
    quantized, _ = run_step(state, "onnx.quantize_dynamic", tmp_path, index=1)
    assert quantized.path.stat().st_size < state.path.stat().st_size / 2
    prompts = generation_prompts(model, examples(), 2, PROMPT)
    cached = greedy_tokens(quantized.path, "causal-lm", prompts, NEW, "onnx")
    loop = OnnxGreedyLoop(quantized.path)
    ids = prompts.clone()
    for _ in range(NEW):  # no cache: every token from a prefill of the whole sequence
        token, _ = loop.prefill(ids)
        ids = torch.cat([ids, token[:, None]], dim=1)
    # Activations are quantized per call, so a one-token step and a whole-sequence prefill round them
    # differently and a near tie may flip (seen on an AVX-512 VNNI CPU: one prompt of two split at token 3).
    # A broken cache path (positions, a stale cache) splits every prompt at the second token.
    agree = []
    for a, b in zip(cached.tolist(), ids[:, PROMPT:].tolist(), strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), NEW)
        agree.append(same / NEW)
    assert cached[:, 0].tolist() == ids[:, PROMPT].tolist() and sum(agree) / len(agree) >= 0.5, agree
    float_bytes = measure_generation("onnx", state.path, model, examples(), spec([1]), policy=FAST)
    int8_bytes = measure_generation("onnx", quantized.path, model, examples(), spec([1]), policy=FAST)
    assert int8_bytes["kv_cache_bytes"] == float_bytes["kv_cache_bytes"] > 0


# ------------------------------------------------------------------------------------------------ refusals


def test_a_graph_without_the_cache_is_refused_saying_how_to_export(tmp_path, llama):
    from studio.evaluation.generation import measure_generation
    from studio.evaluation.onnx_generation import OnnxGreedyLoop

    model = open_checkpoint(str(llama))
    state, _ = run_step(initial_state(model), "export.onnx", tmp_path)  # with_cache defaults to off
    with pytest.raises(BadInput, match="with_cache: true"):
        OnnxGreedyLoop(state.path)
    out = measure_generation("onnx", state.path, model, examples(), spec([1]), policy=FAST)
    assert (
        set(out) == {"prompt_tokens", "new_tokens", "unavailable"}
        and "with_cache: true" in out["unavailable"]
    )


def recipe_text(model, steps):
    return (
        f"version: 1\nmodel: {model}\nsteps:\n{steps}"
        "evaluate:\n  latency: false\n  generation: {prompt_tokens: 8, new_tokens: 4}\n"
    )


def test_a_recipe_asking_an_uncached_export_to_generate_exits_2(tmp_path, llama, capsys):
    from studio.cli import main
    from studio.pipeline import load_recipe, plan

    path = tmp_path / "no-cache.yaml"
    path.write_text(recipe_text(llama, "  - technique: export.onnx\n  - technique: onnx.quantize_dynamic\n"))
    with pytest.raises(BadInput, match=r"step 1 \(export.onnx\): field 'with_cache'.*with_cache: true"):
        plan(load_recipe(path), path=path)
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "with_cache: true" in capsys.readouterr().err
    path.write_text(recipe_text(llama, "  - technique: export.onnx\n    params: {with_cache: true}\n"))
    assert plan(load_recipe(path)).final_kind == "onnx"


def test_an_opened_graph_without_the_cache_is_refused_before_running(tmp_path, llama):
    from studio.pipeline import load_recipe, plan

    model = open_checkpoint(str(llama))
    state, _ = run_step(initial_state(model), "export.onnx", tmp_path)
    path = tmp_path / "graph.yaml"
    path.write_text(
        f"version: 1\nmodel: {state.path}\nevaluate:\n  generation: {{prompt_tokens: 8, new_tokens: 4}}\n"
    )
    with pytest.raises(
        BadInput, match=r"field 'evaluate.generation': this ONNX graph has no past key/values"
    ):
        plan(load_recipe(path), path=path)


def test_with_cache_on_an_encoder_is_refused(bert_classifier):
    from studio.pipeline import Step, check_steps

    model = open_checkpoint(str(bert_classifier))
    _, problems = check_steps([Step(technique="export.onnx", params={"with_cache": True})], "torch", model)
    assert problems == [
        (0, "step 1 (export.onnx): field 'with_cache': a KV-cache export is written for causal-lm models, "
            "not text-classification")
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ a run


def test_run_json_has_onnx_generation_metrics_and_match(tmp_path, llama):
    """One real run through the CLI and the worker: the small Llama exported with its cache, INT8."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {llama}\n"
        "data: {calibration_examples: 4, evaluation_examples: 6}\n"
        "steps:\n  - technique: export.onnx\n    params: {with_cache: true}\n"
        "  - technique: onnx.quantize_dynamic\n"
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
    for b in ("1", "2"):
        assert gen[b]["tpot_ms"]["p50"] <= gen[b]["tpot_ms"]["p95"] <= gen[b]["tpot_ms"]["p99"]
        assert gen[b]["decode_tokens_per_s"] > 0
    assert gen["kv_cache_bytes"] == 2 * 2 * 2 * 8 * 9 * 4  # layers, k+v, kv heads, head dim, positions
    assert 0.0 <= metrics["quality"]["generation_match"] <= 1.0 and metrics["quality"]["perplexity"] > 1.0
    assert metrics["baseline_quality"]["generation_match"] == 1.0


def test_the_generate_job_streams_an_onnx_cache_variant_as_torch_does(exported, tmp_path):
    """The Generate tab's job takes an ONNX variant exported with its cache: it decodes on ONNX Runtime,
    token by token, the same greedy text as the torch model; a graph without the cache is refused saying
    how to export one."""
    import io

    from studio.events import Done, Error, Token, from_json
    from studio.pipeline import save_state
    from studio.variants import Workspace
    from studio.worker import run_job

    model, state = exported["tinylm"]
    workspace = Workspace(tmp_path / "ws")
    rows = {}
    plain, _ = run_step(initial_state(model), "export.onnx", tmp_path / "plain")
    for name, staged_state in (("cache", state), ("plain", plain)):
        staged = tmp_path / f"staged-{name}"
        files = save_state(staged_state, staged, examples(), 32)  # as a run saves its variant
        rows[name] = workspace.commit_variant(
            staged,
            kind="onnx",
            parent=None,
            model="builtin:tinylm",
            recipe={"steps": []},
            metrics={},
            files=files,
        )["id"]

    def generate(sides):
        out = io.StringIO()
        code = run_job(
            {
                "kind": "generate",
                "workspace": str(workspace.root),
                "generate": {
                    "variants": sides,
                    "prompt": "The function returns",
                    "new_tokens": 6,
                    "context_lengths": [8],
                },
            },
            out,
        )
        return code, [from_json(line) for line in out.getvalue().splitlines()]

    code, events = generate(
        [{"label": "A", "source": "builtin:tinylm"}, {"label": "B", "row": rows["cache"]}]
    )
    assert code == 0, events[-1]
    done = events[-1]
    assert isinstance(done, Done)
    texts = {label: v["text"] for label, v in done.result["variants"].items()}
    assert texts["A"] and texts["A"] == texts["B"]
    assert [e.tokens for e in events if isinstance(e, Token) and e.variant == "B"][:2] == [1, 2]
    assert done.result["profile"]["B"][0]["kv_cache_bytes"] > 0

    code, events = generate([{"label": "B", "row": rows["plain"]}])
    assert code == 2 and isinstance(events[-1], Error)
    assert "without past key/values" in events[-1].message and "with_cache: true" in events[-1].message
