"""The `model-studio` command: thin verbs that parse, call the core, and print.

Errors a user can fix (`StudioError`) print one line to stderr and exit with their code (2 for bad input);
a traceback appears only with --debug.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from studio.errors import BadInput, StudioError

# Trust is the person's say on the command line; no file (recipe, workspace, checkpoint) can grant it.
TRUST_HELP = "allow loading a checkpoint whose file runs code (a pickled module, a .pt2 with pickled parts)"

Handler = Callable[[argparse.Namespace], int]


class Progress:
    """A one-line progress display on stderr, shown only when stderr is a terminal."""

    def __init__(self, label: str, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.perf_counter()

    def __call__(self, fraction: float, message: str = "") -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(max(0.0, min(1.0, fraction)) * width)
        bar = "#" * filled + "-" * (width - filled)
        elapsed = time.perf_counter() - self.started
        sys.stderr.write(f"\r{self.label} [{bar}] {fraction * 100:5.1f}% {elapsed:6.1f}s {message[:60]:<60}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


# ------------------------------------------------------------------------------------------------ inspect


def _fmt(v: float | None, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def cmd_inspect(args: argparse.Namespace) -> int:
    from studio.checkpoints import open_checkpoint
    from studio.inspection.stats import ModelSummary, iter_weight_stats

    model = open_checkpoint(args.path, trust=args.trust)
    if args.bins < 1:
        raise BadInput(f"--bins must be at least 1, got {args.bins}")
    summary = ModelSummary()
    layers = list(iter_weight_stats(model, bins=args.bins, summary=summary))
    heads = None
    if args.heads:
        from studio.evaluation.data import load_examples
        from studio.inspection.heads import compute_head_importance

        examples = load_examples(args.data, args.max_examples)
        bar = Progress(f"head importance ({args.heads_method})", enabled=None if not args.json else False)
        heads = compute_head_importance(
            model,
            examples,
            method=args.heads_method,
            sequence_length=args.sequence_length,
            batch_size=args.batch_size,
            progress=bar,
        )
        bar.done()

    dominant = max(summary.params_by_dtype, key=summary.params_by_dtype.get, default=None)
    info = {
        **model.summary_dict(),
        "parameters": summary.parameters,
        "dtype": dominant,
        **{k: v for k, v in summary.to_dict().items() if k != "parameters"},
        "pooling": model.pooling,
        "notes": model.notes,
    }
    if args.json:
        out: dict[str, Any] = {"model": info, "layers": [s.to_dict() for s in layers]}
        if heads is not None:
            out["heads"] = heads.to_dict()
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0

    print(f"{model.source}")
    print(f"  format        {model.format}")
    print(f"  family        {model.family}")
    print(f"  architecture  {model.architecture or '-'}")
    print(f"  parameters    {summary.parameters:,} in {summary.tensors} tensors")
    by_dtype = ", ".join(f"{k} {_human_bytes(v)}" for k, v in summary.bytes_by_dtype.items())
    print(f"  weights       {_human_bytes(summary.bytes)} ({by_dtype})")
    for note in model.notes:
        print(f"  note          {note}")
    print()
    name_w = min(64, max((len(s.name) for s in layers), default=4))
    header = f"{'tensor':<{name_w}} {'shape':<18} {'dtype':<9} {'params':>11} {'mean':>10} {'std':>9} "
    header += f"{'min':>9} {'max':>9} {'zeros':>7} {'outl.':>7}"
    print(header)
    for s in layers:
        shape = "x".join(str(d) for d in s.shape) or "scalar"
        print(
            f"{s.name[-name_w:]:<{name_w}} {shape:<18} {s.dtype:<9} {s.params:>11,} {_fmt(s.mean):>10} "
            f"{_fmt(s.std):>9} {_fmt(s.min):>9} {_fmt(s.max):>9} {s.sparsity * 100:>6.2f}% {s.outliers * 100:>6.3f}%"
        )
    print(
        f"\n{summary.tensors} tensors, {summary.parameters:,} parameters, statistics in {summary.seconds:.2f}s"
    )
    if heads is not None:
        _print_heads(heads)
    return 0


def _print_heads(heads: Any) -> None:
    print(f"\nattention-head importance: method {heads.method}")
    print(f"  objective: {heads.objective}")
    print(f"  {heads.examples} examples at sequence length {heads.sequence_length}, {heads.seconds:.1f}s")
    print("  normalised per layer (L2); higher = more important")
    print(f"  {'block':<40} " + " ".join(f"{h:>5}" for h in range(heads.heads)))
    for block, row in zip(heads.blocks, heads.importance, strict=True):
        cells = " ".join("    -" if v is None else f"{v:5.2f}" for v in row)
        print(f"  {block['name'][-40:]:<40} {cells}")
    kinds = sorted({b["kind"] for b in heads.blocks})
    print(f"  covered: {len(heads.blocks)} blocks ({', '.join(kinds)})")
    if heads.skipped_blocks:
        print(f"  not covered (cross-attention): {len(heads.skipped_blocks)} blocks")
    least = heads.ranked()[:5]
    print("  least important: " + ", ".join(f"layer {i} head {j} ({v:.2f})" for i, j, v in least))


# ------------------------------------------------------------------------------------------------ techniques


def cmd_techniques(args: argparse.Namespace) -> int:
    from studio.techniques.base import registry

    items = [cls.describe() for _, cls in sorted(registry().items())]
    if args.json:
        json.dump(items, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for t in items:
        mark = "" if t["available"] else f"  [unavailable: {t['reason']}]"
        print(f"{t['id']:<24} {t['input_kind']:>8} -> {t['output_kind']:<8} {t['title']}{mark}")
        for name, prop in t["params"].get("properties", {}).items():
            default = f" (default {prop['default']!r})" if "default" in prop else ""
            print(f"    {name:<22} {prop.get('description', '')}{default}")
    return 0


# ------------------------------------------------------------------------------------------------ run


def workspace_path(args: argparse.Namespace) -> Any:
    from studio.variants import Workspace

    return Workspace(getattr(args, "workspace", None))


class RunDisplay:
    """Prints worker events: a progress bar per step on a terminal, plain lines otherwise."""

    def __init__(self, steps: list[str], quiet: bool) -> None:
        self.steps = steps
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.current: int | None = None
        self.started = time.perf_counter()

    def label(self, step: int | None) -> str:
        if step is None or step < 0:
            return "prepare"
        if step >= len(self.steps):
            return "evaluate"
        return f"{step + 1}/{len(self.steps)} {self.steps[step]}"

    def __call__(self, event: Any) -> None:
        from studio.events import Log, Metric, Progress

        if self.quiet:
            return
        if isinstance(event, Progress):
            if self.tty:
                width = 24
                filled = int(max(0.0, min(1.0, event.fraction)) * width)
                bar = "#" * filled + "-" * (width - filled)
                if self.current is not None and self.current != event.step:
                    sys.stderr.write("\n")
                self.current = event.step
                elapsed = time.perf_counter() - self.started
                sys.stderr.write(
                    f"\r{self.label(event.step):<32} [{bar}] {event.fraction * 100:5.1f}% "
                    f"{elapsed:6.1f}s {event.message[:50]:<50}"
                )
                sys.stderr.flush()
            elif event.fraction in (0.0, 1.0) and event.message:
                print(f"[{self.label(event.step)}] {event.message}", file=sys.stderr)
        elif isinstance(event, Log) and event.level in ("warning", "error"):
            print(f"\n[{self.label(event.step)}] {event.level}: {event.message}", file=sys.stderr)
        elif isinstance(event, Metric) and event.name == "step_seconds" and not self.tty:
            pass

    def done(self) -> None:
        if self.tty and not self.quiet and self.current is not None:
            sys.stderr.write("\n")


def cmd_run(args: argparse.Namespace) -> int:
    from studio.events import Done, Error
    from studio.pipeline import load_recipe, plan
    from studio.worker import WorkerClient

    recipe = load_recipe(args.recipe)
    try:
        planned = plan(recipe, path=args.recipe, trust=args.trust and not args.dry_run)
    except BadInput as exc:
        if args.dry_run and args.trust:  # the usual "--trust" hint would mislead here
            raise BadInput(
                f"{exc.problem} (a dry run never loads code, even with --trust)", path=exc.path
            ) from exc
        raise
    from studio.recipe_check import check_recipe

    # Names of heads and layers are checked against this model before a worker starts (the run
    # failed only after loading and calibrating otherwise).
    problems = check_recipe(recipe, planned.model)
    if problems:
        raise BadInput(problems[0].message, path=args.recipe)
    steps = [p.technique.id for p in planned.steps]
    if args.dry_run:
        if args.json:
            json.dump({"valid": True, "steps": steps, "final_kind": planned.final_kind}, sys.stdout)
            sys.stdout.write("\n")
        else:
            print(
                f"{args.recipe}: valid; {len(steps)} steps ({' -> '.join(steps) or 'none'}), "
                f"result is a {planned.final_kind} model"
            )
        return 0
    ws = workspace_path(args)
    client = WorkerClient(
        recipe.model_dump(mode="json"), ws.root, recipe_path=str(args.recipe), trust=args.trust
    )
    display = RunDisplay(steps, quiet=False)
    result = None
    error = None
    try:
        for event in client.events():
            display(event)
            if isinstance(event, Done):
                result = event.result
            elif isinstance(event, Error):
                error = event
    except KeyboardInterrupt:
        client.cancel()
        display.done()
        print("model-studio: cancelled; nothing was saved", file=sys.stderr)
        return 130
    display.done()
    if error is not None:
        where = f"{display.label(error.step)}: " if error.step is not None else ""
        print(f"model-studio: error: {where}{error.message}", file=sys.stderr)
        if error.detail and (args.debug or error.kind in ("crash", "internal")):
            print(error.detail, file=sys.stderr)
        return {"bad-input": 2, "unavailable": 3, "disk-full": 4, "cancelled": 130}.get(error.kind, 1)
    assert result is not None
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_run_summary(result)
    return 0


def print_run_summary(result: dict[str, Any]) -> None:
    base = result["baseline"]
    rows = [("original", base)] + [(v["id"], v) for v in result["variants"]]
    print(f"{'variant':<26} {'kind':<9} {'size':>10} {'b1 p50':>10} {'bN p50':>10} {'quality':<40}")
    for name, row in rows:
        m = row["metrics"]
        lat = m.get("latency_ms", {})
        keys = sorted(lat, key=int)
        b1 = f"{lat[keys[0]]['p50']:.2f} ms" if keys else "-"
        bn = f"{lat[keys[-1]]['p50']:.2f} ms" if len(keys) > 1 else "-"
        q = m.get("quality", {})
        qtext = ", ".join(f"{k} {v:.4f}" for k, v in q.items() if isinstance(v, float)) or "reference"
        print(
            f"{name:<26} {row['kind']:<9} {_human_bytes(m.get('size_bytes', 0)):>10} {b1:>10} {bn:>10} {qtext:<40}"
        )
    for v in result["variants"]:
        print(f"\nsaved {v['id']}: {v['artifact']}")


# ------------------------------------------------------------------------------------------------ variants


def cmd_variants(args: argparse.Namespace) -> int:
    ws = workspace_path(args)
    if args.action == "rm":
        if not args.ids:
            raise BadInput("variants rm needs at least one variant id")
        # every id resolved before anything is removed: one bad or ambiguous id removes nothing
        chosen = list(dict.fromkeys(ws.get(vid)["id"] for vid in args.ids))
        for vid in chosen:
            row = ws.remove(vid)
            print(f"removed {row['id']}")
        return 0
    # what opening found and left alone (foreign files, damaged variants), so nothing is dropped in silence
    for note in ws.report.notes():
        print(f"model-studio: note: {note}", file=sys.stderr)
    if ws.quarantined():
        print(
            f"model-studio: note: {ws.quarantine_dir} holds {len(ws.quarantined())} damaged variant folder(s); "
            "look at them and delete them when done",
            file=sys.stderr,
        )
    rows = ws.list()
    if args.json:
        json.dump({"workspace": str(ws.root), "variants": rows}, sys.stdout, default=str)
        sys.stdout.write("\n")
        return 0
    if not rows:
        print(f"no variants yet in {ws.root} (run a recipe: model-studio run RECIPE)")
        return 0
    print(f"{'id':<32} {'kind':<9} {'size':>9} {'b1 p50':>10} {'quality':>10}  steps")
    for r in rows:
        m = r["metrics"]
        lat = m.get("latency_ms", {})
        b1 = f"{lat[min(lat, key=int)]['p50']:.2f}ms" if lat else "-"
        q = m.get("quality", {})
        qv = next((q[k] for k in ("fidelity_cosine", "top1_agreement") if k in q), None)
        steps = " -> ".join(s["technique"] for s in r["recipe"].get("steps", [])) or r["model"]
        flag = f"  [FILES MISSING: {r.get('damage') or 'gone'}]" if r.get("missing") else ""
        print(
            f"{r['id']:<32} {r['kind']:<9} {_human_bytes(m.get('size_bytes', 0)):>9} {b1:>10} "
            f"{'-' if qv is None else f'{qv:.4f}':>10}  {steps}{flag}"
        )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from studio.compare import compare

    ws = workspace_path(args)
    result = compare(ws, args.a, args.b, weights=not args.no_weights, examples=args.examples, data=args.data)
    if args.json:
        json.dump(result, sys.stdout, default=str)
        sys.stdout.write("\n")
        return 0
    a, b = result["a"], result["b"]
    print(f"A = {a['id']} ({a['kind']})\nB = {b['id']} ({b['kind']})\n")
    print(f"{'metric':<34} {'A':>12} {'B':>12} {'B/A':>8}  better")
    for row in result["metrics"]:
        ratio = "-" if row["ratio_b_over_a"] is None else f"{row['ratio_b_over_a']:.3f}"
        print(
            f"{row['metric']:<34} {_fmt(row['a']):>12} {_fmt(row['b']):>12} {ratio:>8}  {row['better'] or ''}"
        )
    for batch, sig in result["latency_significance"].items():
        verdict = "significant" if sig["significant"] else "not significant"
        p = f", permutation p={sig['permutation_p']:.4f}" if "permutation_p" in sig else ""
        print(
            f"\nlatency at batch {batch}: B is {sig['speedup_b_over_a']:.2f}x A's speed, {verdict} ({sig['method']}{p})"
        )
    weights = result.get("weights")
    if weights:
        print(
            f"\nweights: {weights['matched']} tensors matched by name, {len(weights['only_a'])} only in A, "
            f"{len(weights['only_b'])} only in B"
        )
        for layer in weights["layers"][:12]:
            if layer["change"] == "shape":
                print(f"  {layer['name']:<56} shape {layer['shape_a']} -> {layer['shape_b']}")
            elif layer["change"] == "values":
                print(
                    f"  {layer['name']:<56} rel. L2 {layer['relative_l2']:.4f}  max {layer['max_abs']:.3g}  "
                    f"zeros {layer['sparsity_a'] * 100:.1f}% -> {layer['sparsity_b'] * 100:.1f}%"
                )
    if result.get("disagreements"):
        print("\nexamples where A and B disagree most (lowest score first):")
        for d in result["disagreements"]:
            print(f"  {d['score']:.4f}  {d['text'][:90]}  {d['detail']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from studio.export import export_variant

    out = export_variant(workspace_path(args), args.variant, args.format, args.out)
    if args.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"exported {out['id']} as {out['format']} to {out['out']} ({len(out['files'])} files)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from studio.report import write_report

    ws = workspace_path(args)
    rows = [ws.get(v) for v in args.ids] if args.ids else ws.list()
    if not rows:
        raise BadInput(f"no variants to report in {ws.root}")
    path = write_report(rows, args.out)
    print(f"wrote {path} ({len(rows)} variants)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from studio.bench import format_table, run_bench, write_result

    bar = Progress("bench")
    result = run_bench(
        batch_sizes=tuple(args.batch_sizes),
        sequence_length=args.sequence_length,
        rounds=args.rounds,
        threads=args.threads,
        examples=args.examples,
        only=args.only,
        progress=bar,
    )
    bar.done()
    path = write_result(result, Path(args.out) if args.out else None, workspace_path(args).root)
    if args.json:
        json.dump(result, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
        print(f"\nresults: {path}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples
    from studio.evaluation.measure import set_threads
    from studio.sensitivity import choose_exclusions_from_report, layer_sensitivity

    if args.target is not None and not 0 < args.target < 1:
        raise BadInput(f"--target must be a fidelity between 0 and 1, got {args.target}")
    if args.max_examples < 1:
        raise BadInput(f"--max-examples must be at least 1, got {args.max_examples}")
    model = open_checkpoint(args.model, trust=args.trust)
    examples = load_examples(args.data, args.max_examples)
    set_threads(args.threads)
    bar = Progress(f"sensitivity ({args.scheme})", enabled=None if not args.json else False)
    report = layer_sensitivity(
        model,
        args.scheme,
        examples,
        args.sequence_length,
        args.mode,
        bar,
        per_channel=not args.per_tensor,
        group_size=args.group_size,
    )
    bar.done()
    out = report.to_dict()
    if args.target is not None:
        out["mixed_precision"] = choose_exclusions_from_report(report, args.target)
    if args.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0
    block, param = report.exclusion_block()
    print(f"{report.model}: per-layer sensitivity to {out['scheme_title']}")
    print(
        f"  objective: {report.objective}, {report.examples} examples at sequence length {report.sequence_length}"
    )
    print(f"  settings: {json.dumps(report.settings)}; {report.seconds:.1f}s")
    print(
        f"  fidelity with every layer quantized: {report.fidelity_all:.5f} (float: {report.fidelity_none:.5f})"
    )
    print("  loss = fidelity lost when only this layer is quantized; recovered = fidelity won back when only")
    print("  this layer stays float. Most sensitive first.")
    name_w = min(60, max((len(r.layer) for r in report.layers), default=5))
    print(f"\n  {'#':>3} {'layer':<{name_w}} {'kind':<10} {'params':>10} {'loss':>9} {'recovered':>10}")
    for i, r in enumerate(report.ranked(), 1):
        print(
            f"  {i:>3} {r.layer[-name_w:]:<{name_w}} {r.kind:<10} {r.parameters:>10,} "
            f"{_fmt(r.fidelity_loss, '.5f'):>9} {_fmt(r.recovered, '.5f'):>10}"
        )
    if args.target is not None:
        mp = out["mixed_precision"]
        print(
            f"\n  for fidelity >= {args.target}: keep {len(mp['excluded'])} layer(s) float "
            f"(estimated {mp['estimated_fidelity']:.5f} from the measurements above"
            f"{'' if mp['met'] else '; the target is not reached even then'})"
        )
        print(f"  {block} params: {json.dumps({param: mp['excluded']})}")
        print(
            f"  (or let the block choose by itself and measure: {json.dumps({'mixed_precision': args.target})})"
        )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from studio.pipeline import load_recipe
    from studio.search import run_search
    from studio.search_space import validate_search

    if args.ray:
        raise BadInput(
            f"--ray {args.ray}: running trials on a Ray cluster is not yet supported; run without --ray"
        )
    recipe = load_recipe(args.recipe)
    validate_search(recipe, args.recipe)  # before the workspace is touched
    try:
        result = run_search(
            recipe, workspace_path(args), recipe_path=args.recipe, trials=args.trials, trust=args.trust
        )
    except KeyboardInterrupt:
        print(
            "model-studio: search stopped; the finished trials are kept (run the same command to resume)",
            file=sys.stderr,
        )
        return 130
    if args.json:
        json.dump(result, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print_search_summary(result)
    if result["best"] is None:
        print("model-studio: no trial met the constraints", file=sys.stderr)
        return 1
    return 0


def print_search_summary(result: dict[str, Any]) -> None:
    front = set(result["pareto"])
    print(f"search {result['study']}: {len(result['trials'])} trials ({result['new_trials']} new)")
    for t in result["trials"]:
        mark = "*" if t["variant"] in front else " "
        values = ", ".join(f"{k} {v:.4g}" for k, v in t["values"].items())
        status = (
            values + ("" if t["feasible"] else "  (infeasible)") if t["state"] == "COMPLETE" else t["error"]
        )
        print(f" {mark} {t['number']:>4} {t['variant'] or '-':<24} {status}")
    if result["best"] is not None:
        print(f"\n* Pareto front; best: {result['best']}\nits recipe: {result['recipe']}")
    elif result.get("closest"):
        c = result["closest"]
        print(f"\nno trial met the constraints; closest: trial {c['number']} ({c['variant']}), ", end="")
        print(f"off by {c['violation']:.4g}")


def cmd_screenshots(args: argparse.Namespace) -> int:
    from studio.gui_entry import screenshots

    for path in screenshots(args):
        print(path)
    return 0


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-studio",
        description="Open a model checkpoint, look inside, build and run optimization pipelines, compare variants. "
        "Without a verb, opens the desktop app.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument(
        "--open", metavar="PATH", help="the app: open this checkpoint instead of builtin:minilm"
    )
    parser.add_argument(
        "--workspace", help="the app: workspace folder (default: $MODEL_STUDIO_HOME or the user data dir)"
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("inspect", help="weight statistics and attention-head importance of a checkpoint")
    p.add_argument(
        "path", help="builtin:minilm, a Hugging Face folder, .safetensors, .pt/.pth/.bin, .pt2 or .onnx"
    )
    p.add_argument("--json", action="store_true", help="print the documented JSON instead of tables")
    p.add_argument("--trust", action="store_true", help=TRUST_HELP)
    p.add_argument("--bins", type=int, default=128, help="histogram bins per tensor (default 128)")
    p.add_argument("--heads", action="store_true", help="also compute attention-head importance")
    p.add_argument("--heads-method", choices=("gradient", "ablation"), default="gradient")
    p.add_argument(
        "--data", default="builtin:sentences", help="examples: builtin:sentences or .txt/.jsonl/.csv"
    )
    p.add_argument(
        "--max-examples", type=int, default=64, help="examples used for head importance (default 64)"
    )
    p.add_argument("--sequence-length", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per batch (default 16)")
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("techniques", help="list the technique blocks and their parameters")
    p.add_argument("--json", action="store_true", help="print the documented JSON")
    p.set_defaults(handler=cmd_techniques)

    p = sub.add_parser("run", help="run a recipe (YAML pipeline) in a worker process and save the variant")
    p.add_argument("recipe", help="the recipe file")
    p.add_argument("--json", action="store_true", help="print the result JSON")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe only (never loads code)")
    p.add_argument("--trust", action="store_true", help=TRUST_HELP + "; a recipe's own trust: is ignored")
    p.add_argument("--workspace", help="workspace folder (default: $MODEL_STUDIO_HOME or the user data dir)")
    p.set_defaults(handler=cmd_run)

    ws_help = "workspace folder (default: $MODEL_STUDIO_HOME or the user data dir)"
    p = sub.add_parser("variants", help="list the variants of the workspace, or remove some (variants rm ID)")
    p.add_argument("action", nargs="?", choices=("list", "rm"), default="list")
    p.add_argument("ids", nargs="*", help="variant ids (for rm); a unique prefix is enough")
    p.add_argument("--json", action="store_true")
    p.add_argument("--workspace", help=ws_help)
    p.set_defaults(handler=cmd_variants)

    p = sub.add_parser("compare", help="compare two variants: metrics, significance, weights, examples")
    p.add_argument("a", help="variant id (or baseline id)")
    p.add_argument("b", help="variant id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-weights", action="store_true", help="skip per-layer weight differences")
    p.add_argument("--examples", type=int, default=32, help="examples run to find disagreements (0: skip)")
    p.add_argument("--data", help="examples to compare on (default: the recipe's evaluation data)")
    p.add_argument("--workspace", help=ws_help)
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser(
        "export", help="copy a variant out of the workspace as ONNX, TensorRT or a transformers folder"
    )
    p.add_argument("variant")
    p.add_argument("--format", required=True, choices=("onnx", "tensorrt", "hf"))
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument("--json", action="store_true")
    p.add_argument("--workspace", help=ws_help)
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("report", help="write a self-contained HTML report of variants")
    p.add_argument("ids", nargs="*", help="variant ids (default: all)")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--workspace", help=ws_help)
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser(
        "bench", help="time the usual recipes and the studio's own on builtin:minilm, side by side"
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds (default 12)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--examples", type=int, default=64, help="sentences for fidelity (default 64)")
    p.add_argument("--only", nargs="+", help="recipe name fragments to include (default: all)")
    p.add_argument("--out", help="JSON results file (default: <workspace>/bench/bench-<time>.json)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--workspace", help=ws_help)
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser(
        "sensitivity", help="per-layer quantization sensitivity: which layers lose fidelity when quantized"
    )
    p.add_argument("model", help="builtin:minilm, a Hugging Face folder or an .onnx file")
    p.add_argument(
        "--scheme",
        choices=("onnx-int8", "torch-int8", "int4"),
        default="onnx-int8",
        help="onnx-int8: onnx.quantize_dynamic of the fused graph; torch-int8: quantize.dynamic_int8; "
        "int4: quantize.weight_only with 4 bits (default onnx-int8)",
    )
    p.add_argument(
        "--mode",
        choices=("one", "all-but-one", "both"),
        default="both",
        help="quantize one layer at a time, all but one, or both (default both)",
    )
    p.add_argument("--per-tensor", action="store_true", help="int8 schemes: one weight scale per layer")
    p.add_argument("--group-size", type=int, help="int4: input columns per scale (default 128)")
    p.add_argument(
        "--target", type=float, help="also list the layers to keep float to reach this fidelity (e.g. 0.995)"
    )
    p.add_argument(
        "--data", default="builtin:sentences", help="examples: builtin:sentences or .txt/.jsonl/.csv"
    )
    p.add_argument("--max-examples", type=int, default=32, help="examples measured on (default 32)")
    p.add_argument("--sequence-length", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust", action="store_true", help=TRUST_HELP)
    p.set_defaults(handler=cmd_sensitivity)

    p = sub.add_parser(
        "search", help="search a recipe's `search:` space for the best variants on this machine (Optuna)"
    )
    p.add_argument("recipe", help="a recipe file with a search: section")
    p.add_argument("--trials", type=int, help="trials in the study (default: the recipe's search.trials)")
    p.add_argument("--json", action="store_true", help="print the result JSON")
    p.add_argument("--trust", action="store_true", help=TRUST_HELP + "; a recipe's own trust: is ignored")
    p.add_argument("--ray", metavar="ADDRESS", help="run the trials on a Ray cluster (not yet supported)")
    p.add_argument("--workspace", help=ws_help)
    p.set_defaults(handler=cmd_search)

    p = sub.add_parser("screenshots", help="render each main view offscreen to PNG files")
    p.add_argument("dir", help="output folder")
    p.add_argument("--workspace", help=ws_help)
    p.set_defaults(handler=cmd_screenshots)
    return parser


def open_path_argument(raw: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`model-studio PATH` opens the app on PATH (what a file manager runs for the .desktop entry's `%f`):
    a first argument that is no verb but an existing file or folder, or a builtin model, means `--open PATH`."""
    verbs = {v for a in parser._actions if isinstance(a, argparse._SubParsersAction) for v in a.choices}
    first = raw[0] if raw else ""
    is_path = first.startswith("builtin:") or (bool(first) and Path(first).expanduser().exists())
    if is_path and first not in verbs and not first.startswith("-"):
        return ["--open", first, *raw[1:]]
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["__worker__"]:  # the frozen bundle's worker (studio.worker.worker_command)
        from studio.worker import main as worker_main

        return worker_main()
    if raw[:1] == ["__memprobe__"]:  # the frozen bundle's memory probe (studio.evaluation.memprobe)
        from studio.evaluation.memprobe import main as memprobe_main

        return memprobe_main()
    parser = build_parser()
    args = parser.parse_args(open_path_argument(raw, parser))
    handler: Handler | None = getattr(args, "handler", None)
    # The built-in techniques register how their structure records are replayed, which reopening a saved
    # variant folder needs (studio.checkpoints.variant_folder) whatever the verb.
    import studio.techniques  # noqa: F401

    try:
        if handler is None:
            from studio.gui_entry import launch

            return launch(args)
        return handler(args)
    except StudioError as exc:
        if args.debug:
            raise
        print(f"model-studio: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("model-studio: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        from studio.errors import disk_full_error

        full = disk_full_error(exc, "output files")
        if full is None or args.debug:
            raise
        print(f"model-studio: error: {full.message}", file=sys.stderr)
        return full.exit_code


if __name__ == "__main__":
    sys.exit(main())
