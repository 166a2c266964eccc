"""The structural diff of graphs: which nodes of one graph are new, gone, changed (fused, quantized, pruned,
replaced, exported) or the same against a reference, with the counterpart of every matched node, so a
view can centre one graph on the node matching the one shown in another.

Two graphs of one kind (two ONNX files) are matched by the torch weights their nodes read, then by name and
op, then by structure. A torch graph against an ONNX graph (the original against its export) is matched
through the weight-name map `export.onnx` records (the MatMul reading `encoder.layer.0.attention.self.query
.weight` and the Add reading its bias are both that Linear), then by the module path the exporter writes in
each node's name (`/model/encoder/layer.0/intermediate/intermediate_act_fn/Erf` is the GELU module); the
ONNX nodes left are the shape arithmetic and glue the exporter writes between modules ("plumbing"), which
no torch module stands for, not nodes the ONNX graph added.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from studio.inspection.graph import Graph, GraphNode

_SCOPE_SPLIT = re.compile(r"[./]")


def graph_diff(a: Graph, b: Graph) -> dict[str, Any]:
    """Which nodes of B are new, which of A are gone, and which changed, A being the reference.

    Returns `added` / `removed` (node names), `changed` (`{"b", "a", "change", "op_a", "op_b"}`),
    `unchanged` (a count), `plumbing` (the ONNX side's nodes without a torch counterpart in a torch
    against ONNX diff; empty otherwise), `plumbing_side` ("A", "B" or None) and `matches` (every matched B
    node -> its A nodes)."""
    cross = a.kind != b.kind
    a_nodes = {n.name: n for n in a.nodes}
    matches: dict[str, list[str]] = {}  # B node -> A nodes
    matched_a: dict[str, str] = {}  # A node -> the first B node matched to it

    def link(b_name: str, a_names: list[str]) -> None:
        matches[b_name] = a_names
        for x in a_names:
            matched_a.setdefault(x, b_name)

    # 1. the torch weights both read (a fused Attention of B reads the query, key and value weights of A's
    # three MatMuls: it matches all three and is "fused"); across kinds one torch module is several ONNX
    # nodes (its MatMul and its bias Add), so an A node may be matched more than once
    a_by_weight: dict[str, list[str]] = {}
    for n in a.nodes:
        for w in n.torch_weights():
            a_by_weight.setdefault(w, []).append(n.name)
    for n in b.nodes:
        found = [x for w in n.torch_weights() for x in a_by_weight.get(w, []) if cross or x not in matched_a]
        if found:
            link(n.name, list(dict.fromkeys(found)))
    # 2. across kinds: the module path in an ONNX node's name; within a kind: the same name and op
    if cross:
        _match_scopes(a, b, matches, link)
    else:
        for n in b.nodes:
            if (
                n.name not in matches
                and n.name in a_nodes
                and a_nodes[n.name].op == n.op
                and n.name not in matched_a
            ):
                link(n.name, [n.name])
    # 3. structure: an unmatched node of B whose producers match the producers of an unmatched A node of
    # the same op
    a_made, b_made = a.producers(), b.producers()
    for n in b.nodes:
        if n.name in matches:
            continue
        b_sources = {b_made[t] for t in n.inputs if t in b_made}
        want = {x for s in b_sources for x in matches.get(s, [])}
        for cand in a.nodes:
            if cand.name in matched_a or cand.op != n.op:
                continue
            if want and want & {a_made[t] for t in cand.inputs if t in a_made}:
                link(n.name, [cand.name])
                break
    changed, same = [], []
    for n in b.nodes:
        if n.name not in matches:
            continue
        olds = [a_nodes[x] for x in matches[n.name]]
        change = _cross_change(olds, n, b.kind == "onnx") if cross else _change(olds, n)
        if change is None:
            same.append(n.name)
        else:
            changed.append(
                {"b": n.name, "a": [o.name for o in olds], "change": change, "op_a": olds[0].op, "op_b": n.op}
            )
    added = [n.name for n in b.nodes if n.name not in matches]
    removed = [n.name for n in a.nodes if n.name not in matched_a]
    plumbing: list[str] = []
    plumbing_side = None
    if cross:  # the ONNX side's leftovers are the exporter's glue, not nodes added or removed
        plumbing_side = "B" if b.kind == "onnx" else "A" if a.kind == "onnx" else None
        if plumbing_side == "B":
            plumbing, added = added, []
        elif plumbing_side == "A":
            plumbing, removed = removed, []
    return {
        "added": added,
        "removed": removed,
        "changed": changed,
        "unchanged": len(same),
        "plumbing": plumbing,
        "plumbing_side": plumbing_side,
        "matches": matches,
    }


def module_scopes(name: str) -> list[str]:
    """The torch module paths an ONNX node name may stand for, longest first: `/model/encoder/layer.0/
    output/dense/MatMul` -> `model.encoder.layer.0.output.dense`, `encoder.layer.0.output.dense`, ... (the
    exporter prefixes the wrapper's attribute names, so leading parts are dropped one by one)."""
    parts = [p for p in _SCOPE_SPLIT.split(name) if p][:-1]  # the last part is the op
    return [".".join(parts[i:]) for i in range(len(parts))]


def _match_scopes(a: Graph, b: Graph, matches: dict[str, list[str]], link: Any) -> None:
    """Match the unmatched ONNX nodes of one side to the torch leaf module their name says they are in,
    else to a functional op of the torch graph in the same module with the same op (`/model/encoder/
    layer.0/attention/output/Add` is `encoder.layer.0.attention.output/add`), one for one in order."""
    onnx_side, torch_side = (a, b) if a.kind == "onnx" else (b, a)
    leaves = {n.name for n in torch_side.nodes}
    functional: dict[tuple[str, str], list[str]] = {}  # (module, ONNX op) -> torch ops, in order
    for n in torch_side.nodes:
        if "/" in n.name:
            functional.setdefault((n.name.rsplit("/", 1)[0], onnx_op_of(n.op)), []).append(n.name)
    matched_onnx = set(matches) if onnx_side is b else {x for xs in matches.values() for x in xs}
    for n in onnx_side.nodes:
        if n.name in matched_onnx:
            continue
        scopes = module_scopes(n.name)
        module = next((s for s in scopes if s in leaves), None)
        if module is None:
            # the exporter's root (`/model/Cast`) is the torch model's root module (`/to`)
            queue = next(
                (q for s in [*scopes, ""] if (q := functional.get((s, n.op.lower())))),
                None,
            )
            if not queue:
                continue
            module = queue.pop(0)
        if onnx_side is b:
            link(n.name, [module])
        else:
            matches.setdefault(module, [])
            if n.name not in matches[module]:
                link(module, [*matches[module], n.name])


# ATen ops under the name of the ONNX op they are exported as (lowercase), where the two differ.
_ONNX_OP_OF = {
    "view": "reshape",
    "_unsafe_view": "reshape",
    "cat": "concat",
    "to": "cast",
    "permute": "transpose",
    "__and__": "and",
    "bitwise_and": "and",
    "arange": "range",
    "ge": "greaterorequal",
    "eq": "equal",
    "new_ones": "constantofshape",
    "index": "gather",
    "select": "gather",
    "mean": "reducemean",
    "scaled_dot_product_attention": "softmax",  # the attention product's core
}


def onnx_op_of(aten_op: str) -> str:
    """The ONNX op (lowercase) an ATen op of a torch graph is exported as: `view` -> `reshape`."""
    return _ONNX_OP_OF.get(aten_op, aten_op.lower())


def _sizes(node: GraphNode) -> dict[str, int]:
    """Elements per torch weight: pruning changes them; a transposed copy (ONNX's MatMul weights) does not."""
    out = {}
    for w in node.weights:
        size = 1
        for d in w["shape"]:
            size *= int(d)
        for t in w.get("torch", []) or [w["name"]]:
            out[t] = size
    return out


def _change(olds: list[GraphNode], new: GraphNode) -> str | None:
    if len(olds) > 1:
        return "fused"
    old = olds[0]
    if new.precision != old.precision and (new.precision or "").startswith("int"):
        return "quantized"
    if _sizes(old) != _sizes(new):
        return "pruned"
    if old.op != new.op:
        return "replaced"
    if old.precision != new.precision:
        return "precision"
    return None


def _cross_change(olds: list[GraphNode], new: GraphNode, new_is_onnx: bool) -> str:
    """A torch module against the ONNX nodes it was exported to: "fused" when one ONNX node does the work
    of several modules, "quantized" / "pruned" when the weights it reads changed precision or size, else
    "exported" (the same computation written as ONNX ops)."""
    if new_is_onnx and len({o.name.split("#")[0] for o in olds}) > 1:  # a module called twice is one
        return "fused"
    if new.precision != olds[0].precision and (
        (new.precision or "").startswith("int") or (olds[0].precision or "").startswith("int")
    ):
        return "quantized"
    new_sizes = _sizes(new)
    old_sizes: dict[str, int] = {}
    for o in olds:
        old_sizes.update(_sizes(o))
    if any(old_sizes[t] != s for t, s in new_sizes.items() if t in old_sizes):
        return "pruned"
    return "exported"


def graph_diff_many(graphs: Sequence[Graph]) -> dict[str, Any]:
    """The diff of every graph against the first, the reference: `diffs[i]` is `graph_diff(graphs[0],
    graphs[i + 1])`. Two or more graphs."""
    if len(graphs) < 2:
        raise ValueError("a diff needs two or more graphs: the reference first")
    return {"reference": 0, "diffs": [graph_diff(graphs[0], g) for g in graphs[1:]]}


def counterparts(structure: dict[str, Any]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """From a `graph_diff`: A node -> its B nodes, and B node -> its A nodes."""
    b_to_a: dict[str, list[str]] = {b: list(a) for b, a in structure.get("matches", {}).items()}
    a_to_b: dict[str, list[str]] = {}
    for b, names in b_to_a.items():
        for x in names:
            a_to_b.setdefault(x, []).append(b)
    return a_to_b, b_to_a


class Counterparts:
    """The matched nodes between any two of N graphs diffed against the first (`graph_diff_many`'s
    `diffs`), with each diff's maps built once: what a view asks at every scroll."""

    def __init__(self, diffs: Sequence[dict[str, Any]]) -> None:
        self.maps = [counterparts(d) for d in diffs]

    def of(self, source: int, target: int, name: str) -> list[str]:
        """The nodes of graph `target` matching node `name` of graph `source` (graph 0 is the reference;
        graph i > 0 is diffed in `diffs[i - 1]`); two graphs that are not the reference are linked through
        it."""
        if source == target:
            return [name]
        if source == 0:
            return self.maps[target - 1][0].get(name, [])
        via = self.maps[source - 1][1].get(name, [])
        if target == 0:
            return via
        a_to_b = self.maps[target - 1][0]
        return list(dict.fromkeys(x for r in via for x in a_to_b.get(r, [])))


def counterpart_in(diffs: Sequence[dict[str, Any]], source: int, target: int, name: str) -> list[str]:
    """`Counterparts(diffs).of(source, target, name)`, for one question."""
    return Counterparts(diffs).of(source, target, name)
