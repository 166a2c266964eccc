"""Measuring a model the same way every time: latency, peak memory, size on disk, quality.

The baseline (the original checkpoint) and every variant are measured on their own runtime (torch, ONNX
Runtime, TensorRT) with the same batches. The baseline's size and peak memory are cached in the workspace
per model and evaluation settings; its latency is not: a cached time was measured under other conditions
(another load on the machine, another thermal state), so the original is timed again in every run,
interleaved with the variant (call after call, in turns), and both numbers come from the same minutes.
Fidelity is always computed against baseline outputs produced in the same run. A median whose confidence
interval is wide is flagged, in the metrics and in the log.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from studio.checkpoints.base import LoadedModel
from studio.checkpoints.stage import stage_of
from studio.cpus import usable_cores
from studio.evaluation.data import Example, timing_examples
from studio.evaluation.latency import TimingPolicy, summarise
from studio.evaluation.quality import (
    QualityAccumulator,
    generation_match,
    sliding_window_perplexity,
    spearman_on_pairs,
    translation_quality,
)
from studio.evaluation.timing_lock import timing_window
from studio.events import Log, Progress
from studio.families import Batch, family_for

Runner = Callable[[Batch], Any]
QUALITY_BATCH = 16
PROBE_TIMEOUT_S = 600
# A 95% CI of the median wider than this share of the median is flagged: the runs varied too much (a busy
# machine, frequency scaling) for small differences to mean anything.
WIDE_CI = 0.10


# ------------------------------------------------------------------------------------------------ runners


def runner_for(kind: str, target: Any, model: LoadedModel, threads: int | None = None) -> Runner:
    """A callable batch -> compared output, for a torch module or an ONNX / TensorRT / ExecuTorch /
    OpenVINO file."""
    from studio.evaluation.runners import make_runner

    return make_runner(kind, model, artifact=target, threads=threads)


def module_of(runner: Runner) -> Any:
    """The torch module a torch runner runs: generation drives the module itself, not the runner."""
    from studio.evaluation.runners import TorchRunner

    if not isinstance(runner, TorchRunner):
        raise TypeError(f"{type(runner).__name__} runs no torch module")
    return runner.module


def set_threads(threads: int | None) -> int:
    import torch

    n = threads or usable_cores()
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


def time_interleaved(
    calls: dict[str, Callable[[], Any]], policy: TimingPolicy | None = None
) -> dict[str, list[float]]:
    """Per-call times (ms) of several callables timed in turns: after a warm-up of each, every round runs
    each once, the order rotating, until each has `min_runs` samples and the round loop has run
    `min_seconds` per callable (or `max_runs` / `max_seconds` per callable is reached). A slow phase of the
    machine then hits all of them alike."""
    policy = policy or TimingPolicy()
    labels = list(calls)
    for label in labels:  # first calls allocate, compile kernels, fill caches
        started = time.perf_counter()
        for i in range(10_000):
            calls[label]()
            if i + 1 >= policy.warmup_runs and time.perf_counter() - started >= policy.warmup_seconds:
                break
    samples: dict[str, list[float]] = {label: [] for label in labels}
    began = time.perf_counter()
    n = len(labels)
    for r in range(policy.max_runs):
        for label in labels[r % n :] + labels[: r % n]:
            t0 = time.perf_counter()
            calls[label]()
            samples[label].append((time.perf_counter() - t0) * 1000.0)
        elapsed = time.perf_counter() - began
        if elapsed >= policy.max_seconds * n:
            break
        if r + 1 >= policy.min_runs and elapsed >= policy.min_seconds * n:
            break
    return samples


def flag_wide_ci(stats: dict[str, Any]) -> dict[str, Any]:
    """Add `ci_rel_width` (the 95% CI of p50 as a share of p50) and `ci_wide` to timing statistics."""
    lo, hi = stats["ci95"]
    width = (hi - lo) / stats["p50"] if stats["p50"] > 0 else 0.0
    return {**stats, "ci_rel_width": round(width, 4), "ci_wide": width > WIDE_CI}


def measure_interleaved(
    runners: dict[str, Runner],
    model: LoadedModel,
    examples: Sequence[Example],
    spec: Any,
    sink: Callable[[Any], None],
    step: int,
) -> dict[str, dict[str, Any]]:
    """Latency and throughput per batch size of each runner (label -> runner), timed interleaved in this
    run; label -> {"latency_ms": {batch: stats}, "throughput_per_s": {batch: items/s}}."""
    family = family_for(model)
    sizes = list(spec.batch_sizes)
    out: dict[str, dict[str, Any]] = {label: {"latency_ms": {}, "throughput_per_s": {}} for label in runners}
    for k, b in enumerate(sizes):
        batch = family.batch(model, timing_examples(examples, b, spec.sequence_length), spec.sequence_length)
        sink(
            Progress(step, 0.3 + 0.6 * k / len(sizes), f"timing batch {b}: {' and '.join(runners)} in turns")
        )
        samples = time_interleaved({label: partial(r, batch) for label, r in runners.items()})
        for label, times in samples.items():
            stats = flag_wide_ci(summarise(times, b))
            out[label]["latency_ms"][str(b)] = stats
            out[label]["throughput_per_s"][str(b)] = stats["throughput_per_s"]
            sink(
                Log(
                    f"{label}: batch {b} p50 {stats['p50']:.2f} ms (95% CI {stats['ci95'][0]:.2f}-"
                    f"{stats['ci95'][1]:.2f}, {stats['runs']} runs, interleaved)",
                    step=step,
                )
            )
            if stats["ci_wide"]:
                sink(
                    Log(
                        f"{label}: batch {b}: the 95% CI of p50 spans {stats['ci_rel_width']:.0%} of it (over "
                        f"{WIDE_CI:.0%}): the runs varied, the machine was probably busy; differences smaller "
                        "than that are not measured, rerun on a quiet machine",
                        level="warning",
                        step=step,
                    )
                )
    return out


def measure_memory(
    kind: str,
    target: Any,
    model: LoadedModel,
    examples: Sequence[Example],
    spec: Any,
    sink: Any,
    label: str,
    step: int,
) -> dict[str, Any]:
    """Peak memory (see `peak_memory`) at the largest batch size, as metrics."""
    family = family_for(model)
    b = max(spec.batch_sizes)
    batch = family.batch(model, timing_examples(examples, b, spec.sequence_length), spec.sequence_length)
    memory = peak_memory(kind, target, model, batch, spec.threads)
    if "error" in memory:
        sink(Log(f"{label}: {memory['error']}", level="warning", step=step))
        return {}
    return {"peak_memory_mb": memory["total_mb"], "memory": memory} if "total_mb" in memory else {}


COMPILED_KINDS = ("executorch", "tensorrt")  # stage kinds whose artifact open_checkpoint cannot open


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
        # a compiled program is no checkpoint: the probe opens the model it came from to feed it
        "model": model.source if kind in COMPILED_KINDS else None,
        "batch_size": size,
        "sequence_length": seq or 128,
        "threads": threads,
    }
    # The probe must not outlive this process (memprobe.py says how it notices): it gets the read end of
    # a pipe whose write end only we hold, and we kill it ourselves on any way out of here.
    lifeline_r, lifeline_w = os.pipe() if os.name == "posix" else (None, None)
    job["lifeline_fd"] = lifeline_r
    proc = None
    try:
        proc = subprocess.Popen(
            command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=() if lifeline_r is None else (lifeline_r,),
        )
        if lifeline_r is not None:
            os.close(lifeline_r)
            lifeline_r = None
        stdout, _ = proc.communicate(json.dumps(job), timeout=PROBE_TIMEOUT_S)
        return json.loads(stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as exc:
        return {"error": f"the memory probe failed: {exc}"}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for fd in (lifeline_r, lifeline_w):
            if fd is not None:
                os.close(fd)


def weights_size(model: LoadedModel) -> int:
    """Bytes on disk of a checkpoint's weights (config and tokenizer files are not counted)."""
    from studio.variants import folder_size

    path = model.path
    if path.is_file():
        weights = path.with_suffix(".bin") if model.format == "openvino" else None  # an IR's other half
        return path.stat().st_size + (weights.stat().st_size if weights and weights.is_file() else 0)
    suffixes = (".safetensors", ".bin", ".pt", ".pt2", ".onnx", ".engine", ".data", ".pte")
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
    """The original's size and peak memory, measured once per model and settings and then read from the
    workspace. Its latency is timed with the variant in each run (`evaluate_variant`) and written back by
    `record_baseline_latency`."""
    threads = set_threads(recipe.evaluate.threads)
    key = baseline_key(model, recipe, threads)
    cached = workspace.cached_baseline(key)
    if cached is not None:
        sink(
            Log(
                f"baseline size and memory from the workspace cache ({cached['id']}); its latency is timed "
                "again, in turns with the variant",
                step=step,
            )
        )
        return cached
    kind = stage_of(model)
    metrics: dict[str, Any] = {"size_bytes": weights_size(model), "runtime": kind, "threads": threads}
    if recipe.evaluate.latency:  # measured from the checkpoint, in a fresh process
        metrics.update(
            measure_memory(kind, recipe.model, model, examples, recipe.evaluate, sink, "original", step)
        )
    if recipe.evaluate.generation is not None:
        target = model.path if kind == "onnx" else model.module
        metrics["generation"] = generation_metrics(
            kind, target, model, recipe, examples, sink, "original", step
        )
    return workspace.record_baseline(recipe.model, key, metrics, str(model.path))


