"""`model-studio bench --family causal-lm`: the studio's LLM variants against onnxruntime-genai, decoding.

Two models: `builtin:tinylm` (trained, so its held-out perplexity means something) and a synthetic
Llama made from a config with random weights, the size of a 0.5B model (Qwen2.5-0.5B's shape: hidden 896,
24 layers, 14 heads, 2 KV heads, FFN 4864; vocabulary 32000), written to a temporary folder; its speed is
what matters, since decoding speed does not depend on the weights' values. `toy` makes it tiny for tests.

Variants: the recipes in resources/recipes/bench-llm/ (torch FP32, BF16, INT8 and INT4 weight-only, GPTQ
INT4, ONNX Runtime with a KV cache, FP32 and INT4 blockwise, and INT4 blockwise of onnxruntime-genai's
builder graph through export.onnx_genai, decoded by the studio's loop or, after runtime.onnxruntime_genai, by
onnxruntime-genai's Generator), built with the same code `model-studio run` uses, and the peer:
onnxruntime-genai's own INT4 model, made by its builder and decoded by its Generator
(studio/evaluation/ortgenai_runner.py). A model the builder refuses gets a row saying why.

Timing is interleaved like the encoder bench: round after round every variant runs one complete greedy
generation per batch size in turn (rotating the order), prefill timed as TTFT and each later token as a
TPOT sample. Decode at batch 1 reads every weight once per token, so memory bandwidth (the STREAM triad of
studio/evaluation/machine_limits.py) divided by the bytes of weights read per token bounds decode
tokens/s; each row gives its share of that bound. Nothing here asserts a time: it prints numbers.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.evaluation.int4_kernel_limit import block_size_of, kernel_limit, kernel_lines
from studio.evaluation.latency import summarise
from studio.resources import resource

FAMILY = "causal-lm"
REFERENCE = "01-torch-fp32"
PEER = "ortgenai-int4"
SYNTHETIC_NAME = "synthetic-0.5b"
TOY_NAME = "synthetic-toy"

# A Qwen2.5-0.5B-like Llama (random weights): 24 layers of hidden 896, 14 query heads sharing 2 KV heads,
# SwiGLU FFN of 4864, tied embeddings; about 0.39 billion parameters at a 32000-token vocabulary.
SYNTHETIC_CONFIG: dict[str, Any] = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
TOY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 4096,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}

# Issue 18's targets for causal LMs, checked per model on the best INT4 variant of the studio's (the one
# with the highest decode tokens/s at batch 1).
# `toy` (the suite's run) leaves out the rows that only repeat another row's code path, to keep CI short:
# bf16 (the precision cast of 01; emulated, so slow, on a CPU without AVX-512 BF16), the float cache graph
# (07 is the same export plus its INT4 pass) and blocks of 128 (08's pass with another block size). GPTQ is
# left out on tinylm: its column-by-column loop takes a minute there on a busy 2-core machine (it still runs
# on the tiny synthetic model, whose layers are a tenth as wide).
TOY_REPEATS = ("02-torch-bf16", "06-onnx-cache", "09-onnx-genai-int4-b128")
TOY_SKIP = {"builtin:tinylm": (*TOY_REPEATS, "05-torch-int4-gptq"), TOY_NAME: TOY_REPEATS}

LAYOUT_OPS = ("Transpose", "Cast", "Identity", "Reshape")  # between a table and its lookup, read once

TARGETS = {"min_bandwidth_share": 0.80, "min_speedup_vs_peer": 1.2, "max_perplexity_increase": 0.03}


@dataclass
class LlmEntry:
    name: str
    recipe_path: Path | None = None
    peer: bool = False
    kind: str = ""
    precision: str = ""
    loop: Any = None
    size_bytes: int = 0
    bytes_per_token: int = 0
    kv_cache_bytes: int | None = None
    perplexity: float | None = None
    build_seconds: float = 0.0
    block_size: int | None = None  # of its MatMulNBits nodes: an INT4 ONNX graph's
    ttft: dict[int, list[float]] = field(default_factory=dict)
    tpot: dict[int, list[float]] = field(default_factory=dict)
    error: str | None = None


def recipe_files() -> list[Path]:
    return sorted(resource("recipes", "bench-llm").glob("*.yaml"))


def precision_of(recipe: Any) -> str:
    """fp32, bf16, int8 or int4: what a recipe's weights are stored as (its last weight-changing step)."""
    precision = "fp32"
    for step in recipe.steps:
        params = step.params or {}
        if step.technique == "precision.half":
            precision = (
                str(params.get("dtype", "float16")).replace("bfloat16", "bf16").replace("float16", "fp16")
            )
        elif step.technique in (
            "quantize.weight_only",
            "quantize.gptq",
            "quantize.awq",
            "onnx.quantize_blockwise",
        ):
            precision = f"int{params.get('bits', 4 if step.technique != 'onnx.quantize_blockwise' else 8)}"
        elif step.technique in ("quantize.dynamic_int8", "onnx.quantize_dynamic"):
            precision = "int8"
    return precision


