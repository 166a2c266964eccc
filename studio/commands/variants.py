"""The workspace verbs: `variants` (list, rm), `compare`, `export` and `report`."""

from __future__ import annotations

import argparse
import sys

from studio.commands.output import format_number, print_json, workspace_path
from studio.errors import BadInput
from studio.units import human_bytes


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
        print_json({"workspace": str(ws.root), "variants": rows}, default=str)
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
            f"{r['id']:<32} {r['kind']:<9} {human_bytes(m.get('size_bytes', 0)):>9} {b1:>10} "
            f"{'-' if qv is None else f'{qv:.4f}':>10}  {steps}{flag}"
        )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from studio.compare import compare

    ws = workspace_path(args)
    result = compare(ws, args.a, args.b, weights=not args.no_weights, examples=args.examples, data=args.data)
    if args.json:
        print_json(result, default=str)
        return 0
    a, b = result["a"], result["b"]
    print(f"A = {a['id']} ({a['kind']})\nB = {b['id']} ({b['kind']})\n")
    print(f"{'metric':<34} {'A':>12} {'B':>12} {'B/A':>8}  better")
    for row in result["metrics"]:
        ratio = "-" if row["ratio_b_over_a"] is None else f"{row['ratio_b_over_a']:.3f}"
        print(
            f"{row['metric']:<34} {format_number(row['a']):>12} {format_number(row['b']):>12} {ratio:>8}  {row['better'] or ''}"
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
        print_json(out)
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
