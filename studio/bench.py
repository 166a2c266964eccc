"""`model-studio bench`: a fixed set of recipes on builtin:minilm, measured side by side in one process.

The set is the recipe files in resources/recipes/bench/ (the usual recipes: torch FP32, BF16 and dynamic
INT8; ONNX FP32, optimized, optimized + INT8 per-tensor and per-channel) plus the studio's own recipes in
resources/recipes/ (the targets of the performance work). Each is built with the same code `model-studio run`
uses, then all are timed *interleaved*: round after round, every variant runs a few batches in turn
(rotating the order), so a slow phase of the machine hits all of them alike. Speedups are ratios of medians
measured in this one run. Nothing here asserts a time: it prints numbers.

Beside them, the machine's limits (studio/evaluation/machine_limits.py: STREAM triad bandwidth, FP32 and
INT8 GEMM peaks at MiniLM's shapes, CPU flags) and, per variant and batch size, the share of the GEMM peak
its linear layers reach: their multiply-adds per batch (from the model's Linear shapes) over the p50 time,
against the INT8 peak for a variant that computes in INT8 and the FP32 peak otherwise. The time includes
attention, normalisation and the runtime's overhead, so the share is a lower bound on the GEMMs' own.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.evaluation.latency import summarise
from studio.resources import resource

REFERENCE = "01-torch-fp32"
USUAL_INT8 = "06-onnx-optimized-int8"
SEARCHED = "searched-best"  # the row of the best recipe `bench --search` found on this machine
SEARCH_RECIPE = ("search", "minilm-bench.yaml")  # under resources/recipes/

# A test knob, like MODEL_STUDIO_TIMING_SCALE: tests/test_bench_search.py sets it to a tiny encoder checkpoint
# so that the bench's search (whose mixed-precision step quantizes the graph once per layer) and its builds
# take seconds; every recipe, the search's included, then runs on that model. Unset (every real run):
# builtin:minilm, the model all the bench's recipes are written for.
MODEL_ENV = "MODEL_STUDIO_BENCH_MODEL"


def bench_model() -> str:
    return os.environ.get(MODEL_ENV) or "builtin:minilm"


# Steps after which the linear layers multiply in INT8 (dynamic / static activation quantization, MatMulNBits
# at accuracy level 4, QAT); weight-only storage alone dequantizes to float and multiplies in FP32.
INT8_COMPUTE = ("quantize.dynamic_int8", "onnx.quantize_dynamic", "onnx.quantize_static", "quantize.qat")

# Issue 18's encoder targets, over every variant of the run: the studio's own (resources/recipes/*.yaml)
# against the peers (every recipe in resources/recipes/bench/).
ISSUE18 = {
    "speedup_vs_fastest_peer": 1.3,
    "speed_min_cosine": 0.995,
    "max_size_share_of_fp32": 0.15,
    "size_min_cosine": 0.99,
    "min_int8_peak_share": 0.60,
}

# Targets of the performance issue, checked for the studio's own recipes (resources/recipes/*.yaml).
TARGETS = {
    "low-latency": {"min_cosine": 0.995, "b1_speedup_vs_usual_int8": 1.6},
    "high-throughput": {"min_cosine": 0.995, "b32_speedup_vs_fp32": 5.0},
    "small": {"min_cosine": 0.99, "max_size_share_of_fp32": 0.20},
    "tiny": {"min_cosine": 0.99, "max_size_share_of_fp32": ISSUE18["max_size_share_of_fp32"]},
}


@dataclass
class Entry:
    name: str
    recipe_path: Path
    runner: Any = None
    kind: str = ""
    size_bytes: int = 0
    quality: dict[str, float] = field(default_factory=dict)
    samples: dict[int, list[float]] = field(default_factory=dict)
    build_seconds: float = 0.0
    error: str | None = None
    precision: str = "fp32"

    @property
    def peer(self) -> bool:
        """A recipe of resources/recipes/bench/ (the usual ways), not one of the studio's own."""
        return self.recipe_path.parent.name == "bench"


