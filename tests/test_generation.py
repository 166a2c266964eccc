"""Generation metrics (TTFT, TPOT, tokens/s, KV cache) and generation quality of causal LMs.

On builtin:tinylm and small random models from configs (GPT-2 with full-head attention, Llama with
grouped-query attention). Timing uses a short policy; no assertion depends on how fast anything is.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from studio.errors import BadInput
from studio.evaluation.latency import TimingPolicy

FAST = TimingPolicy(warmup_runs=1, warmup_seconds=0.0, min_runs=3, min_seconds=0.0, max_runs=4)


def examples():
    from studio.evaluation.data import load_examples

    return load_examples("builtin:sentences", 8)


def spec(prompt_tokens=8, new_tokens=4, batch_sizes=(1, 2)):
    from studio.pipeline import GenerationSpec

    return GenerationSpec(prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch_sizes=list(batch_sizes))


def opened(path):
    from studio.checkpoints import open_checkpoint

    return open_checkpoint(str(path))


def full_cache_bytes(module, ids):
    """The cache of one forward pass over all of `ids`, summed tensor by tensor (not through the studio)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=module.config)
    with torch.no_grad():
        module(input_ids=ids, past_key_values=cache, use_cache=True)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def recomputed_greedy(module, prompts, new_tokens):
    """Greedy decoding without any cache: the whole sequence is run again for every new token."""
    import torch

    ids = prompts.clone()
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = module(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids[:, prompts.shape[1] :]


def check_metrics(out, s):
    assert out["prompt_tokens"] == s.prompt_tokens and out["new_tokens"] == s.new_tokens
    for b in s.batch_sizes:
        m = out[str(b)]
        for name in ("ttft_ms", "tpot_ms"):
            stats = m[name]
            assert 0 < stats["p50"] <= stats["p95"] <= stats["p99"]
            assert stats["ci95"][0] <= stats["p50"] <= stats["ci95"][1]
            assert stats["runs"] >= FAST.min_runs
        assert m["decode_tokens_per_s"] == pytest.approx(b * 1000.0 / m["tpot_ms"]["p50"])
        assert m["prefill_tokens_per_s"] == pytest.approx(b * s.prompt_tokens * 1000.0 / m["ttft_ms"]["p50"])
    assert out["kv_cache_bytes_per_token"] == out["kv_cache_bytes"] / (s.prompt_tokens + s.new_tokens)
    # the CPU figure is resident-memory growth, which reused memory can leave at 0: only its presence
    # and type are certain
    assert isinstance(out["peak_memory_mb"], float)


# ------------------------------------------------------------------------------------------------ metrics


def test_tinylm_generation_metrics_and_kv_cache_bytes():
    import torch

    from studio.evaluation.generation import generation_prompts, greedy_tokens, measure_generation

    model = opened("builtin:tinylm")
    s = spec(prompt_tokens=12, new_tokens=5, batch_sizes=[1, 3])
    out = measure_generation("torch", model.module, model, examples(), s, policy=FAST)
    check_metrics(out, s)
    assert set(out) == {"prompt_tokens", "new_tokens", "1", "3", "kv_cache_bytes", "kv_cache_bytes_per_token",
                        "peak_memory_mb"}  # fmt: skip
    prompts = generation_prompts(model, examples(), 1, 12)
    tokens = greedy_tokens(model.module, "causal-lm", prompts, 5)
    whole = torch.cat([prompts, tokens], dim=1)  # the context the measured cache covers: prompt + new
    assert out["kv_cache_bytes"] == full_cache_bytes(model.module, whole)
    cfg = model.config  # and what that is by the config: GQA keeps only num_key_value_heads heads
    assert (
        out["kv_cache_bytes"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 17 * 4
    )


def test_gqa_llama_cache_is_smaller_than_full_heads_and_gpt2_is_full(llama, gpt2):
    from studio.evaluation.generation import measure_generation

    s = spec(prompt_tokens=6, new_tokens=3, batch_sizes=[1])
    per_head = {}
    for path in (llama, gpt2):
        model = opened(path)
        out = measure_generation("torch", model.module, model, examples(), s, policy=FAST)
        check_metrics(out, s)
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        full = 2 * cfg.num_hidden_layers * heads * head_dim * 9 * 4  # float32, 9 positions
        assert out["kv_cache_bytes"] == full * kv_heads // heads
        per_head[path.name] = out["kv_cache_bytes"] / full
    assert per_head == {"llama": 0.5, "gpt2": 1.0}  # the GQA model (2 of 4 heads) caches half


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_the_cache_loop_generates_what_recomputing_generates(which, request):
    from studio.evaluation.generation import generation_prompts, greedy_tokens

    model = opened(request.getfixturevalue(which))
    prompts = generation_prompts(model, examples(), 2, 7)
    assert prompts.shape == (2, 7)
    mine = greedy_tokens(model.module, "causal-lm", prompts, 6)
    assert mine.shape == (2, 6)
    assert mine.tolist() == recomputed_greedy(model.module, prompts, 6).tolist()


def test_seq2seq_encoder_once_then_decoder_steps(marian):
    """Marian: the cache loop generates what recomputing encoder and decoder generates, and the measured
    cache holds the decoder's self-attention (start token + new tokens) and the cross-attention (prompt)."""
    import torch

    from studio.evaluation.generation import generation_prompts, greedy_tokens, measure_generation

    model = opened(marian)
    prompts = generation_prompts(model, examples(), 2, 7)
    decoded = torch.zeros((2, 1), dtype=torch.long)  # decoder_start_token_id 0
    with torch.no_grad():
        for _ in range(5):
            out = model.module(input_ids=prompts, decoder_input_ids=decoded, use_cache=False)
            decoded = torch.cat([decoded, out.logits[:, -1].argmax(-1)[:, None]], dim=1)
    assert greedy_tokens(model.module, "seq2seq", prompts, 5).tolist() == decoded[:, 1:].tolist()
    s = spec(prompt_tokens=7, new_tokens=5, batch_sizes=[1])
    out = measure_generation("torch", model.module, model, examples(), s, policy=FAST)
    check_metrics(out, s)
    per_position = 2 * 2 * 4 * 8 * 4  # layers, k+v, heads, head dim, float32
    assert out["kv_cache_bytes"] == per_position * ((1 + 5) + 7)


def test_prompts_are_the_same_every_time_and_fill_the_length():
    from studio.evaluation.data import Example
    from studio.evaluation.generation import generation_prompts

    model = opened("builtin:tinylm")
    a = generation_prompts(model, examples(), 4, 20)
    assert a.tolist() == generation_prompts(model, examples(), 4, 20).tolist()
    short = generation_prompts(model, [Example(text="Hi.")], 1, 20)  # too short: the ids repeat
    assert short.shape == (1, 20) and len(set(short[0].tolist())) < 20


def test_an_onnx_graph_without_cache_says_it_is_not_measured(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from studio.evaluation.generation import measure_generation

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])],
    )
    path = tmp_path / "lm.onnx"
    onnx.save(helper.make_model(graph), path)
    logged = []
    out = measure_generation("onnx", path, None, [], spec(), log=lambda lvl, msg: logged.append((lvl, msg)))
    assert set(out) == {"prompt_tokens", "new_tokens", "unavailable"}
    assert "cache-enabled export" in out["unavailable"] and logged[0][0] == "warning"


