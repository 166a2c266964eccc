"""`model-studio graph`, `diff` and `diagnose`: the graph of a variant with its time and precision per node,
the layer-wise error of one model against another, and the ranked causes of a variant's run time."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from studio.commands.output import print_json, workspace_path


def open_model(args: argparse.Namespace, ref: str) -> tuple[str, Any]:
    """A checkpoint path or builtin model (as `inspect` takes), else a variant or baseline id of the
    workspace (as `compare` takes, a unique prefix is enough): its label and the opened checkpoint."""
    from studio.checkpoints import open_checkpoint

    if ref.startswith("builtin:") or Path(ref).expanduser().exists():
        return ref, open_checkpoint(ref, trust=getattr(args, "trust", False))
    from studio.compare import open_row

    row = workspace_path(args).get(ref)
    return row["id"], open_row(row, trust=getattr(args, "trust", False))


def examples_of(args: argparse.Namespace) -> list[Any]:
    from studio.evaluation.data import load_examples

    return load_examples(args.data, args.examples)


def save_tables(args: argparse.Namespace, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """--csv FILE / --json-file FILE: the rows as a table file as well as what is printed."""
    from studio.inspection.graph_export import write_table

    for path in (args.csv, args.json_file):
        if path:
            write_table(path, rows, columns)


def cmd_graph(args: argparse.Namespace) -> int:
    from studio.inspection.graph import graph_of
    from studio.inspection.graph_export import NODE_COLUMNS, node_rows

    label, model = open_model(args, args.variant)
    graph = graph_of(model)
    shares: dict[str, float] = {}
    if not args.no_profile:
        from studio.evaluation.node_profile import profile_model

        shares = profile_model(model, examples_of(args), sequence_length=args.sequence_length).shares
    errors: dict[str, float] = {}
    first_jump = None
    if args.against:
        from studio.inspection.layer_diff import layer_diff

        _, reference = open_model(args, args.against)
        diff = layer_diff(reference, model, examples=examples_of(args), sequence_length=args.sequence_length)
        errors = {x["name"]: x["relative_error"] for x in diff["layers"]}
        first_jump = diff["first_jump"]
    nodes = node_rows(graph, shares, errors)
    save_tables(args, nodes, NODE_COLUMNS)
    if args.json:
        print_json(
            {
                "variant": label,
                "kind": graph.kind,
                "inputs": graph.inputs,
                "outputs": graph.outputs,
                "nodes": nodes,
                "groups": graph.groups(),
                "first_jump": first_jump,
            }
        )
        return 0
    print(f"{label}: {graph.kind} graph, {len(nodes)} nodes in {len(graph.groups())} repeated blocks")
    ranked = sorted(nodes, key=lambda r: -(r["time_share"] or 0.0))
    print(f"\n{'node':<64} {'op':<24} {'time':>6} {'precision':<16} {'error':>9}")
    for r in ranked[: args.top]:
        share = "-" if r["time_share"] is None else f"{r['time_share'] * 100:.1f}%"
        error = "-" if r["error"] is None else f"{r['error']:.3g}"
        print(f"{r['name'][-64:]:<64} {r['op']:<24} {share:>6} {r['precision'] or '-':<16} {error:>9}")
    return 0


def has_graph(model: Any) -> bool:
    """An ONNX file, or a torch module the studio can trace: the two kinds of graph a diff matches."""
    return model.format == "onnx" or model.runnable


def cmd_diff(args: argparse.Namespace) -> int:
    from studio.inspection.layer_diff import layer_diff

    a_label, a = open_model(args, args.a)
    b_label, b = open_model(args, args.b)
    result = layer_diff(a, b, examples=examples_of(args), sequence_length=args.sequence_length)
    out: dict[str, Any] = {"a": a_label, "b": b_label, **result}
    if has_graph(a) and has_graph(b):
        from studio.errors import BadInput
        from studio.inspection.graph import graph_of
        from studio.inspection.graph_diff import graph_diff

        try:
            out["structure"] = graph_diff(graph_of(a), graph_of(b))
        except BadInput as exc:  # a module its hooks cannot trace: the layer-wise diff still stands
            out["structure_error"] = exc.message
    if args.csv or args.json_file:
        from studio.inspection.graph_export import DIFF_COLUMNS, diff_rows

        save_tables(args, diff_rows(out.get("structure"), result["layers"]), DIFF_COLUMNS)
    if args.json:
        print_json(out)
        return 0
    print(f"A = {a_label}\nB = {b_label}\n")
    print(f"{'layer':<64} {'cosine':>9} {'rel. error':>11}")
    for x in result["layers"]:
        mark = "  <- first jump" if x["name"] == result["first_jump"] else ""
        print(f"{x['name'][-64:]:<64} {x['cosine']:>9.5f} {x['relative_error']:>11.3g}{mark}")
    print(f"\n{len(result['layers'])} layers matched; first jump: {result['first_jump'] or 'none'}")
    if "structure" in out:
        s = out["structure"]
        print(
            f"graph: {len(s['added'])} nodes added, {len(s['removed'])} removed, {len(s['changed'])} changed, "
            f"{s['unchanged']} unchanged"
            + (
                f", {len(s['plumbing'])} ONNX plumbing nodes no torch module stands for"
                if s["plumbing"]
                else ""
            )
        )
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from studio.diagnose import GEMM_BATCH, diagnose

    label, model = open_model(args, args.variant)
    against = open_model(args, args.against)[1] if args.against else None
    result = diagnose(
        model,
        against=against,
        examples=examples_of(args),
        sequence_length=args.sequence_length,
        threads=args.threads,
        gemm_batch=GEMM_BATCH,
    )
    if args.json:
        print_json({"variant": label, **result})
        return 0
    profile = result["profile"]
    print(f"{label}: {profile['total_ms']:.1f} ms of node time per run, {profile['threads_used']} thread(s)")
    if not result["causes"]:
        print("no cause found")
    for i, c in enumerate(result["causes"], 1):
        print(f"\n{i}. {c['what']}  (cost {c['cost']:.0%})")
        e = c["evidence"]
        if c["kind"] == "gemm-peak":
            print(
                f"     {e['linear_nodes']} linear layers, {e['tokens']} tokens: {e['linear_ms']:.1f} ms, "
                f"{e['linear_gops']:.0f} GOPS of a {e['peak_gops']:.0f} GOPS {e['peak_precision']} peak; "
                f"at best {e['compute_bound_ms']:.1f} ms of arithmetic, {e['memory_bound_ms']:.1f} ms of memory"
            )
        nodes = e.get("nodes")
        if isinstance(nodes, list):
            for n in nodes[:8]:
                share = f"  {n['time_share']:.1%}" if isinstance(n, dict) else ""
                print(f"     {n['name'] if isinstance(n, dict) else n}{share}")
        print(f"   fix: {c['fix']}")
    return 0