# ------------------------------------------------------------------------------------------------ models


def synthetic_llama(folder: Path, config: dict[str, Any]) -> Path:
    """A random-weights Llama of `config`'s shape saved as a Hugging Face folder, with tinylm's tokenizer
    (a byte-level BPE: its ids fit any vocabulary of at least its size, so prompts are real text)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from studio.checkpoints import builtin_tinylm_path

    tiny = builtin_tinylm_path()
    ids = json.loads((tiny / "config.json").read_text())
    cfg = LlamaConfig(
        **config,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        hidden_act="silu",
    )
    torch.manual_seed(0)
    with torch.no_grad():
        module = LlamaForCausalLM(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny / name).is_file():
            shutil.copy2(tiny / name, folder / name)
    return folder


def module_bytes_per_token(module: Any) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer once (shared ones once), less the
    input embedding table unless the output layer reads it too (a token reads one row of it)."""
    seen: set[int] = set()
    total = 0
    embedding = getattr(module.get_input_embeddings(), "weight", None)
    output = module.get_output_embeddings()
    tied = embedding is not None and getattr(output, "weight", None) is embedding
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() in seen or (t is embedding and not tied):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def onnx_bytes_per_token(path: Path) -> int:
    """The same for an ONNX graph: its initializers, less a table only gathered from by the token ids
    (directly, or through a layout change such as the Transpose onnxruntime-genai's builder puts between a
    tied output layer's weight and the embedding lookup; ONNX Runtime folds it into a table when the
    session starts)."""
    import numpy as np
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def lookup_only(name: str) -> bool:
        nodes = users.get(name, [])
        return bool(nodes) and all(
            (n.op_type.startswith("Gather") and "input_ids" in n.input and n.input[0] == name)
            or (n.op_type in LAYOUT_OPS and n.input[0] == name and all(lookup_only(o) for o in n.output))
            for n in nodes
        )

    total = 0
    for init in graph.initializer:
        if lookup_only(init.name):
            continue
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        total += count * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return total


# ------------------------------------------------------------------------------------------------ building


def build_recipe(
    entry: LlmEntry, model: Any, workdir: Path, seq_len: int, threads: int, new_tokens: int
) -> None:
    """Run the recipe's steps on `model`, save the artifact (its size) and make its greedy loop."""
    from studio.evaluation.data import load_examples
    from studio.evaluation.generation import greedy_loop
    from studio.evaluation.measure import folder_weights_size
    from studio.pipeline import execute_steps, load_recipe, plan, save_state

    assert entry.recipe_path is not None
    recipe = load_recipe(entry.recipe_path)
    recipe = recipe.model_copy(
        update={"evaluate": recipe.evaluate.model_copy(update={"sequence_length": seq_len})}
    )
    entry.precision = precision_of(recipe)
    planned = plan(recipe, model)
    started = time.perf_counter()
    calibration = load_examples(recipe.data.calibration, recipe.data.calibration_examples)
    folder = workdir / entry.name
    folder.mkdir(parents=True)
    state, _ = execute_steps(planned, folder, calibration, lambda _e: None)
    artifact = folder / "artifact"
    save_state(state, artifact, calibration, seq_len)
    entry.build_seconds = time.perf_counter() - started
    entry.kind = state.kind
    entry.size_bytes = folder_weights_size(artifact)
    if state.kind == "torch":
        entry.loop = greedy_loop("torch", state.module, FAMILY)
        entry.bytes_per_token = module_bytes_per_token(state.module)
    else:
        graph = artifact / state.path.name
        entry.loop = greedy_loop(state.kind, graph, FAMILY, max_new_tokens=new_tokens)
        entry.bytes_per_token = onnx_bytes_per_token(graph)
        entry.block_size = block_size_of(graph)


