"""Where each box and edge of a graph view goes: repeated blocks collapsed into one box each, then a
layered (Sugiyama) layout from top to bottom, by grandalf.

A graph of a real model has hundreds to thousands of nodes; drawn one by one it is unreadable and slow to
lay out. So nodes are first gathered into blocks: the repeated block the graph model already names
(`encoder.layer.3`), else the module their name sits under (`/model/embeddings/Add` -> `embeddings`), and
a node without a name of its own (an exporter's Constant) joins the block of the nodes reading it. Each
block is one box until it is expanded. Sizes are in scene units (about pixels at 100 % zoom); the view
only draws what this returns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from studio.inspection.graph import MATMUL_OPS, Graph

NODE_HEIGHT = 34.0
BLOCK_HEIGHT = 46.0
CHAR_WIDTH = 7.0  # a label character at the view's font size, roughly
MIN_WIDTH = 72.0
MAX_LABEL = 40  # characters of a label shown; the rest is elided (the side panel has the full name)
GAP = 60.0  # between the layouts of separate components, side by side
ORDER_ROUNDS = 4  # grandalf's ordering rounds: more untangles a little more and costs time
# A box read in more blocks than this (the attention mask every layer reads) is laid out with its first
# reader only and its other edges run down a bus on the left: as layout edges they would pull each layer
# sideways in turn, a zigzag instead of a column.
FAN_OUT = 3
BUS_GAP = 8.0
_OP_TAIL = re.compile(r"^[A-Za-z]+(_\d+)?$")


@dataclass
class Box:
    id: str  # a node name, or a block id when collapsed
    label: str
    x: float  # the top-left corner
    y: float
    w: float
    h: float
    collapsed: bool  # a block drawn as one box
    members: int  # nodes inside (1 for a node)
    op: str | None = None  # the node's op; a block's main op (its matrix products' op, if it has any)
    block: str | None = None  # the block this box belongs to (itself when collapsed)
    ops: dict[str, int] = field(default_factory=dict)  # op -> nodes of it inside

    def centre(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2


@dataclass
class EdgeLine:
    source: str
    target: str
    points: list[tuple[float, float]]  # from the source's bottom to the target's top


@dataclass
class Layout:
    boxes: list[Box]
    edges: list[EdgeLine]
    width: float
    height: float
    item_of: dict[str, str] = field(default_factory=dict)  # node name -> the box showing it

    def box(self, box_id: str) -> Box:
        for b in self.boxes:
            if b.id == box_id:
                return b
        raise KeyError(box_id)

    def members(self, box_id: str) -> list[str]:
        """The node names a box shows (itself for a node)."""
        return [n for n, b in self.item_of.items() if b == box_id]


def module_block(name: str) -> str | None:
    """The module a node name sits under, as its first level below the exporter's `model` root:
    `/model/embeddings/LayerNorm/LayerNormalization` -> `embeddings`, `/model/Cast` and `/to` -> `model`;
    a torch module path is its own first part (`pooler.dense` -> `pooler`, `model.norm` -> `norm`, and
    an op in it `embeddings.x/add` -> `embeddings`). None for unnamed nodes."""
    if "/" in name:
        parts = [p for p in name.split("/") if p]
        if len(parts) < 2:
            # an op in a torch model's root module (`/to`: the mask arithmetic) is where the exporter's
            # `/model/Cast` is
            return "model" if name.startswith("/") and len(parts) == 1 else None
        modules = parts[:-1]
        if modules[0] == "model" and len(modules) > 1:
            return modules[1]
        if not name.startswith("/") and len(modules) == 1:  # a torch op in a module: `embeddings/add`
            return _torch_block(modules[0])
        return modules[0]
    if _OP_TAIL.match(name):  # `Attention_0`, `Constant_12`: named after its op, not a module
        return None
    return _torch_block(name.split("#")[0])


def _torch_block(path: str) -> str | None:
    """A torch module path's first part, below a `model` root as for ONNX names (`model.norm` -> `norm`,
    so a decoder's final norm is not in one box with its embeddings, above and below the layers)."""
    parts = path.split(".")
    if parts[0] == "model" and len(parts) > 1:
        return parts[1]
    return parts[0] or None


