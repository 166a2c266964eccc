"""Measuring a model the same way every time: latency, peak memory, size on disk, quality.

The baseline (the original checkpoint) and every variant are measured on their own runtime (torch, ONNX
Runtime, TensorRT) with the same batches. Baseline metrics are cached in the workspace per model and
evaluation settings, since timing is the slow part; fidelity is always computed against baseline outputs
produced in the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from studio.checkpoints.base import LoadedModel
from studio.evaluation.data import Example, timing_examples
from studio.evaluation.latency import time_calls
from studio.evaluation.quality import (
    QualityAccumulator,
    generation_match,
    sliding_window_perplexity,
    spearman_on_pairs,
)
from studio.events import Log, Progress
from studio.families import Batch, family_for

Runner = Callable[[Batch], Any]
QUALITY_BATCH = 16


# ------------------------------------------------------------------------------------------------ runners


def runner_for(kind: str, target: Any, model: LoadedModel, threads: int | None = None) -> Runner:
    """A callable batch -> compared output, for a torch module or an ONNX / TensorRT file."""
    from studio.evaluation.runners import make_runner

    return make_runner(kind, model, artifact=target, threads=threads)


def set_threads(threads: int | None) -> int:
    import torch

    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------------------------------------ inputs


def quality_batches(model: LoadedModel, examples: Sequence[Example], seq_len: int) -> list[Batch]:
    family = family_for(model)
    return [
        family.batch(model, examples[i : i + QUALITY_BATCH], seq_len)
        for i in range(0, len(examples), QUALITY_BATCH)
    ]


# ------------------------------------------------------------------------------------------------ measuring


def measure_runtime(
    runner: Runner,
    model: LoadedModel,
    examples: Sequence[Example],
    spec: Any,
    sink: Callable[[Any], None],
    label: str,
    step: int,
    memory_of: tuple[str, Any] | None = None,
) -> dict[str, Any]:
    """Latency per batch size, throughput, and peak memory (see `peak_memory`) of one runner;
    `memory_of` is (kind, module or file) of what the runner runs."""
    family = family_for(model)
    latency: dict[str, Any] = {}
    throughput: dict[str, float] = {}
    sizes = list(spec.batch_sizes)
    memory: dict[str, Any] = {}
    for k, b in enumerate(sizes):
        batch = family.batch(model, timing_examples(examples, b, spec.sequence_length), spec.sequence_length)
        sink(Progress(step, k / len(sizes), f"{label}: timing batch {b}"))
        if memory_of is not None and b == max(sizes):
            memory = peak_memory(*memory_of, model, batch, spec.threads)
            if "error" in memory:
                sink(Log(f"{label}: {memory['error']}", level="warning", step=step))
        stats = time_calls(lambda batch=batch: runner(batch), b)
        latency[str(b)] = stats
        throughput[str(b)] = stats["throughput_per_s"]
        sink(
            Log(
                f"{label}: batch {b} p50 {stats['p50']:.2f} ms (95% CI {stats['ci95'][0]:.2f}-"
                f"{stats['ci95'][1]:.2f}, {stats['runs']} runs)",
                step=step,
            )
        )
    out: dict[str, Any] = {"latency_ms": latency, "throughput_per_s": throughput}
    if "total_mb" in memory:
        out["peak_memory_mb"] = memory["total_mb"]
        out["memory"] = memory
    return out


def peak_memory(
    kind: str, target: Any, model: LoadedModel, batch: Batch, threads: int | None
) -> dict[str, Any]:
    """Peak memory of running `target` (a saved artifact or checkpoint) at this batch, in a fresh process
    (studio/evaluation/memprobe.py explains why). An in-memory torch module is measured by its artifact."""
    import subprocess

    from studio.evaluation.memprobe import command

    size = len(next(iter(batch.inputs.values())))
    seq = int(batch.inputs["input_ids"].shape[1]) if "input_ids" in batch.inputs else 0
    job = {
        "kind": kind,
        "target": str(target),
        "batch_size": size,
        "sequence_length": seq or 128,
        "threads": threads,
    }
    try:
        proc = subprocess.run(command(), input=json.dumps(job), capture_output=True, text=True, timeout=600)
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as exc:
        return {"error": f"the memory probe failed: {exc}"}
    return out


def weights_size(model: LoadedModel) -> int:
    """Bytes on disk of a checkpoint's weights (config and tokenizer files are not counted)."""
    from studio.variants import folder_size

    path = model.path
    if path.is_file():
        return path.stat().st_size
    suffixes = (".safetensors", ".bin", ".pt", ".pt2", ".onnx", ".engine", ".data")
    return sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in suffixes
    ) or folder_size(path)