def build_peer(entry: LlmEntry, hf_folder: Path, workdir: Path, threads: int, new_tokens: int) -> None:
    from studio.evaluation.ortgenai_runner import OrtGenaiLoop, build_model, weight_bytes

    entry.kind, entry.precision = "onnxruntime-genai", "int4"
    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    out = build_model(hf_folder, workdir / entry.name, precision="int4")
    entry.build_seconds = time.perf_counter() - started
    entry.size_bytes = weight_bytes(out)
    entry.bytes_per_token = onnx_bytes_per_token(out / "model.onnx")
    entry.block_size = block_size_of(out / "model.onnx")
    entry.loop = OrtGenaiLoop(out, threads=threads, max_new_tokens=new_tokens)


def held_out_ids(model: Any) -> Any:
    """tinylm's held-out text as one token stream: the docstrings of the stdlib modules its training left
    out (training.json lists them), ordinary technical prose that neither training nor any recipe's
    calibration (the builtin sentences) has seen."""
    import importlib
    import inspect

    import torch

    record = json.loads((Path(model.path) / "training.json").read_text())
    docs = [inspect.getdoc(importlib.import_module(name)) or "" for name in record["held_out_modules"]]
    ids = model.tokenizer("\n\n".join(d for d in docs if d), verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def perplexity_of(entry: LlmEntry, model: Any, ids: Any, seq_len: int, threads: int) -> float:
    """Held-out perplexity, the sliding windows of the studio's evaluation for every variant alike."""
    from studio.evaluation.measure import lm_perplexity, runner_for
    from studio.evaluation.quality import sliding_window_perplexity
    from studio.families import context_length

    if entry.peer:
        window = max(2, min(seq_len, context_length(model) or seq_len))
        return sliding_window_perplexity(entry.loop.logits, ids, window, max(1, window // 2))
    target = entry.loop.module if entry.kind == "torch" else entry.loop.path
    return lm_perplexity(runner_for(entry.kind, target, model, threads), model, ids, seq_len)


# ------------------------------------------------------------------------------------------------ timing


def time_generation(entry: LlmEntry, prompts: Any, batch: int, new_tokens: int, keep: bool) -> None:
    """One complete greedy generation: prefill timed as TTFT, every later token as a TPOT sample."""
    import torch

    loop = entry.loop
    with torch.inference_mode():
        t0 = time.perf_counter()
        token, state = loop.prefill(prompts)
        loop.sync()
        ttft = (time.perf_counter() - t0) * 1000.0
        steps = []
        for _ in range(max(new_tokens - 1, 1)):
            t0 = time.perf_counter()
            token = loop.step(token, state)
            loop.sync()
            steps.append((time.perf_counter() - t0) * 1000.0)
    if keep:
        entry.ttft.setdefault(batch, []).append(ttft)
        entry.tpot.setdefault(batch, []).extend(steps)


def kv_bytes(entry: LlmEntry, prompts: Any, new_tokens: int) -> int:
    """Bytes of the KV cache after prompt + new tokens at batch 1 (the last new token fed too)."""
    import torch

    from studio.evaluation.generation import cache_bytes
    from studio.evaluation.ortgenai_runner import OrtGenaiLoop

    with torch.inference_mode():
        _, state = entry.loop.generate(prompts, new_tokens)
    if isinstance(entry.loop, OrtGenaiLoop):
        return entry.loop.cache_bytes(state)
    return cache_bytes(state["cache"])


def bench_model(
    label: str,
    model: Any,
    hf_folder: Path,
    workdir: Path,
    *,
    batch_sizes: tuple[int, ...],
    prompt_tokens: int,
    new_tokens: int,
    rounds: int,
    threads: int,
    bandwidth_gb_s: float,
    examples: int,
    perplexity: bool,
    only: list[str] | None,
    report: Callable[[float, str], None],
    skip: tuple[str, ...] = (),
    perplexity_tokens: int | None = None,
    kernel_repeats: int = 20,
) -> dict[str, Any]:
    from studio.evaluation.data import load_examples
    from studio.evaluation.generation import generation_prompts

    seq_len = max(prompt_tokens + new_tokens, 32)
    entries = [
        LlmEntry(p.stem, p)
        for p in recipe_files()
        if (not only or any(o in p.stem for o in only)) and p.stem not in skip
    ]
    if not only or any(o in PEER for o in only):
        entries.append(LlmEntry(PEER, peer=True))
    text = load_examples("builtin:sentences", examples)
    for i, entry in enumerate(entries):
        report(i / len(entries) * 0.5, f"{label}: building {entry.name}")
        try:
            if entry.peer:
                build_peer(entry, hf_folder, workdir, threads, new_tokens)
            else:
                build_recipe(entry, model, workdir, seq_len, threads, new_tokens)
        except Exception as exc:  # one variant that cannot be built must not hide the others' numbers
            entry.error = f"{type(exc).__name__}: {exc}"
    live = [e for e in entries if e.error is None]
    prompts = {b: generation_prompts(model, text, b, prompt_tokens) for b in batch_sizes}
    for e in live:
        try:
            for b in batch_sizes:  # warm-up: first calls allocate, prepack weights and fill caches
                time_generation(e, prompts[b], b, new_tokens, keep=False)
            e.kv_cache_bytes = kv_bytes(e, prompts[min(batch_sizes)][:1], new_tokens)
        except Exception as exc:  # e.g. a runtime that cannot run this batch size
            e.error = f"{type(exc).__name__}: {exc}"
    live = [e for e in live if e.error is None]
    for r in range(rounds):
        report(0.5 + 0.4 * r / max(rounds, 1), f"{label}: timing round {r + 1}/{rounds}")
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for e in order:
            for b in batch_sizes:
                time_generation(e, prompts[b], b, new_tokens, keep=True)
    if perplexity:
        report(0.9, f"{label}: perplexity")
        ids = held_out_ids(model)[:perplexity_tokens]
        for e in live:
            try:
                e.perplexity = perplexity_of(e, model, ids, seq_len, threads)
            except Exception as exc:
                e.perplexity = None
                e.error = f"perplexity: {type(exc).__name__}: {exc}"
    rows = {e.name: entry_row(e, batch_sizes, bandwidth_gb_s) for e in entries}
    report(0.95, f"{label}: the INT4 kernel limit")
    blocks = {e.block_size for e in live if e.block_size}
    kernel = kernel_limit(model.module.config.to_dict(), blocks, threads, kernel_repeats)
    for e in live:
        block = (kernel.get("blocks") or {}).get(str(e.block_size))
        rate = (rows[e.name].get("decode_tokens_per_s") or {}).get(str(min(batch_sizes)))
        if block and rate and min(batch_sizes) == 1:
            rows[e.name]["kernel_limit_tokens_per_s"] = block["tokens_per_s"]
            rows[e.name]["kernel_share"] = rate / block["tokens_per_s"]
    return {
        "model": label,
        "int4_kernel_limit": kernel,
        "parameters": sum(int(p.numel()) for p in model.module.parameters()),
        "config": {k: getattr(model.module.config, k, None) for k in SYNTHETIC_CONFIG},
        "perplexity_measured": perplexity,
        "variants": rows,
        "targets": check_targets(rows),
    }


def entry_row(e: LlmEntry, batch_sizes: tuple[int, ...], bandwidth_gb_s: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "recipe": e.recipe_path.name if e.recipe_path else None,
        "int4_block_size": e.block_size,
        "peer": e.peer,
        "kind": e.kind,
        "precision": e.precision,
        "size_bytes": e.size_bytes,
        "weight_bytes_per_token": e.bytes_per_token,
        "build_seconds": round(e.build_seconds, 2),
        "kv_cache_bytes": e.kv_cache_bytes,
        "perplexity": e.perplexity,
    }
    if e.error:
        row["error"] = e.error
    if not e.tpot:
        return row
    limit = bandwidth_gb_s * 1e9 / e.bytes_per_token if e.bytes_per_token else None
    row["bandwidth_limit_tokens_per_s"] = limit
    row["ttft_ms"], row["tpot_ms"], row["decode_tokens_per_s"], row["bandwidth_share"] = {}, {}, {}, {}
    for b in batch_sizes:
        ttft, tpot = summarise(e.ttft[b], b), summarise(e.tpot[b], b)
        row["ttft_ms"][str(b)] = {k: v for k, v in ttft.items() if k != "throughput_per_s"}
        row["tpot_ms"][str(b)] = {k: v for k, v in tpot.items() if k != "throughput_per_s"}
        rate = b * 1000.0 / tpot["p50"] if tpot["p50"] > 0 else 0.0
        row["decode_tokens_per_s"][str(b)] = rate
        # a step of a batch reads the weights once for all its sequences: steps/s against the bound
        row["bandwidth_share"][str(b)] = rate / b / limit if limit else None
    return row


# ------------------------------------------------------------------------------------------------ targets


def check_targets(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 18's LLM targets on the studio's best INT4 variant (highest decode tokens/s at batch 1):
    each with `need`, `got` (the ratio measured) and `met`; a target that could not be measured says why."""

    def b1_rate(row: dict[str, Any]) -> float:
        return float((row.get("decode_tokens_per_s") or {}).get("1") or 0.0)

    int4 = {n: r for n, r in rows.items() if not r["peer"] and r["precision"] == "int4" and b1_rate(r) > 0}
    out: list[dict[str, Any]] = []
    if not int4:
        return [{"target": "int4", "need": "an INT4 variant timed at batch 1", "got": "none", "met": False}]
    best_name = max(int4, key=lambda n: b1_rate(int4[n]))
    best = int4[best_name]
    share = (best.get("bandwidth_share") or {}).get("1")
    out.append(
        {
            "target": "bandwidth",
            "variant": best_name,
            "need": f"decode b1 >= {TARGETS['min_bandwidth_share'] * 100:.0f}% of the bandwidth limit",
            "got": "-" if share is None else f"{share * 100:.1f}%",
            "ratio": share,
            "met": share is not None and share >= TARGETS["min_bandwidth_share"],
        }
    )
    peer = rows.get(PEER, {})
    speedup = b1_rate(best) / b1_rate(peer) if b1_rate(peer) > 0 else None
    out.append(
        {
            "target": "vs onnxruntime-genai",
            "variant": best_name,
            "need": f"decode b1 >= {TARGETS['min_speedup_vs_peer']}x onnxruntime-genai int4",
            "got": f"{speedup:.2f}x" if speedup else f"peer not timed ({peer.get('error', 'not run')[:120]})",
            "ratio": speedup,
            "met": speedup is not None and speedup >= TARGETS["min_speedup_vs_peer"],
        }
    )
    ref = rows.get(REFERENCE, {}).get("perplexity")
    ppl = best.get("perplexity")
    increase = ppl / ref - 1.0 if ppl and ref and math.isfinite(ppl) else None
    out.append(
        {
            "target": "perplexity",
            "variant": best_name,
            "need": f"perplexity within {TARGETS['max_perplexity_increase'] * 100:.0f}% of float",
            "got": "not measured (random weights)" if increase is None else f"{increase * 100:+.2f}%",
            "ratio": None if increase is None else 1.0 + increase,
            "met": increase is not None and increase <= TARGETS["max_perplexity_increase"],
        }
    )
    return out


# ------------------------------------------------------------------------------------------------ the bench


def run_llm_bench(
    *,
    toy: bool = False,
    batch_sizes: tuple[int, ...] = (1, 8),
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    rounds: int = 3,
    threads: int | None = None,
    examples: int = 32,
    only: list[str] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    from studio.checkpoints import open_checkpoint
    from studio.evaluation.machine_limits import machine_limits, toy_machine_limits
    from studio.evaluation.measure import set_threads
    from studio.variants import environment

    report = progress or (lambda _f, _m: None)
    threads = set_threads(threads)
    report(0.0, "machine limits")
    limits = toy_machine_limits(threads) if toy else machine_limits(threads)
    bandwidth = float(limits["memory_bandwidth"]["triad_gb_per_s"])
    models = []
    settings: dict[str, Any] = dict(
        batch_sizes=batch_sizes,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        rounds=rounds,
        threads=threads,
        bandwidth_gb_s=bandwidth,
        examples=examples,
        only=only,
    )
    with tempfile.TemporaryDirectory(prefix="studio-bench-llm-") as tmp:
        work = Path(tmp)
        from studio.checkpoints import builtin_tinylm_path

        plan_ = [("builtin:tinylm", builtin_tinylm_path(), True)]
        synthetic = TOY_NAME if toy else SYNTHETIC_NAME
        plan_.append((synthetic, work / synthetic, False))
        for i, (label, folder, ppl) in enumerate(plan_):

            def sub(f: float, m: str, i: int = i) -> None:
                report((i + f) / len(plan_), m)

            if not ppl:
                sub(0.0, f"{label}: writing a random-weights Llama")
                synthetic_llama(folder, TOY_CONFIG if toy else SYNTHETIC_CONFIG)
            model = open_checkpoint(str(folder) if not label.startswith("builtin:") else label)
            models.append(
                bench_model(
                    label,
                    model,
                    folder,
                    work / f"m{i}",
                    perplexity=ppl,
                    report=sub,
                    skip=TOY_SKIP.get(label, ()) if toy else (),
                    perplexity_tokens=512 if toy else None,
                    kernel_repeats=3 if toy else 20,
                    **settings,
                )
            )
    return {
        "family": FAMILY,
        "toy": toy,
        "batch_sizes": list(batch_sizes),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "threads": threads,
        "method": "interleaved rounds in one process: one greedy generation per variant and batch size in "
        "turn; TTFT = prefill + first pick, TPOT = every later step; p50s; bandwidth share = decode steps/s "
        "/ (triad bandwidth / weight bytes read per step)",
        "machine_limits": limits,
        "environment": environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "models": models,
    }


def format_table(result: dict[str, Any]) -> str:
    sizes = [str(b) for b in result["batch_sizes"]]
    bw = result["machine_limits"]["memory_bandwidth"]["triad_gb_per_s"]
    lines = [
        f"causal-lm bench: prompt {result['prompt_tokens']} + {result['new_tokens']} new tokens, "
        f"{result['threads']} threads, {result['rounds']} rounds, {result['environment']['machine']['cpu']} "
        f"({', '.join(result['machine_limits']['cpu_flags']) or 'no AVX flags'}); memory bandwidth "
        f"{bw:.1f} GB/s (STREAM triad)",
    ]
    header = (
        f"{'variant':<32} {'prec':>5} "
        + " ".join(f"{'TTFT b' + b:>9} {'TPOT b' + b:>9} {'tok/s b' + b:>10}" for b in sizes)
        + f" {'KV bytes':>10} {'MB/token':>9} {'bw share':>9} {'ppl':>8}"
    )

    def cell(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for m in result["models"]:
        lines += ["", f"{m['model']} ({m['parameters'] / 1e6:.1f}M parameters)", header]
        for name, row in m["variants"].items():
            if "tpot_ms" not in row:
                lines.append(f"{name:<32} ERROR {str(row.get('error'))[:110]}")
                continue
            lines.append(
                f"{name:<32} {row['precision']:>5} "
                + " ".join(
                    f"{cell(row['ttft_ms'][b]['p50'], '.2f'):>9} {cell(row['tpot_ms'][b]['p50'], '.2f'):>9} "
                    f"{cell(row['decode_tokens_per_s'][b], '.1f'):>10}"
                    for b in sizes
                )
                + f" {cell(row['kv_cache_bytes'], ','):>10} {row['weight_bytes_per_token'] / 1e6:>9.2f}"
                f" {cell(_pct(row['bandwidth_share'].get(sizes[0])), '.1f'):>8}%"
                f" {cell(row['perplexity'], '.2f'):>8}"
                + (f"  ({row['error'][:60]})" if row.get("error") else "")
            )
        lines += kernel_lines(m)
        for t in m["targets"]:
            mark = "MET" if t["met"] else "MISSED"
            lines.append(
                f"  target {t['target']}: {mark} (need {t['need']}; got {t['got']}, {t.get('variant', '-')})"
            )
    return "\n".join(lines)


def _pct(v: float | None) -> float | None:
    return None if v is None else v * 100.0