def blocks_of(graph: Graph) -> dict[str, str | None]:
    """Node name -> the block it is drawn in (None: a box of its own)."""
    block: dict[str, str | None] = {}
    for n in graph.nodes:
        block[n.name] = n.group if n.group is not None else module_block(n.name)
    readers: dict[str, list[str]] = {}
    for n in graph.nodes:
        for t in n.inputs:
            readers.setdefault(t, []).append(n.name)
    for n in reversed(graph.nodes):  # backwards, so a chain of unnamed nodes follows its reader
        if block[n.name] is not None:
            continue
        found = {block[r] for t in n.outputs for r in readers.get(t, [])}
        if len(found) == 1 and None not in found:
            block[n.name] = found.pop()
    sizes: dict[str, int] = {}
    for b in block.values():
        if b is not None:
            sizes[b] = sizes.get(b, 0) + 1
    # a block of one node is just that node; a block named like a node would hide it
    names = set(block)
    return {n: (b if b is not None and sizes[b] > 1 and b not in names else None) for n, b in block.items()}


def elide(text: str, limit: int = MAX_LABEL) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def node_label(name: str, op: str) -> str:
    """A node's short name: its last path part (`/model/encoder/layer.0/attention/self/Softmax` ->
    `Softmax`), or its module's last two parts for a torch call; with the op when that says more."""
    if "/" in name:
        tail = [p for p in name.split("/") if p][-1]
        return elide(tail if tail.startswith(op) else f"{tail}: {op}")
    short = ".".join(name.split(".")[-2:])
    return elide(f"{short}: {op}")


def _size(label: str, collapsed: bool) -> tuple[float, float]:
    width = max(MIN_WIDTH, CHAR_WIDTH * len(label) + 20)
    return width, BLOCK_HEIGHT if collapsed else NODE_HEIGHT


def layout_graph(
    graph: Graph, expanded: Iterable[str] = (), blocks: Mapping[str, str | None] | None = None
) -> Layout:
    """Boxes and edge polylines for `graph` with every block collapsed but those in `expanded`."""
    block = dict(blocks) if blocks is not None else blocks_of(graph)
    opened = set(expanded)
    item_of: dict[str, str] = {}
    info: dict[str, dict[str, Any]] = {}
    for n in graph.nodes:
        b = block.get(n.name)
        if b is not None and b not in opened:
            item_of[n.name] = b
            entry = info.setdefault(b, {"collapsed": True, "members": 0, "ops": {}, "block": b})
            entry["members"] += 1
            entry["ops"][n.op] = entry["ops"].get(n.op, 0) + 1
        else:
            item_of[n.name] = n.name
            info[n.name] = {"collapsed": False, "members": 1, "ops": {n.op: 1}, "block": b}
    pairs = list(
        dict.fromkeys((item_of[a], item_of[b]) for a, b in graph.edges() if item_of[a] != item_of[b])
    )
    boxes: dict[str, Box] = {}
    for box_id, entry in info.items():
        ops = entry["ops"]
        products = {o: c for o, c in ops.items() if o in MATMUL_OPS} or ops
        op = max(products, key=lambda o: products[o])
        label = elide(box_id) if entry["collapsed"] else node_label(box_id, op)
        w, h = _size(label, entry["collapsed"])
        boxes[box_id] = Box(
            box_id, label, 0.0, 0.0, w, h, entry["collapsed"], entry["members"], op, entry["block"], dict(ops)
        )
    lines = _place(boxes, pairs)
    width = max((b.x + b.w for b in boxes.values()), default=0.0)
    height = max((b.y + b.h for b in boxes.values()), default=0.0)
    return Layout(list(boxes.values()), lines, width, height, item_of)


class _View:
    """What grandalf needs on a vertex (w, h, and the xy it sets) and an edge (setpath)."""

    def __init__(self, w: float = 0.0, h: float = 0.0) -> None:
        self.w, self.h = w, h
        self.xy: tuple[float, float] = (0.0, 0.0)
        self.points: list[tuple[float, float]] = []

    def setpath(self, points: list[tuple[float, float]]) -> None:
        self.points = [(float(x), float(y)) for x, y in points]