def compute_precision(recipe: Any) -> str:
    """int8 when the recipe's linear layers multiply in INT8, else fp32 (the peak a variant is held to)."""
    for step in recipe.steps:
        if step.technique in INT8_COMPUTE or "nncf" in step.technique or "int8" in step.technique:
            return "int8"
        if step.technique == "onnx.quantize_blockwise" and (step.params or {}).get("accuracy_level", 4) == 4:
            return "int8"
        if step.technique == "export.executorch" and (step.params or {}).get("quantize") == "int8":
            return "int8"
    return "fp32"


def linear_macs_per_token(module: Any) -> int:
    """Multiply-adds of the model's Linear layers for one token (in x out each): what its GEMMs compute."""
    import torch

    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def recipe_files(include_studio: bool = True) -> list[Path]:
    files = sorted(resource("recipes", "bench").glob("*.yaml"))
    if include_studio:
        files += sorted(p for p in resource("recipes").glob("*.yaml"))
    return files


def search_best(
    workspace: Any,
    trials: int,
    *,
    sequence_length: int,
    examples: int,
    toy: bool = False,
    recipe_path: Path | None = None,
) -> dict[str, Any]:
    """Run the bench's search (resources/recipes/search/minilm-bench.yaml) in `workspace` and say where its
    best recipe is: `search_recipe`, `trials_run`, `study`, `storage`, `best` (the trial's variant id),
    `recipe` (None, with `closest`, when no trial met the constraints), `new_trials`, `seconds`. The trials
    evaluate on as many sentences and tokens as the bench does, so the search's fidelity constraint is the
    bench's floor on the same held-out sentences. `toy` (tests) also calibrates on 16 examples only, which
    makes the mixed-precision measurement of a trial quick. A study already in the workspace is resumed."""
    from studio.pipeline import load_recipe
    from studio.search import run_search

    path = recipe_path or resource("recipes", *SEARCH_RECIPE)
    recipe = load_recipe(path)
    data: dict[str, Any] = {"evaluation_examples": examples}
    if toy:
        data["calibration_examples"] = min(recipe.data.calibration_examples, 16)
    recipe = recipe.model_copy(
        update={
            "model": bench_model(),
            "evaluate": recipe.evaluate.model_copy(update={"sequence_length": sequence_length}),
            "data": recipe.data.model_copy(update=data),
        }
    )
    found = run_search(recipe, workspace, recipe_path=path, trials=trials, log=lambda _line: None)
    out = {"search_recipe": str(path), "trials_run": len(found["trials"])}
    keys = ("study", "storage", "best", "recipe", "closest", "new_trials", "seconds")
    out.update({k: found.get(k) for k in keys})
    return out


def build(entry: Entry, workdir: Path, evaluation: list[Any], base: Any, seq_len: int, threads: int) -> None:
    """Run the recipe's steps, save the artifact (for its size), make its runner and measure its fidelity."""
    from studio.evaluation.measure import folder_weights_size, quality_batches, runner_for
    from studio.evaluation.quality import QualityAccumulator
    from studio.pipeline import execute_steps, load_recipe, plan, save_state

    recipe = load_recipe(entry.recipe_path)
    recipe = recipe.model_copy(
        update={"evaluate": recipe.evaluate.model_copy(update={"sequence_length": seq_len})}
    )
    entry.precision = compute_precision(recipe)
    planned = plan(recipe, base["model"])
    started = time.perf_counter()
    from studio.evaluation.data import load_examples

    calibration = load_examples(recipe.data.calibration, recipe.data.calibration_examples)
    folder = workdir / entry.name
    folder.mkdir()
    state, _ = execute_steps(planned, folder, calibration, lambda _e: None)
    artifact = folder / "artifact"
    save_state(state, artifact, calibration, seq_len)
    entry.build_seconds = time.perf_counter() - started
    entry.kind = state.kind
    entry.size_bytes = folder_weights_size(artifact)
    target = state.module if state.kind == "torch" else artifact / state.path.name
    entry.runner = runner_for(state.kind, target, planned.model, threads)
    acc = QualityAccumulator(planned.model.family, evaluation)
    for batch in quality_batches(planned.model, evaluation, seq_len):
        acc.add(batch, base["runner"](batch), entry.runner(batch))
    entry.quality = acc.results()[1]