def test_a_torch_module_without_a_cache_interface_says_it_is_not_measured(llama):
    import torch

    out = measure_generation_of(torch.nn.Linear(2, 2), opened(llama))
    assert set(out) == {"prompt_tokens", "new_tokens", "unavailable"}
    assert "past_key_values" in out["unavailable"]


def measure_generation_of(module, model):
    from studio.evaluation.generation import measure_generation

    return measure_generation("torch", module, model, examples(), spec(), policy=FAST)


# ------------------------------------------------------------------------------------------------ quality


def test_generation_match_by_hand_and_of_a_model_with_itself(llama):
    import torch

    from studio.evaluation.measure import generation_quality
    from studio.evaluation.quality import generation_match

    base = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    var = torch.tensor([[1, 2, 9, 4], [0, 6, 7, 8]])  # same later tokens do not count after a difference
    assert generation_match(base, var) == pytest.approx((2 / 4 + 0 / 4) / 2)
    assert generation_match(base, base) == 1.0
    model = opened(llama)
    assert generation_quality(model.module, model.module, model, examples(), spec(6, 5)) == 1.0


def test_sliding_window_perplexity_by_hand(llama):
    import torch
    import torch.nn.functional as F

    from studio.evaluation.quality import sliding_window_nll, sliding_window_perplexity

    module = opened(llama).module
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (10,))

    def logits_of(chunk):
        with torch.no_grad():
            return module(input_ids=chunk).logits

    # window 4, stride 2: [0, 4) scores tokens 1-3, [2, 6) tokens 4-5, [4, 8) 6-7, [6, 10) 8-9
    hand = 0.0
    for begin, first in ((0, 1), (2, 4), (4, 6), (6, 8)):
        chunk = ids[begin : begin + 4]
        logp = F.log_softmax(logits_of(chunk[None])[0].double(), dim=-1)
        for t in range(first, begin + 4):
            hand -= float(logp[t - begin - 1, ids[t]])
    total, count = sliding_window_nll(logits_of, ids, 4, 2)
    assert count == 9 and total == pytest.approx(hand, rel=1e-9)
    assert sliding_window_perplexity(logits_of, ids, 4, 2) == pytest.approx(math.exp(hand / 9))
    # one window covering everything is the model's own next-token loss on the whole sequence
    with torch.no_grad():
        loss = float(module(input_ids=ids[None], labels=ids[None]).loss)
    assert sliding_window_perplexity(logits_of, ids, 16, 8) == pytest.approx(math.exp(loss), rel=1e-5)
    # stride = window still gives every scored token context (the window steps back one token)
    assert sliding_window_nll(logits_of, ids, 4, 4)[1] == 9


