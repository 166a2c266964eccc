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
                "source": graph.source,
                "notes": graph.notes,
                "inputs": graph.inputs,
                "outputs": graph.outputs,
                "nodes": nodes,
                "groups": graph.groups(),
                "first_jump": first_jump,
            }
        )
        return 0
    print(
        f"{label}: {graph.kind} graph ({graph.source}), {len(nodes)} nodes in {len(graph.groups())} "
        "repeated blocks"
    )
    for note in graph.notes:
        print(f"note: {note}")
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
    """`diff A B`: B against A. `diff A B C ...`: each against A, the reference (`diffs`, one entry per
    model as `diff A X` prints it; the graph diffs are `graph_diff_many`'s, A's graph built once)."""
    from studio.inspection.layer_diff import layer_diff

    a_label, a = open_model(args, args.a)
    others = [open_model(args, ref) for ref in [args.b, *(getattr(args, "more", None) or [])]]
    examples = examples_of(args)
    outs: list[dict[str, Any]] = []
    for label, model in others:
        result = layer_diff(a, model, examples=examples, sequence_length=args.sequence_length)
        outs.append({"a": a_label, "b": label, **result})
    for out, (structure, error) in zip(outs, graph_structures(a, [m for _, m in others]), strict=True):
        if structure is not None:
            out["structure"] = structure
        elif error is not None:
            out["structure_error"] = error
    if args.csv or args.json_file:
        from studio.inspection.graph_export import DIFF_COLUMNS, diff_rows

        rows = []
        for out in outs:
            for row in diff_rows(out.get("structure"), out["layers"]):
                rows.append(row if len(outs) == 1 else {"b": out["b"], **row})
        save_tables(args, rows, DIFF_COLUMNS if len(outs) == 1 else ("b", *DIFF_COLUMNS))
    if args.json:
        print_json(outs[0] if len(outs) == 1 else {"reference": a_label, "diffs": outs})
        return 0
    for i, out in enumerate(outs):
        print(("\n" if i else "") + f"A = {a_label}\nB = {out['b']}\n")
        print_diff(out)
    return 0


def graph_structures(a: Any, others: list[Any]) -> list[tuple[dict[str, Any] | None, str | None]]:
    """Per model: its graph diff against `a` where both have a graph, or the message of the graph that
    could not be built (a module its hooks cannot trace), or (None, None) where one has no graph."""
    from studio.errors import BadInput
    from studio.inspection.graph import graph_of
    from studio.inspection.graph_diff import graph_diff

    out: list[tuple[dict[str, Any] | None, str | None]] = [(None, None)] * len(others)
    wanted = [i for i, model in enumerate(others) if has_graph(a) and has_graph(model)]
    if not wanted:
        return out
    try:
        reference = graph_of(a)
    except BadInput as exc:  # the layer-wise diffs still stand
        return [(None, exc.message) if i in wanted else (None, None) for i in range(len(others))]
    for i in wanted:
        try:
            out[i] = (graph_diff(reference, graph_of(others[i])), None)
        except BadInput as exc:
            out[i] = (None, exc.message)
    return out


def print_diff(out: dict[str, Any]) -> None:
    """One B's layers and graph diff against A, as `diff A B` prints them."""
    print(f"{'layer':<64} {'cosine':>9} {'rel. error':>11}")
    for x in out["layers"]:
        mark = "  <- first jump" if x["name"] == out["first_jump"] else ""
        print(f"{x['name'][-64:]:<64} {x['cosine']:>9.5f} {x['relative_error']:>11.3g}{mark}")
    print(f"\n{len(out['layers'])} layers matched; first jump: {out['first_jump'] or 'none'}")
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