def run_bench(
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    sequence_length: int = 128,
    rounds: int = 12,
    calls_per_round: dict[int, int] | None = None,
    threads: int | None = None,
    examples: int = 64,
    only: list[str] | None = None,
    extra_recipes: list[Path] | None = None,
    progress: Any = None,
    toy: bool = False,
    search_trials: int | None = None,
    workspace: Any = None,
) -> dict[str, Any]:
    """`extra_recipes`: recipe files timed beside the bench's own (a user's recipes, or the ExecuTorch ones
    with `batch_sizes=(1,)`), named `<folder>-<file>`; a row that cannot run one of the batch sizes (a
    program exported for batch 1) gets that error instead of stopping the bench.
    `toy`: the machine limits at toy sizes (for tests; the numbers are then no limits). `search_trials`:
    first run that many trials of the bench's search in `workspace` (search_best), then time its best recipe
    as the row `searched-best` beside the others."""
    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples, timing_examples
    from studio.evaluation.machine_limits import machine_limits, toy_machine_limits
    from studio.evaluation.measure import runner_for, set_threads
    from studio.families import family_for
    from studio.variants import environment

    report = progress or (lambda _f, _m: None)
    threads = set_threads(threads)
    report(0.0, "machine limits")
    limits = toy_machine_limits(threads) if toy else machine_limits(threads)
    calls_per_round = calls_per_round or {b: (8 if b == 1 else 1) for b in batch_sizes}
    model = open_checkpoint(bench_model())
    evaluation = load_examples("builtin:sentences", examples)
    base = {"model": model, "runner": runner_for("torch", model.module, model, threads)}
    files = [p for p in recipe_files() if not only or any(o in p.stem for o in only)]
    entries = [Entry(p.stem, p) for p in files]
    entries += [Entry(f"{p.parent.name}-{p.stem}", p) for p in extra_recipes or []]
    search = None
    if search_trials:
        if workspace is None:
            raise ValueError("run_bench: search_trials needs the workspace the search keeps its study in")
        report(0.0, f"searching ({search_trials} trials)")
        search = search_best(
            workspace, search_trials, sequence_length=sequence_length, examples=examples, toy=toy
        )
        searched = Entry(SEARCHED, Path(search["recipe"] or search["search_recipe"]))
        if search["recipe"] is None:
            searched.error = "the search found no trial that meets its constraints" + closest_text(search)
        entries.append(searched)
    with tempfile.TemporaryDirectory(prefix="studio-bench-") as tmp:
        for i, entry in enumerate(entries):
            if entry.error is not None:  # the search found nothing to build
                continue
            report(i / len(entries) * 0.4, f"building {entry.name}")
            try:
                build(entry, Path(tmp), evaluation, base, sequence_length, threads)
            except Exception as exc:  # one broken recipe must not hide the others' numbers
                entry.error = f"{type(exc).__name__}: {exc}"
        family = family_for(model)
        batches = {
            b: family.batch(model, timing_examples(evaluation, b, sequence_length), sequence_length)
            for b in batch_sizes
        }
        for e in entries:  # warm-up: first calls allocate, compile kernels, fill caches
            if e.error is not None:
                continue
            try:
                for b in batch_sizes:
                    for _ in range(2):
                        e.runner(batches[b])
            except Exception as exc:  # e.g. a program with a fixed batch size: its row says so
                e.error = f"{type(exc).__name__} at batch {b}: {exc}"
                continue
            e.samples = {b: [] for b in batch_sizes}
        live = [e for e in entries if e.error is None]
        for r in range(rounds):
            report(0.4 + 0.6 * r / rounds, f"timing round {r + 1}/{rounds}")
            order = live[r % len(live) :] + live[: r % len(live)] if live else []
            for e in order:
                for b in batch_sizes:
                    for _ in range(calls_per_round.get(b, 1)):
                        t0 = time.perf_counter()
                        e.runner(batches[b])
                        e.samples[b].append((time.perf_counter() - t0) * 1000.0)
    macs = linear_macs_per_token(model.module)
    result = summarise_bench(
        entries, batch_sizes, sequence_length, threads, rounds, environment(), limits=limits, linear_macs=macs
    )
    if search is not None:
        result["search"] = search
    return result