# ------------------------------------------------------------------------------------------------ recipes


def recipe_text(model, generation):
    return f"version: 1\nmodel: {model}\nevaluate:\n  generation: {generation}\n"


def test_recipe_refusals_name_the_field(tmp_path, llama):
    from studio.pipeline import load_recipe, plan

    cases = {
        "builtin:minilm": ("{prompt_tokens: 8, new_tokens: 4}", "feature-extraction models do not generate"),
        "builtin:tinylm": (
            "{prompt_tokens: 500, new_tokens: 20}",
            "520 is beyond the model's context of 512",
        ),
        str(llama): ("{prompt_tokens: 100, new_tokens: 29}", "beyond the model's context of 128"),
    }
    for i, (model, (generation, problem)) in enumerate(cases.items()):
        path = tmp_path / f"r{i}.yaml"
        path.write_text(recipe_text(model, generation))
        with pytest.raises(BadInput) as err:
            plan(load_recipe(path), path=path)
        assert "evaluate.generation" in err.value.message and problem in err.value.message
        assert str(path) in err.value.message
    path = tmp_path / "zero.yaml"
    path.write_text(recipe_text("builtin:tinylm", "{prompt_tokens: 8, new_tokens: 0}"))
    with pytest.raises(BadInput, match=r"evaluate\.generation\.new_tokens"):
        load_recipe(path)
    path.write_text(recipe_text("builtin:tinylm", "{prompt_tokens: 8, new_tokens: 4, batch_sizes: []}"))
    with pytest.raises(BadInput, match=r"evaluate\.generation\.batch_sizes"):
        load_recipe(path)
    path.write_text(recipe_text(str(llama), "{prompt_tokens: 100, new_tokens: 28}"))  # exactly the context
    assert plan(load_recipe(path)).recipe.evaluate.generation.new_tokens == 28


def test_cli_refuses_generation_on_an_encoder_with_exit_2(tmp_path, capsys):
    from studio.cli import main

    path = tmp_path / "encoder.yaml"
    path.write_text(recipe_text("builtin:minilm", "{prompt_tokens: 8, new_tokens: 4}"))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "field 'evaluate.generation'" in capsys.readouterr().err


def test_shipped_recipe_is_valid():
    from studio.pipeline import load_recipe, plan
    from studio.resources import resource

    recipe = load_recipe(resource("recipes", "generation", "tinylm-generation.yaml"))
    gen = recipe.evaluate.generation
    assert (gen.prompt_tokens, gen.new_tokens, gen.batch_sizes) == (64, 32, [1, 4])
    assert plan(recipe).model.family == "causal-lm"