def record_baseline_latency(
    workspace: Any, baseline: dict[str, Any], metrics: dict[str, Any]
) -> dict[str, Any]:
    """Store the original's latency timed in this run (with the variant whose `metrics` carry it as
    `baseline_latency_ms`) on the baseline record, so comparing the two compares numbers of one run."""
    timed = metrics.get("baseline_latency_ms")
    if not timed or not baseline.get("cache_key"):
        return baseline
    updated = {
        **baseline["metrics"],
        "latency_ms": timed,
        "throughput_per_s": {b: stats["throughput_per_s"] for b, stats in timed.items()},
        "latency_timed": "interleaved with the newest variant of this baseline, in its run",
    }
    return workspace.record_baseline(
        baseline["model"],
        baseline["cache_key"],
        updated,
        baseline["artifact"],
        created=baseline.get("created"),
    )


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

    from studio.evaluation.kv_quant import decode_logits, kv_spec_of
    from studio.families import accepted_inputs, context_length

    window = max(2, min(seq_len, context_length(model) or seq_len))
    accepted = accepted_inputs(model)

    kv_spec = kv_spec_of(getattr(runner, "module", None))

    def logits_of(chunk: Any) -> Any:
        if kv_spec is not None:  # a quantized KV cache: each token scored as decoding through it sees it
            return decode_logits(runner.module, chunk, kv_spec)  # type: ignore[attr-defined]
        inputs = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        return runner(Batch(inputs={k: v for k, v in inputs.items() if k in accepted}))

    return sliding_window_perplexity(logits_of, ids, window, max(1, window // 2))


def generation_quality(
    base_module: Any,
    var_module: Any,
    model: LoadedModel,
    examples: Sequence[Example],
    spec: Any,
    kind: str = "torch",
) -> float:
    """generation_match of a variant (a torch module, or an ONNX graph with a KV cache for kind "onnx")
    against the torch baseline on the generation prompts (up to 8 of them)."""
    from studio.evaluation.generation import generation_prompts, greedy_tokens

    prompts = generation_prompts(model, examples, min(8, max(1, len(examples))), spec.prompt_tokens)
    base = greedy_tokens(base_module, model.family, prompts, spec.new_tokens)
    var = greedy_tokens(var_module, model.family, prompts, spec.new_tokens, kind)
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
    base_kind = stage_of(model)
    base_runner = runner_for(base_kind, model.module if base_kind == "torch" else model.path, model, threads)
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
    from studio.evaluation.generation import onnx_generates

    # an ONNX graph generates only with its cache (export.onnx with_cache); without it, no match to report
    generates = kind == "torch" or (
        kind == "onnx" and gen is not None and onnx_generates(target, model.family)
    )
    if gen is not None and generates and base_kind == "torch" and model.family in ("causal-lm", "seq2seq"):
        var = module_of(runner) if kind == "torch" else target
        var_q["generation_match"] = generation_quality(model.module, var, model, examples, gen, kind)
        base_q["generation_match"] = 1.0
        if model.family == "seq2seq":  # BLEU / chrF of translations against the original's, references
            base_text, var_text = translation_quality(model.module, var, model, list(examples), gen, kind)
            base_q.update(base_text)
            var_q.update(var_text)
    metrics["quality"] = var_q
    metrics["baseline_quality"] = base_q
    metrics["disagreements"] = acc.worst()
    if recipe.evaluate.latency or gen is not None:
        # one run's timing at a time when the environment names a lock (timing_lock.py); the memory probe
        # is inside too, since it loads the cores another run's timing would share
        with timing_window() as window:
            if recipe.evaluate.latency:
                sink(Progress(step, 0.3, "peak memory of the variant"))
                metrics.update(
                    measure_memory(kind, target, model, examples, recipe.evaluate, sink, "variant", step)
                )
                timed = measure_interleaved(
                    {"variant": runner, "original": base_runner}, model, examples, recipe.evaluate, sink, step
                )
                metrics.update(timed["variant"])
                metrics["baseline_latency_ms"] = timed["original"]["latency_ms"]  # the same minutes, in turns
            if gen is not None:
                module_or_file = module_of(runner) if kind == "torch" else target
                metrics["generation"] = generation_metrics(
                    kind, module_or_file, model, recipe, examples, sink, "variant", step
                )
        metrics["timing_window"] = window
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
    """Bytes of the model files in a variant folder (weights, graphs, engines, an OpenVINO IR's .xml and
    .bin; not tokenizer files)."""
    suffixes = (".safetensors", ".bin", ".pt", ".pt2", ".onnx", ".engine", ".data", ".plan", ".pte", ".xml")
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