def baseline_key(model: LoadedModel, recipe: Any, threads: int) -> str:
    from studio.variants import machine_info

    files = sorted(
        p for p in ([model.path] if model.path.is_file() else model.path.rglob("*")) if p.is_file()
    )
    stamp = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    payload = {
        "model": recipe.model,
        "task": recipe.task,
        "files": stamp,
        # without a generation section the key stays what it was before the section existed
        "evaluate": recipe.evaluate.model_dump(mode="json", exclude={"generation"})
        | ({"generation": recipe.evaluate.generation.model_dump()} if recipe.evaluate.generation else {}),
        "evaluation": [recipe.data.evaluation, recipe.data.evaluation_examples],
        "threads": threads,
        "cpu": machine_info()["cpu"],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def evaluate_baseline(
    workspace: Any,
    model: LoadedModel,
    recipe: Any,
    examples: Sequence[Example],
    sink: Callable[[Any], None],
    step: int = -1,
) -> dict[str, Any]:
    """The original's metrics, measured once per model and settings and then read from the workspace."""
    threads = set_threads(recipe.evaluate.threads)
    key = baseline_key(model, recipe, threads)
    cached = workspace.cached_baseline(key)
    if cached is not None:
        sink(Log(f"baseline metrics from the workspace cache ({cached['id']})", step=step))
        return cached
    kind = "onnx" if model.format == "onnx" else "torch"
    runner = runner_for(kind, model.path if kind == "onnx" else model.module, model, threads)
    metrics: dict[str, Any] = {"size_bytes": weights_size(model), "runtime": kind, "threads": threads}
    if recipe.evaluate.latency:
        metrics.update(
            measure_runtime(
                runner,
                model,
                examples,
                recipe.evaluate,
                sink,
                "original",
                step,
                memory_of=(kind, recipe.model),  # measured from the checkpoint, in a fresh process
            )
        )
    if recipe.evaluate.generation is not None:
        target = model.path if kind == "onnx" else model.module
        metrics["generation"] = generation_metrics(
            kind, target, model, recipe, examples, sink, "original", step
        )
    return workspace.record_baseline(recipe.model, key, metrics, str(model.path))


def generation_metrics(
    kind: str,
    target: Any,
    model: LoadedModel,
    recipe: Any,
    examples: Sequence[Example],
    sink: Callable[[Any], None],
    label: str,
    step: int,
) -> dict[str, Any]:
    """TTFT, TPOT, tokens/s and KV-cache bytes (studio/evaluation/generation.py) as the recipe asks."""
    from studio.evaluation.generation import measure_generation

    sink(Progress(step, 0.9, f"{label}: timing generation"))
    return measure_generation(
        kind,
        target,
        model,
        examples,
        recipe.evaluate.generation,
        log=lambda level, message: sink(Log(f"{label}: {message}", level=level, step=step)),
    )


def lm_text_ids(model: LoadedModel, examples: Sequence[Example]) -> Any:
    """The whole evaluation text as one token stream (the examples joined by blank lines)."""
    import warnings

    with warnings.catch_warnings():  # longer than the model's context on purpose: it is windowed
        warnings.simplefilter("ignore")
        tok = model.tokenizer
        ids = tok("\n\n".join(e.text for e in examples), return_tensors="pt", verbose=False)["input_ids"]
    return ids[0]


def lm_perplexity(runner: Runner, model: LoadedModel, ids: Any, seq_len: int) -> float:
    """Sliding-window perplexity over the whole evaluation text: windows of the evaluation's sequence
    length (at most the model's context), stride half a window."""
    import torch

    from studio.families import accepted_inputs, context_length

    window = max(2, min(seq_len, context_length(model) or seq_len))
    accepted = accepted_inputs(model)

    def logits_of(chunk: Any) -> Any:
        inputs = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        return runner(Batch(inputs={k: v for k, v in inputs.items() if k in accepted}))

    return sliding_window_perplexity(logits_of, ids, window, max(1, window // 2))


def generation_quality(
    base_module: Any, var_module: Any, model: LoadedModel, examples: Sequence[Example], spec: Any
) -> float:
    """generation_match of two torch modules on the generation prompts (up to 8 of them)."""
    from studio.evaluation.generation import generation_prompts, greedy_tokens

    prompts = generation_prompts(model, examples, min(8, max(1, len(examples))), spec.prompt_tokens)
    base = greedy_tokens(base_module, model.family, prompts, spec.new_tokens)
    var = greedy_tokens(var_module, model.family, prompts, spec.new_tokens)
    return generation_match(base, var)


def evaluate_variant(
    runner: Runner,
    kind: str,
    target: Any,
    artifact: Path,
    model: LoadedModel,
    recipe: Any,
    examples: Sequence[Example],
    sink: Callable[[Any], None],
    step: int,
) -> dict[str, Any]:
    """Size, quality against the original (run in lockstep on the same batches) and latency of a variant."""
    from studio.variants import folder_size

    threads = set_threads(recipe.evaluate.threads)
    started = time.perf_counter()
    metrics: dict[str, Any] = {
        "size_bytes": folder_weights_size(artifact),
        "files_bytes": folder_size(artifact),
        "runtime": kind,
        "threads": threads,
    }
    base_kind = "onnx" if model.format == "onnx" else "torch"
    base_runner = runner_for(base_kind, model.path if base_kind == "onnx" else model.module, model, threads)
    seq = recipe.evaluate.sequence_length
    acc = QualityAccumulator(model.family, list(examples))
    batches = quality_batches(model, examples, seq)
    for i, batch in enumerate(batches):
        acc.add(batch, base_runner(batch), runner(batch))
        sink(Progress(step, 0.3 * (i + 1) / len(batches), "quality against the original"))
    base_q, var_q = acc.results()
    pairs = [e for e in examples if e.text_pair is not None and e.score is not None]
    if model.family == "feature-extraction" and pairs:
        var_q["spearman"], base_q["spearman"] = (
            pair_spearman(r, model, pairs, seq) for r in (runner, base_runner)
        )
    if model.family == "causal-lm":
        ids = lm_text_ids(model, examples)
        var_q["perplexity"] = lm_perplexity(runner, model, ids, seq)
        base_q["perplexity"] = lm_perplexity(base_runner, model, ids, seq)
    gen = recipe.evaluate.generation
    if gen is not None and kind == "torch" and base_kind == "torch" and model.family == "causal-lm":
        var_q["generation_match"] = generation_quality(model.module, runner.module, model, examples, gen)
        base_q["generation_match"] = 1.0
    metrics["quality"] = var_q
    metrics["baseline_quality"] = base_q
    metrics["disagreements"] = acc.worst()
    if recipe.evaluate.latency:
        metrics.update(
            measure_runtime(
                runner, model, examples, recipe.evaluate, sink, "variant", step, memory_of=(kind, target)
            )
        )
    if gen is not None:
        module_or_file = runner.module if kind == "torch" else target
        metrics["generation"] = generation_metrics(
            kind, module_or_file, model, recipe, examples, sink, "variant", step
        )
    metrics["evaluation_seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def pair_spearman(runner: Runner, model: LoadedModel, pairs: Sequence[Example], seq_len: int) -> float:
    import torch.nn.functional as F

    left = [Example(text=e.text) for e in pairs]
    right = [Example(text=e.text_pair or "") for e in pairs]
    sims: list[float] = []
    for a, b in zip(
        quality_batches(model, left, seq_len), quality_batches(model, right, seq_len), strict=True
    ):
        sims += F.cosine_similarity(runner(a).float(), runner(b).float(), dim=-1).tolist()
    return spearman_on_pairs([e.score for e in pairs], sims)  # type: ignore[misc]


def folder_weights_size(folder: Path) -> int:
    """Bytes of the model files in a variant folder (weights, graphs, engines; not tokenizer files)."""
    suffixes = (".safetensors", ".bin", ".pt", ".pt2", ".onnx", ".engine", ".data", ".plan")
    return sum(
        p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and (p.suffix in suffixes or p.name.endswith(".onnx.data"))
    )


def evaluate_state(
    state: Any,
    artifact: Path,
    model: LoadedModel,
    recipe: Any,
    examples: Sequence[Example],
    sink: Callable[[Any], None],
) -> dict[str, Any]:
    """Evaluate the pipeline's final state on its own runtime."""
    threads = set_threads(recipe.evaluate.threads)
    target = state.module if state.kind == "torch" else artifact / state.path.name  # the saved copy
    runner = runner_for(state.kind, target, model, threads)
    saved = artifact if state.kind == "torch" else target
    return evaluate_variant(
        runner, state.kind, saved, artifact, model, recipe, examples, sink, len(recipe.steps)
    )