def test_run_json_has_generation_metrics_for_baseline_and_variant(tmp_path, llama):
    """One real run through the CLI and the worker: INT8 dynamic quantization of the small Llama."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {llama}\n"
        "data: {calibration_examples: 4, evaluation_examples: 6}\n"
        "steps:\n  - technique: quantize.dynamic_int8\n"
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
    result = json.loads(proc.stdout)
    (variant,) = result["variants"]
    for metrics in (result["baseline"]["metrics"], variant["metrics"]):
        gen = metrics["generation"]
        assert (gen["prompt_tokens"], gen["new_tokens"]) == (6, 3)
        for b in ("1", "2"):
            for name in ("ttft_ms", "tpot_ms"):
                assert gen[b][name]["p50"] <= gen[b][name]["p95"] <= gen[b][name]["p99"]
            assert gen[b]["decode_tokens_per_s"] > 0 and gen[b]["prefill_tokens_per_s"] > 0
        assert gen["kv_cache_bytes"] == 2 * 2 * 2 * 8 * 9 * 4  # layers, k+v, kv heads, head dim, positions
    quality = variant["metrics"]["quality"]
    assert 0.0 <= quality["generation_match"] <= 1.0 and quality["perplexity"] > 1.0
    assert variant["metrics"]["baseline_quality"]["generation_match"] == 1.0
    from studio.compare import metric_table
    from studio.variants import Workspace

    ws = Workspace(tmp_path / "ws")
    rows = {r["metric"]: r for r in metric_table(ws.get(result["baseline"]["id"]), ws.get(variant["id"]))}
    for name in ("ttft_ms.b1.p50", "tpot_ms.b2.p50", "decode_tokens_per_s.b1", "kv_cache_mb"):
        assert rows[name]["a"] > 0 and rows[name]["b"] > 0
    assert rows["kv_cache_mb"]["better"] is None  # INT8 weights: the float cache is the same size
    assert rows["quality.generation_match"]["a"] == 1.0


# ------------------------------------------------------------------------------------------------ options


def test_sdpa_eager_and_every_cache_generate_the_same_greedy_tokens():
    """The attention implementation and the cache change how fast tokens come, never which: the same
    greedy tokens from eager and sdpa attention, and from a dynamic, a static and no cache."""
    from studio.evaluation.generation import GreedyLoop, generation_prompts

    model = opened("builtin:tinylm")
    prompts = generation_prompts(model, examples(), 2, 8)
    own = model.module.config._attn_implementation
    seen = {}
    for attention in ("eager", "sdpa"):
        for cache in ("dynamic", "static", "none"):
            loop = GreedyLoop(model.module, "causal-lm", attention=attention, cache=cache, max_len=8 + 6)
            assert loop.attention == attention
            seen[(attention, cache)] = loop.generate(prompts, 6)[0].tolist()
            loop.restore()
            assert model.module.config._attn_implementation == own
    reference = recomputed_greedy(model.module, prompts, 6).tolist()
    assert all(tokens == reference for tokens in seen.values()), seen


def test_cache_options_are_recorded_and_no_cache_holds_no_bytes():
    from studio.evaluation.generation import measure_generation

    model = opened("builtin:tinylm")
    plain = measure_generation("torch", model.module, model, examples(), spec(8, 4, [1]), policy=FAST)
    assert "attention" not in plain and "cache" not in plain  # no option chosen: the metrics as before
    results = {}
    for attention, cache in (("eager", "none"), ("sdpa", "static"), ("sdpa", "dynamic")):
        s = spec(8, 4, [1]).model_copy(update={"attention": attention, "cache": cache})
        out = measure_generation("torch", model.module, model, examples(), s, policy=FAST)
        check_metrics(out, s)
        assert (out["attention"], out["cache"]) == (attention, cache)
        results[cache] = out["kv_cache_bytes"]
    assert results["none"] == 0
    # the static cache is allocated for exactly prompt + new tokens, which the dynamic one ends up holding
    assert results["static"] == results["dynamic"] == plain["kv_cache_bytes"] > 0


def test_recipe_options_round_trip_and_defaults_dump_as_before():
    from studio.pipeline import parse_recipe

    base = {"model": "builtin:tinylm", "evaluate": {"generation": {"prompt_tokens": 8, "new_tokens": 4}}}
    dumped = parse_recipe(base).model_dump(mode="json")["evaluate"]["generation"]
    assert dumped == {"prompt_tokens": 8, "new_tokens": 4, "batch_sizes": [1]}
    base["evaluate"]["generation"].update(attention="eager", cache="none")
    recipe = parse_recipe(base)
    assert parse_recipe(recipe.model_dump(mode="json")).evaluate.generation.cache == "none"
    assert "attention: eager" in recipe.to_yaml()
    base["evaluate"]["generation"]["cache"] = "paged"
    with pytest.raises(BadInput, match=r"evaluate\.generation\.cache"):
        parse_recipe(base)


def test_flash_attention_where_unavailable_is_refused_with_exit_2(tmp_path, capsys):
    from studio.cli import main
    from studio.evaluation.generation_options import flash_unavailable

    if flash_unavailable() is None:
        pytest.skip("FlashAttention 2 runs here; the refusal is for machines without it")
    path = tmp_path / "flash.yaml"
    path.write_text(recipe_text("builtin:tinylm", "{prompt_tokens: 8, new_tokens: 4, attention: flash}"))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "field 'evaluate.generation.attention'" in err and "flash" in err


def test_flash_attention_on_a_cpu_module_is_refused_when_measured():
    from studio.evaluation.generation import measure_generation

    model = opened("builtin:tinylm")
    s = spec(8, 4, [1]).model_copy(update={"attention": "flash"})
    out = measure_generation("torch", model.module, model, examples(), s, policy=FAST)
    assert set(out) == {"prompt_tokens", "new_tokens", "unavailable"}
    assert "flash" in out["unavailable"]


def test_a_static_cache_for_a_seq2seq_model_is_refused_naming_the_field(tmp_path, marian):
    from studio.pipeline import load_recipe, plan

    path = tmp_path / "static.yaml"
    path.write_text(recipe_text(str(marian), "{prompt_tokens: 6, new_tokens: 4, cache: static}"))
    with pytest.raises(BadInput, match=r"evaluate\.generation\.cache.*causal-lm models only"):
        plan(load_recipe(path), path=path)


def test_a_static_cache_where_the_config_cannot_give_one_is_refused():
    from studio.evaluation.generation_options import static_cache

    with pytest.raises(BadInput, match="cache 'static' is not possible"):
        static_cache(object(), 16)


# ------------------------------------------------------------------------------------------------ rows


def gen_row(vid, speed, kv, quality=None, kind="torch", parent=None, steps=(), created=0.0):
    generation = {"1": {"decode_tokens_per_s": speed, "ttft_ms": {"p50": 2.0}, "tpot_ms": {"p50": 1.0}}}
    return {
        "id": vid,
        "kind": kind,
        "parent": parent,
        "model": "builtin:tinylm",
        "created": created,
        "recipe": {"steps": list(steps)},
        "metrics": {"generation": {**generation, "kv_cache_bytes": kv}, "quality": quality or {}},
    }


def test_generation_rows_read_speed_cache_bits_and_the_pareto_front():
    from studio.variant_rows import (
        generation_pareto,
        generation_quality,
        generation_quality_key,
        kv_cache_bits,
        kv_cache_bytes,
        ttft_ms,
    )

    kv_step = {"technique": "kv_cache.quantize", "params": {"method": "quanto", "bits": 2}}
    rows = [
        gen_row("base", 100.0, 4096, kind="baseline"),
        gen_row("fast", 150.0, 1024, {"perplexity": 30.0}, parent="base", steps=[kv_step], created=2.0),
        gen_row("slow", 90.0, 4096, {"perplexity": 25.0}, parent="base", created=1.0),  # worse than base
        gen_row("best", 120.0, 2048, {"perplexity": 21.0}, parent="base", created=0.5),
    ]
    rows[1]["metrics"]["baseline_quality"] = {"perplexity": 20.0}
    rows[2]["metrics"]["baseline_quality"] = {"perplexity": 19.0}  # an older run's number of the original
    assert generation_quality_key(rows) == "perplexity"
    assert generation_quality(rows[0], rows, "perplexity") == 20.0  # the newest child's measure of it
    assert (kv_cache_bits(rows[1]), kv_cache_bits(rows[2])) == (2.0, None)
    assert kv_cache_bytes(rows[1]) == 1024 and ttft_ms(rows[1]) == 2.0
    # lower perplexity is better: "slow" (slower and worse than the original) is dominated, and "best"
    # (slower than "fast" but better) is not
    (front,) = generation_pareto(rows, "perplexity").values()
    assert [rows[i]["id"] for i in front] == ["fast", "best", "base"]
    rows[3]["metrics"]["generation"] = {"unavailable": "why"}  # unmeasured rows drop out
    assert kv_cache_bytes(rows[3]) is None
    assert [rows[i]["id"] for i in next(iter(generation_pareto(rows, "perplexity").values()))] == [
        "fast",
        "base",
    ]