def closest_text(search: dict[str, Any]) -> str:
    closest = search.get("closest")
    if not closest:
        return ""
    return f" (closest: trial {closest['number']}, variant {closest['variant']}, off by {closest['violation']:.4g})"


def summarise_bench(
    entries: list[Entry],
    batch_sizes: tuple[int, ...],
    seq_len: int,
    threads: int,
    rounds: int,
    env: dict[str, Any],
    *,
    limits: dict[str, Any] | None = None,
    linear_macs: int = 0,
) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for e in entries:
        row: dict[str, Any] = {
            "recipe": str(e.recipe_path.name),
            "peer": e.peer,
            "precision": e.precision,
            "kind": e.kind,
            "size_bytes": e.size_bytes,
            "quality": e.quality,
            "build_seconds": round(e.build_seconds, 2),
        }
        if e.error:
            row["error"] = e.error
        else:
            row["latency_ms"] = {str(b): summarise(e.samples[b], b) for b in batch_sizes}
        rows[e.name] = row

    def p50(name: str, b: int) -> float | None:
        lat = rows.get(name, {}).get("latency_ms", {}).get(str(b))
        return lat["p50"] if lat else None

    def ratio(top: float | None, bottom: float | None) -> float | None:
        return top / bottom if top and bottom else None

    for name, row in rows.items():
        if "latency_ms" not in row:
            continue
        for ref_name, key in ((REFERENCE, "speedup_vs_fp32"), (USUAL_INT8, "speedup_vs_usual_int8")):
            row[key] = {str(b): ratio(p50(ref_name, b), p50(name, b)) for b in batch_sizes}
        row["targets"] = check_targets(name, row, rows.get(REFERENCE, {}))
        if limits:
            row["linear_gops"] = {
                str(b): 2.0 * linear_macs * seq_len * b / (p50(name, b) or float("inf")) * 1000.0 / 1e9
                for b in batch_sizes
            }
            peak = limits["gemm"]["int8_peak_gops" if row["precision"] == "int8" else "fp32_peak_gops"]
            row["gemm_peak_share"] = {b: g / peak if peak else None for b, g in row["linear_gops"].items()}
    return {
        "model": bench_model(),
        "sequence_length": seq_len,
        "batch_sizes": list(batch_sizes),
        "threads": threads,
        "rounds": rounds,
        "method": "interleaved rounds in one process; p50 of per-call times; speedups are ratios of p50s",
        "environment": env,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine_limits": limits,
        "linear_macs_per_token": linear_macs,
        "variants": rows,
        "issue18_targets": issue18_targets(rows, batch_sizes, limits),
    }


