"""The module tree of a checkpoint and its whole-model breakdown, from tensor names and shapes alone.

Nothing here reads weights: `LoadedModel.tensors()` gives names, shapes and dtypes from the file headers,
so the Model tab fills at once even for checkpoints of many gigabytes.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from studio.checkpoints.base import TensorRef
from studio.inspection.stats import tensor_bytes


@dataclass
class Node:
    name: str  # the label shown (dotted when single-child modules were merged)
    path: str  # full dotted path
    ref: TensorRef | None = None
    children: OrderedDict[str, Node] = field(default_factory=OrderedDict)

    @property
    def params(self) -> int:
        return self.ref.numel if self.ref is not None else sum(c.params for c in self.children.values())

    @property
    def dtypes(self) -> set[str]:
        if self.ref is not None:
            return {self.ref.dtype}
        out: set[str] = set()
        for c in self.children.values():
            out |= c.dtypes
        return out

    @property
    def tensor_count(self) -> int:
        return 1 if self.ref is not None else sum(c.tensor_count for c in self.children.values())


def _child_key(item: tuple[int, tuple[str, Node]]) -> tuple[int, int]:
    order, (name, _) = item
    return (0, int(name)) if name.isdigit() else (1, order)


def build_module_tree(refs: list[TensorRef]) -> Node:
    """The module hierarchy from dotted tensor names; numbered children in numeric order, and chains of
    single-child modules merged ("encoder" > "layer" becomes "encoder.layer")."""
    root = Node("", "")
    for ref in refs:
        node = root
        parts = ref.name.split(".")
        for i, part in enumerate(parts):
            path = ".".join(parts[: i + 1])
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = Node(part, path)
            node = child
        node.ref = ref

    def tidy(node: Node) -> Node:
        items = sorted(enumerate(node.children.items()), key=_child_key)
        node.children = OrderedDict((name, tidy(child)) for _, (name, child) in items)
        while node.ref is None and node.path and len(node.children) == 1:
            only = next(iter(node.children.values()))
            if only.ref is not None:
                break
            node.name = f"{node.name}.{only.name}"
            node.path = only.path
            node.children = only.children
        return node

    return tidy(root)


_INDEX = re.compile(r"^\d+$")


def layer_type(name: str) -> str:
    """What kind of layer a tensor belongs to, for the whole-model breakdown: the module path after the
    last block index, without the parameter name ("encoder.layer.3.attention.self.query.weight" ->
    "attention.self.query"); unnumbered modules keep their last two components."""
    parts = name.split(".")
    module = parts[:-1] if len(parts) > 1 else parts
    numbered = [i for i, p in enumerate(module) if _INDEX.match(p)]
    if numbered:
        rest = module[numbered[-1] + 1 :]
        return ".".join(rest) if rest else parts[-1]
    return ".".join(module[-2:]) if module else parts[-1]


def whole_model_summary(refs: list[TensorRef]) -> dict[str, Any]:
    by_type: dict[str, int] = {}
    by_dtype: dict[str, list[int]] = {}  # dtype -> [tensors, params, bytes]
    for ref in refs:
        by_type[layer_type(ref.name)] = by_type.get(layer_type(ref.name), 0) + ref.numel
        row = by_dtype.setdefault(ref.dtype, [0, 0, 0])
        row[0] += 1
        row[1] += ref.numel
        row[2] += tensor_bytes(ref)
    return {
        "params": sum(r.numel for r in refs),
        "tensors": len(refs),
        "bytes": sum(v[2] for v in by_dtype.values()),
        "by_type": sorted(by_type.items(), key=lambda kv: -kv[1]),
        "by_dtype": sorted(by_dtype.items(), key=lambda kv: -kv[1][2]),
    }
