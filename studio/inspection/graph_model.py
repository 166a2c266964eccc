"""The graph model both kinds of graph share: nodes with their op, tensors, weights and precision, the
repeated block each belongs to, and the collapsed view of those blocks (built from ONNX files in `graph`,
from torch modules in `torch_graph`)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_NUMBERED = re.compile(r"^\d+$")


@dataclass
class GraphNode:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, Any] = field(default_factory=dict)
    # initializer (ONNX) or parameter (torch) names this node reads, with what export.onnx says they are in torch
    weights: list[dict[str, Any]] = field(default_factory=list)
    precision: str | None = None
    group: str | None = None  # the repeated block (`encoder.layer.3`) this node belongs to, None at top level

    def torch_weights(self) -> list[str]:
        """The torch weights this node reads (`encoder.layer.0.attention.self.query.weight`)."""
        return list(dict.fromkeys(t for w in self.weights for t in w.get("torch", [])))

    def modules(self) -> list[str]:
        """The torch modules whose weights this node reads (`encoder.layer.0.attention.self.query`)."""
        return list(dict.fromkeys(t.rsplit(".", 1)[0] for t in self.torch_weights()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "attributes": self.attributes,
            "weights": self.weights,
            "precision": self.precision,
            "group": self.group,
        }


@dataclass
class Graph:
    kind: str  # "onnx" or "torch"
    nodes: list[GraphNode]
    shapes: dict[str, list[Any]] = field(default_factory=dict)  # tensor name -> shape (dims may be names)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    # where it came from: "onnx" (the file), "torch.export" (its data flow) or "module hooks" (the leaf
    # calls only, where torch.export could not capture the model; `notes` says why)
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def node(self, name: str) -> GraphNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def producers(self) -> dict[str, str]:
        """Tensor name -> the node that writes it."""
        return {t: n.name for n in self.nodes for t in n.outputs}

    def edges(self) -> list[tuple[str, str]]:
        """(producer, consumer) node pairs, once each, in node order."""
        made = self.producers()
        seen: dict[tuple[str, str], None] = {}
        for n in self.nodes:
            for t in n.inputs:
                if t in made and made[t] != n.name:
                    seen[(made[t], n.name)] = None
        return list(seen)

    def groups(self) -> dict[str, list[str]]:
        """Repeated block -> its node names, in the order the blocks first appear."""
        out: dict[str, list[str]] = {}
        for n in self.nodes:
            if n.group is not None:
                out.setdefault(n.group, []).append(n.name)
        return out

    def collapsed(self, expanded: Iterable[str] = ()) -> dict[str, Any]:
        """What a view draws: each repeated block as one item unless its key is in `expanded`, every other
        node as itself, and the edges between the items (a block's inner edges disappear)."""
        open_groups = set(expanded)
        item_of: dict[str, str] = {}
        items: dict[str, dict[str, Any]] = {}
        for n in self.nodes:
            if n.group is not None and n.group not in open_groups:
                item_of[n.name] = n.group
                box = items.setdefault(n.group, {"id": n.group, "kind": "group", "nodes": 0, "ops": {}})
                box["nodes"] += 1
                box["ops"][n.op] = box["ops"].get(n.op, 0) + 1
            else:
                item_of[n.name] = n.name
                items[n.name] = {"id": n.name, "kind": "node", "op": n.op, "group": n.group}
        edges = {(item_of[a], item_of[b]): None for a, b in self.edges() if item_of[a] != item_of[b]}
        return {"items": list(items.values()), "edges": [list(e) for e in edges]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": self.source,
            "notes": self.notes,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "nodes": [n.to_dict() for n in self.nodes],
            "shapes": self.shapes,
            "groups": self.groups(),
        }


def block_of(path: str) -> str | None:
    """The repeated block a name belongs to: the part up to its first number, with the two names before it
    (`/model/encoder/layer.3/attention/MatMul` and `encoder.layer.3.attention.self.query` are both
    `encoder.layer.3`), so ONNX node names and torch module paths land in the same block."""
    parts = [p for p in re.split(r"[./]", path) if p]
    for i, part in enumerate(parts):
        if _NUMBERED.match(part) and i > 0:
            return ".".join(parts[max(0, i - 2) : i + 1])
    return None