def issue18_targets(
    rows: dict[str, dict[str, Any]], batch_sizes: tuple[int, ...], limits: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Issue 18's encoder targets: the studio's best variant against the fastest peer at the smallest and
    largest batch (at cosine >= 0.995), its smallest against FP32's size (at cosine >= 0.99), and the
    fastest at the largest batch against the INT8 GEMM peak. Each: `need`, `got` (with the ratio), `met`."""
    t = ISSUE18
    timed = {n: r for n, r in rows.items() if "latency_ms" in r}
    peers = {n: r for n, r in timed.items() if r["peer"]}
    own = {n: r for n, r in timed.items() if not r["peer"]}

    def cos(r: dict[str, Any]) -> float:
        return float(r["quality"].get("fidelity_cosine", 0.0))

    def p50(r: dict[str, Any], b: int) -> float:
        return float(r["latency_ms"][str(b)]["p50"])

    out: list[dict[str, Any]] = []
    for b in dict.fromkeys((min(batch_sizes), max(batch_sizes))):
        good = {n: r for n, r in own.items() if cos(r) >= t["speed_min_cosine"]}
        need = (
            f"b{b} >= {t['speedup_vs_fastest_peer']}x the fastest peer at cosine >= {t['speed_min_cosine']}"
        )
        if not good or not peers:
            why = "no studio variant at that cosine" if peers else "no peer timed"
            out.append({"target": f"speed b{b}", "need": need, "got": why, "ratio": None, "met": False})
            continue
        mine = min(good, key=lambda n: p50(good[n], b))
        fastest = min(peers, key=lambda n: p50(peers[n], b))
        ratio = p50(peers[fastest], b) / p50(good[mine], b)
        out.append(
            {
                "target": f"speed b{b}",
                "need": need,
                "got": f"{mine} {ratio:.2f}x {fastest}",
                "ratio": ratio,
                "met": ratio >= t["speedup_vs_fastest_peer"],
            }
        )
    ref = rows.get(REFERENCE, {}).get("size_bytes")
    small = {n: r for n, r in own.items() if cos(r) >= t["size_min_cosine"] and r["size_bytes"]}
    need = f"size <= {t['max_size_share_of_fp32'] * 100:.0f}% of FP32 at cosine >= {t['size_min_cosine']}"
    if small and ref:
        name = min(small, key=lambda n: small[n]["size_bytes"])
        share = small[name]["size_bytes"] / ref
        got = f"{name} {share * 100:.1f}%"
        out.append(
            {
                "target": "size",
                "need": need,
                "got": got,
                "ratio": share,
                "met": share <= t["max_size_share_of_fp32"],
            }
        )
    else:
        out.append(
            {
                "target": "size",
                "need": need,
                "got": "FP32 or a studio variant missing",
                "ratio": None,
                "met": False,
            }
        )
    b = max(batch_sizes)
    need = f"fastest b{b} variant >= {t['min_int8_peak_share'] * 100:.0f}% of the INT8 GEMM peak"
    int8_peak = (limits or {}).get("gemm", {}).get("int8_peak_gops")
    if own and int8_peak:
        name = min(own, key=lambda n: p50(own[n], b))
        share = (
            own[name]["linear_gops"][str(b)] / int8_peak
        )  # the INT8 peak, whatever the variant computes in
        got = f"{name} {share * 100:.1f}%"
        ok = share >= t["min_int8_peak_share"]
        out.append({"target": "GEMM peak", "need": need, "got": got, "ratio": share, "met": ok})
    else:
        out.append(
            {
                "target": "GEMM peak",
                "need": need,
                "got": "machine limits not measured",
                "ratio": None,
                "met": False,
            }
        )
    return out


def check_targets(name: str, row: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Whether a studio recipe met its target in this run: `need` says the target, `got` what was measured,
    so a MISSED line tells which part fell short and by how much. The outcome depends on the machine
    (mixed precision keeps other layers float on another CPU, speed depends on its kernels), which is why it
    is reported here and asserted nowhere."""
    target_name = next((t for t in TARGETS if name.endswith(t) or name == t), None)
    if target_name is None:
        return {}
    t = TARGETS[target_name]
    cos = row["quality"].get("fidelity_cosine", 0.0)
    out: dict[str, Any] = {"target": target_name, "cosine_ok": cos >= t["min_cosine"]}
    got = [f"cosine {cos:.4f}"]
    if "b1_speedup_vs_usual_int8" in t:
        s = (row.get("speedup_vs_usual_int8") or {}).get("1")
        out["speed_ok"] = s is not None and s >= t["b1_speedup_vs_usual_int8"]
        out["need"] = (
            f"cosine >= {t['min_cosine']}, b1 >= {t['b1_speedup_vs_usual_int8']}x the usual ONNX INT8"
        )
        got.append("b1 not measured" if s is None else f"b1 {s:.2f}x")
    if "b32_speedup_vs_fp32" in t:
        s = (row.get("speedup_vs_fp32") or {}).get("32")
        out["speed_ok"] = s is not None and s >= t["b32_speedup_vs_fp32"]
        out["need"] = f"cosine >= {t['min_cosine']}, b32 >= {t['b32_speedup_vs_fp32']}x torch FP32"
        got.append("b32 not measured" if s is None else f"b32 {s:.2f}x")
    if "max_size_share_of_fp32" in t:
        share = row["size_bytes"] / ref["size_bytes"] if ref.get("size_bytes") else None
        out["size_share"] = share
        out["speed_ok"] = share is not None and share <= t["max_size_share_of_fp32"]
        out["need"] = f"cosine >= {t['min_cosine']}, size <= {t['max_size_share_of_fp32'] * 100:.0f}% of FP32"
        got.append("size share unknown (FP32 not built)" if share is None else f"size {share * 100:.1f}%")
    out["got"] = ", ".join(got)
    out["met"] = bool(out["cosine_ok"] and out.get("speed_ok"))
    return out


def target_mark(targets: dict[str, Any]) -> str:
    """`MET (need ...; got ...)` or `MISSED (...)`; empty for the usual recipes, which have no target."""
    if not targets:
        return ""
    got = f"; got {targets['got']}" if targets.get("got") else ""
    return ("MET" if targets.get("met") else "MISSED") + f" ({targets['need']}{got})"


def format_table(result: dict[str, Any]) -> str:
    sizes = sorted(result.get("batch_sizes") or (1, 32))
    shown = [str(b) for b in dict.fromkeys((sizes[0], sizes[-1]))]  # the smallest and largest batch
    lines = [
        f"{result['model']}, sequence length {result['sequence_length']}, {result['threads']} threads, "
        f"{result['environment']['machine']['cpu']}; {result['method']}",
        "",
        f"{'variant':<40} "
        + " ".join(f"{'b' + b + ' p50':>9}" for b in shown)
        + f" {'size MB':>8} {'cosine':>8} "
        + " ".join(f"{'x fp32 b' + b:>10}" for b in shown)
        + " "
        + " ".join(f"{'x int8 b' + b:>10}" for b in shown)
        + f" {'peak b' + shown[-1]:>9}"
        + "  target",
    ]
    limits = result.get("machine_limits")
    if limits:
        gemm = limits["gemm"]
        lines.insert(
            1,
            f"machine limits: memory {limits['memory_bandwidth']['triad_gb_per_s']:.1f} GB/s (STREAM triad), "
            f"GEMM peak FP32 {gemm['fp32_peak_gops']:.0f} GOPS (torch.matmul), INT8 {gemm['int8_peak_gops']:.0f} "
            f"GOPS (ORT MatMulInteger), CPU flags: {', '.join(limits['cpu_flags']) or 'none of AVX2/AVX-512/AMX'}"
            "; peak = the linear layers' share of the GEMM peak of the variant's precision",
        )

    def cell(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for name, row in result["variants"].items():
        if "error" in row:
            lines.append(f"{name:<40} ERROR {row['error'][:100]}")
            continue
        lat = row["latency_ms"]
        sp, si = row.get("speedup_vs_fp32", {}), row.get("speedup_vs_usual_int8", {})
        mark = target_mark(row.get("targets") or {})
        lines.append(
            f"{name:<40} "
            + " ".join(f"{cell(lat.get(b, {}).get('p50'), '.2f' if b == '1' else '.1f'):>9}" for b in shown)
            + f" {row['size_bytes'] / 1e6:>8.1f} {cell(row['quality'].get('fidelity_cosine'), '.4f'):>8} "
            + " ".join(f"{cell(sp.get(b), '.2f'):>10}" for b in shown)
            + " "
            + " ".join(f"{cell(si.get(b), '.2f'):>10}" for b in shown)
            + f" {cell(_percent((row.get('gemm_peak_share') or {}).get(shown[-1])), '.1f'):>8}%"
            + f"  {mark}"
        )
    if result.get("issue18_targets"):
        lines += ["", "issue 18 targets:"]
        for t in result["issue18_targets"]:
            mark = "MET" if t["met"] else "MISSED"
            lines.append(f"  {t['target']}: {mark} (need {t['need']}; got {t['got']})")
    search = result.get("search")
    if search:
        lines += [
            "",
            f"search: {search['trials_run']} trials of {search['search_recipe']} (study {search['study']})",
        ]
        if search["recipe"]:
            lines.append(f"  {SEARCHED}: trial variant {search['best']}, recipe {search['recipe']}")
        else:
            lines.append(f"  {SEARCHED}: no trial met the constraints{closest_text(search)}")
    return "\n".join(lines)


def _percent(v: float | None) -> float | None:
    return None if v is None else v * 100.0


def write_result(result: dict[str, Any], out: Path | None, workspace_root: Path) -> Path:
    path = out or workspace_root / "bench" / f"bench-{result['created'].replace(':', '')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)
    return path
