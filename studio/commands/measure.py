"""The measuring verbs: `bench`, `sensitivity`, `search`, and `screenshots` of the app's views."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from studio.commands.output import ProgressLine, format_number, print_json, workspace_path
from studio.errors import BadInput, Cancelled


def cmd_bench(args: argparse.Namespace) -> int:
    from studio.bench import write_result

    if args.search is not None and (args.family != "encoder" or args.search < 1):
        why = "is for the encoder bench" if args.family != "encoder" else "needs at least 1 trial"
        raise BadInput(f"--search {why}")
    if args.recipes and args.family != "encoder":
        raise BadInput(f"--recipes is for the encoder bench ({args.family} times its own recipes)")
    for name in args.recipes or []:
        if not Path(name).is_file():
            raise BadInput(f"--recipes: {name}: no such recipe file")
    bar = ProgressLine("bench")
    if args.family == "kv-cache":
        from studio.bench_kv import format_table as kv_table
        from studio.bench_kv import run_kv_bench

        render = kv_table
        result = run_kv_bench(
            toy=args.toy,
            new_tokens=args.new_tokens,
            rounds=args.rounds or 3,
            threads=args.threads,
            progress=bar,
        )
    elif args.family == "causal-lm":
        from studio.bench_kv import format_table as llm_table
        from studio.bench_kv import with_kv_section
        from studio.bench_llm import run_llm_bench

        render = llm_table
        result = run_llm_bench(
            toy=args.toy,
            batch_sizes=tuple(args.batch_sizes or (1, 8)),
            prompt_tokens=8 if args.toy else args.prompt_tokens,
            new_tokens=4 if args.toy else args.new_tokens,
            rounds=args.rounds or (1 if args.toy else 3),
            threads=args.threads,
            examples=min(args.examples, 8) if args.toy else args.examples,
            only=args.only,
            progress=bar,
        )
        result = with_kv_section(result, toy=args.toy, progress=bar)
    else:
        from studio.bench import format_table, run_bench

        render = format_table
        result = run_bench(
            batch_sizes=tuple(args.batch_sizes or (1, 32)),
            sequence_length=args.sequence_length,
            rounds=args.rounds or 12,
            threads=args.threads,
            examples=args.examples,
            only=args.only,
            extra_recipes=[Path(f) for f in args.recipes or []],
            progress=bar,
            toy=args.toy,
            search_trials=args.search,
            workspace=workspace_path(args) if args.search else None,
        )
    bar.done()
    out = args.out or (args.json if isinstance(args.json, str) else None)
    path = write_result(result, Path(out) if out else None, workspace_path(args).root)
    if args.json is True:
        print_json(result, default=str)
    else:
        print(render(result))
        print(f"\nresults: {path}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from studio.checkpoints import open_checkpoint
    from studio.evaluation.data import load_examples
    from studio.evaluation.kv_quant import KVCacheSpec
    from studio.evaluation.measure import set_threads
    from studio.sensitivity import (
        check_budget,
        choose_exclusions_from_report,
        choose_within_budget_from_report,
        layer_sensitivity,
    )

    if args.target is not None and not 0 < args.target < 1:
        raise BadInput(f"--target must be a fidelity between 0 and 1, got {args.target}")
    if args.max_examples < 1:
        raise BadInput(f"--max-examples must be at least 1, got {args.max_examples}")
    if args.budget_bits is not None:
        check_budget(args.scheme, args.budget_bits)
    kv = KVCacheSpec(args.kv_method, args.bits, args.bits) if args.scheme == "kv-bits" else None
    model = open_checkpoint(args.model, trust=args.trust)
    examples = load_examples(args.data, args.max_examples)
    set_threads(args.threads)
    bar = ProgressLine(f"sensitivity ({args.scheme})", enabled=None if not args.json else False)
    report = layer_sensitivity(
        model,
        args.scheme,
        examples,
        args.sequence_length,
        args.mode,
        bar,
        per_channel=not args.per_tensor,
        group_size=args.group_size,
        kv=kv,
        budget_bits=args.budget_bits,
    )
    bar.done()
    out = report.to_dict()
    if args.target is not None:
        out["mixed_precision"] = choose_exclusions_from_report(report, args.target)
    if args.budget_bits is not None:
        out["budget"] = choose_within_budget_from_report(report, args.budget_bits)
    if args.json:
        print_json(out)
        return 0
    block, param = report.exclusion_block()
    print(f"{report.model}: per-layer sensitivity to {out['scheme_title']}")
    print(
        f"  objective: {report.objective}, {report.examples} examples at sequence length {report.sequence_length}"
    )
    print(f"  settings: {json.dumps(report.settings)}; {report.seconds:.1f}s")
    if report.bits_per_weight is not None:
        print(f"  bits per weight with every layer quantized (scales counted): {report.bits_per_weight:.3f}")
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
            f"{format_number(r.fidelity_loss, '.5f'):>9} {format_number(r.recovered, '.5f'):>10}"
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
    if args.budget_bits is not None:
        b = out["budget"]
        print(
            f"\n  within {args.budget_bits:g} bits per weight (every layer quantized: "
            f"{b['bits_per_weight_all_quantized']:.3f}): keep {len(b['excluded'])} layer(s) float -> "
            f"{b['bits_per_weight']:.3f} bits per weight, estimated fidelity {b['estimated_fidelity']:.5f}"
        )
        print(f"  {block} params: {json.dumps({param: b['excluded']})}")
        print(
            "  (or let the block choose by itself and measure: "
            f"{json.dumps({'max_bits_per_weight': args.budget_bits})})"
        )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from studio.pipeline import load_recipe
    from studio.search import run_search
    from studio.search_space import validate_search

    for flag, value in (("--parallel", args.parallel), ("--ray-cpus-per-trial", args.ray_cpus_per_trial)):
        if value is not None and value < 1:
            raise BadInput(f"{flag} must be at least 1, got {value}")
    recipe = load_recipe(args.recipe)
    validate_search(recipe, args.recipe)  # before the workspace is touched
    # Ctrl+C (and the GUI's Stop, which sends SIGINT) must stop the search even where this process was
    # started with SIGINT ignored (a background job of a non-interactive shell): Python then keeps SIG_IGN.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = run_search(
            recipe,
            workspace_path(args),
            recipe_path=args.recipe,
            trials=args.trials,
            trust=args.trust,
            parallel=args.parallel,
            ray_address=args.ray,
            ray_cpus_per_trial=args.ray_cpus_per_trial,
        )
    except KeyboardInterrupt:
        print(
            "model-studio: search stopped; the finished trials are kept (run the same command to resume)",
            file=sys.stderr,
        )
        return Cancelled.exit_code
    if args.json:
        print_json(result, default=str)
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