def _place(boxes: dict[str, Box], pairs: list[tuple[str, str]]) -> list[EdgeLine]:
    """Lay out each connected component with grandalf's Sugiyama layout and put the components side by
    side, the largest first; set every box's corner and return the edges' polylines."""
    from grandalf.graphs import Edge, Graph, Vertex
    from grandalf.layouts import SugiyamaLayout

    vertices = {box_id: Vertex(box_id) for box_id in boxes}
    for box_id, v in vertices.items():
        v.view = _View(boxes[box_id].w, boxes[box_id].h)
    reader_blocks: dict[str, set[str]] = {}
    for a, b in pairs:
        reader_blocks.setdefault(a, set()).add(boxes[b].block or b)
    first: dict[str, str] = {}
    laid, bus = [], []
    for a, b in pairs:
        if len(reader_blocks[a]) > FAN_OUT and first.setdefault(a, b) != b:
            bus.append((a, b))
        else:
            laid.append((a, b))
    edges = []
    for a, b in laid:
        e = Edge(vertices[a], vertices[b])
        e.view = _View()
        edges.append(e)
    g = Graph(list(vertices.values()), edges)
    offset = 0.0
    for component in sorted(g.C, key=lambda c: -c.order()):
        sug = SugiyamaLayout(component)
        sug.xspace, sug.yspace = 24, 36
        roots = [v for v in component.sV if len(v.e_in()) == 0]
        sug.init_all(roots=roots or None, optimize=True)  # optimize: a Constant sits just above its reader
        sug.draw(ORDER_ROUNDS)
        left = min(v.view.xy[0] - v.view.w / 2 for v in component.sV)
        right = max(v.view.xy[0] + v.view.w / 2 for v in component.sV)
        shift = offset - left
        for v in component.sV:
            x, y = v.view.xy
            box = boxes[v.data]
            box.x, box.y = x + shift - box.w / 2, y - box.h / 2
        for e in component.sE:
            e.view.points = [(x + shift, y) for x, y in e.view.points]
        offset += right - left + GAP
    lines = []
    for e in edges:
        src, dst = boxes[e.v[0].data], boxes[e.v[1].data]
        inner = e.view.points[1:-1]
        lines.append(
            EdgeLine(src.id, dst.id, [(src.centre()[0], src.y + src.h), *inner, (dst.centre()[0], dst.y)])
        )
    sources = list(dict.fromkeys(a for a, _ in bus))
    for a_id, b_id in bus:
        src, dst = boxes[a_id], boxes[b_id]
        top, bottom = src.y + src.h, dst.y
        between = [x.x for x in boxes.values() if x.y + x.h >= top and x.y <= bottom] or [src.x]
        lane = min(between) - BUS_GAP * (2 + sources.index(a_id))
        points = [
            (src.centre()[0], top),
            (lane, top + BUS_GAP),
            (lane, bottom - BUS_GAP),
            (dst.centre()[0], bottom),
        ]
        lines.append(EdgeLine(a_id, b_id, points))
    return lines


# ------------------------------------------------------------------------------------------------ values


def box_values(layout: Layout, values: Mapping[str, float], how: str = "sum") -> dict[str, float]:
    """A value per box from per-node values: a block's time share is the sum of its nodes' shares, its
    error the largest of theirs (`how` = "sum" or "max"). Boxes none of whose nodes has a value are left out."""
    out: dict[str, float] = {}
    for name, box_id in layout.item_of.items():
        if name not in values or values[name] is None:
            continue
        v = float(values[name])
        if box_id not in out:
            out[box_id] = v
        else:
            out[box_id] = out[box_id] + v if how == "sum" else max(out[box_id], v)
    return out


def box_labels(layout: Layout, labels: Mapping[str, str | None], mixed: str = "mixed") -> dict[str, str]:
    """A category per box from per-node categories (precision, diff marks): the one its nodes share, else
    `mixed`; nodes without a category do not count."""
    seen: dict[str, set[str]] = {}
    for name, box_id in layout.item_of.items():
        label = labels.get(name)
        if label is not None:
            seen.setdefault(box_id, set()).add(label)
    return {box_id: (s.pop() if len(s) == 1 else mixed) for box_id, s in seen.items()}
