"""Assisted (speculative) generation on builtin:tinylm and tiny random Llamas sharing its tokenizer: greedy
assisted output is the target's own greedy output, the acceptance rate is a share of the drafted tokens
(all of them when a model drafts for itself), a draft of another vocabulary is refused, and `model-studio
assist` works on workspace variant ids; `model-studio compare --json` of tinylm variants carries the
generation rows. Timing uses a short policy; no assertion depends on how fast anything is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from studio.errors import BadInput
from studio.evaluation.latency import TimingPolicy

FAST = TimingPolicy(warmup_runs=1, warmup_seconds=0.0, min_runs=2, min_seconds=0.0, max_runs=2)


def examples():
    from studio.evaluation.data import load_examples

    return load_examples("builtin:sentences", 8)


def opened(path):
    from studio.checkpoints import open_checkpoint

    return open_checkpoint(str(path))


def assisted(target, draft, **options):
    from studio.evaluation.assisted import measure_assisted

    settings = {"prompt_tokens": 8, "new_tokens": 10, "draft_tokens": 3, "prompts": 2, "policy": FAST}
    return measure_assisted(target, draft, examples(), **{**settings, **options})


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    """A one-layer Llama from tinylm's config at random initialisation, with tinylm's tokenizer: a draft
    of the same vocabulary that is rarely right."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from studio.checkpoints import builtin_tinylm_path

    source = builtin_tinylm_path()
    config = LlamaConfig.from_pretrained(str(source))
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 1, 32, 64
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 16
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("random-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    for item in source.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(item, folder / item.name)
    return folder


def check_result(out):
    assert out["identical"] is True  # greedy assisted decoding gives the target's own tokens
    assert 0.0 <= out["acceptance_rate"] <= 1.0
    assert out["accepted"] == out["prompts"] * out["new_tokens"] - out["rounds"]
    assert 0 <= out["accepted"] <= out["proposed"]
    for side in ("plain", "assisted"):
        assert out[side]["tokens_per_s"] > 0 and out[side]["runs"] >= FAST.min_runs
    assert out["speedup"] == pytest.approx(out["assisted"]["tokens_per_s"] / out["plain"]["tokens_per_s"])


def test_tinylm_drafting_for_itself_accepts_every_token():
    tinylm = opened("builtin:tinylm")
    out = assisted(tinylm, tinylm)
    check_result(out)
    assert out["acceptance_rate"] == 1.0
    # every round but a prompt's last proposes 3 drafts, all accepted, plus the target's own token: with
    # 10 new tokens that is rounds of 4, 4 and 2 (the last proposes only what is left: 1)
    assert (out["rounds"], out["proposed"]) == (2 * 3, 2 * (3 + 3 + 1))


def test_a_random_llama_drafts_for_itself_and_for_tinylm(random_llama):
    draft = opened(random_llama)
    itself = assisted(draft, opened(random_llama))
    check_result(itself)
    assert itself["acceptance_rate"] == 1.0
    for_tinylm = assisted(opened("builtin:tinylm"), draft)
    check_result(for_tinylm)  # a draft that is rarely right still cannot change the target's output
    assert for_tinylm["acceptance_rate"] < 1.0
    assert for_tinylm["rounds"] > itself["rounds"]  # rejected drafts cost rounds


def test_a_draft_of_another_vocabulary_is_refused(llama):
    with pytest.raises(BadInput, match="a draft must share the target's tokenizer"):
        assisted(opened("builtin:tinylm"), opened(llama))


def test_a_model_that_does_not_generate_is_refused():
    with pytest.raises(BadInput, match="causal-lm"):
        assisted(opened("builtin:tinylm"), opened("builtin:minilm"))


def test_cli_refuses_another_vocabulary_with_exit_2(llama, capsys):
    from studio.cli import main

    assert main(["assist", "builtin:tinylm", "--draft", str(llama), "--new-tokens", "4"]) == 2
    assert "share the target's tokenizer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ workspace


@pytest.fixture(scope="module")
def tinylm_run(tmp_path_factory):
    """One real run through the CLI and the worker: INT8 dynamic quantization of tinylm, with generation
    metrics of a tiny generation (prompt 8, new tokens 4)."""
    root = tmp_path_factory.mktemp("tinylm-ws")
    recipe = root / "recipe.yaml"
    recipe.write_text(
        "version: 1\nmodel: builtin:tinylm\n"
        "data: {calibration_examples: 4, evaluation_examples: 4}\n"
        "steps:\n  - technique: quantize.dynamic_int8\n"
        "evaluate:\n  latency: false\n  sequence_length: 16\n"
        "  generation: {prompt_tokens: 8, new_tokens: 4, batch_sizes: [1]}\n"
    )
    result = json.loads(cli(["run", str(recipe), "--json"], root / "ws"))
    return root / "ws", result["baseline"]["id"], result["variants"][0]["id"]


def cli(args, workspace):
    proc = subprocess.run(
        [sys.executable, "-m", "studio", *args, "--workspace", str(workspace)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_assist_verb_takes_workspace_variant_ids(tinylm_run):
    workspace, baseline, variant = tinylm_run
    args = ["assist", baseline, "--draft", variant[:10], "--prompt-tokens", "8", "--new-tokens", "6"]
    out = json.loads(cli([*args, "--prompts", "1", "--draft-tokens", "2", "--json"], workspace))
    assert (out["target"], out["draft"]) == (baseline, variant)
    assert out["identical"] is True and 0.0 <= out["acceptance_rate"] <= 1.0
    assert (out["prompts"], out["prompt_tokens"], out["new_tokens"], out["draft_tokens"]) == (1, 8, 6, 2)


def test_compare_json_rows_carry_the_generation_metrics(tinylm_run):
    workspace, baseline, variant = tinylm_run
    out = json.loads(
        cli(["compare", baseline, variant, "--json", "--no-weights", "--examples", "0"], workspace)
    )
    rows = {r["metric"]: r for r in out["metrics"]}
    for name in (
        "ttft_ms.b1.p50",
        "tpot_ms.b1.p50",
        "decode_tokens_per_s.b1",
        "kv_cache_mb",
        "kv_cache_bytes",
    ):
        assert rows[name]["a"] > 0 and rows[name]["b"] > 0, name
    cfg = opened("builtin:tinylm").config  # INT8 weights, float32 cache: k and v over 8 + 4 positions
    per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert rows["kv_cache_bytes"]["a"] == rows["kv_cache_bytes"]["b"] == per_position * 12
    assert rows["quality.generation_match"]["a"] == 1.0
    assert 0.0 <= rows["quality.generation_match"]["b"] <= 1.0
    assert rows["quality.perplexity"]["b"] > 1.0
    assert rows["decode_tokens_per_s.b1"]["better"] in ("A", "B", None)
