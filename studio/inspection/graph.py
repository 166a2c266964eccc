"""The computation graph of a variant as plain data: nodes with their op, tensors, shapes, attributes,
weights and precision, grouped into repeated blocks (their structural diff is `graph_diff`).

ONNX graphs are read from the file (shapes from ONNX shape inference); torch models are traced by
forward hooks on their leaf modules while one small batch runs, so any module the studio can run has a
graph, whatever `torch.export` accepts. The GUI's graph view and the `graph`/`diagnose` verbs share this
model; nothing here draws.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.checkpoints.onnx_graph import QUANT_OPS
from studio.errors import BadInput

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Ops that compute in integers: those of a quantized graph less the Q/DQ glue, and ORT's fused integer kernels.
INT_OPS = (QUANT_OPS - QDQ_OPS) | {"QEmbedLayerNormalization", "QGemm"}
# Ops whose cost is a matrix product: the ones quantization is for.
MATMUL_OPS = {"MatMul", "Gemm", "Attention", "FusedMatMul", "Conv", "Linear", "Conv1D", "Conv2d"}
_ELEM = {
    1: "float32",
    10: "float16",
    16: "bfloat16",
    11: "float64",
    3: "int8",
    2: "uint8",
    22: "int4",
    21: "uint4",
}
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


# ------------------------------------------------------------------------------------------------ ONNX


def onnx_graph(path: Path) -> Graph:
    """The graph of an ONNX file. Unnamed nodes are called `<op>_<index>` (what ONNX Runtime's profiler calls
    them too); weights are named as export.onnx recorded them in torch (`studio.weight_names`)."""
    from onnx import helper

    from studio.checkpoints.onnx_graph import load_onnx_graph, metadata_of

    proto = load_onnx_graph(Path(path))
    names = json.loads(metadata_of(proto).get("studio.weight_names") or "{}")
    inferred = _inferred(proto)
    shapes: dict[str, list[Any]] = {}
    types: dict[str, str] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        types[vi.name] = _ELEM.get(t.elem_type, "other")
    inits = {i.name: i for i in proto.graph.initializer}
    for init in inits.values():
        shapes[init.name] = [int(d) for d in init.dims]
        types[init.name] = _ELEM.get(init.data_type, "other")
    quantized_graph = any(
        n.op_type in INT_OPS | QDQ_OPS or n.op_type == "MatMulNBits" for n in proto.graph.node
    )
    nodes = []
    for index, n in enumerate(proto.graph.node):
        weights = []
        for t in n.input:
            if t not in inits:
                continue
            entry = names.get(t) or names.get(t.removesuffix("_quantized"))
            parts = entry["parts"] if isinstance(entry, dict) else ([entry] if entry else [])
            torch_names = [p[0] for p in parts if isinstance(p, list)]
            weights.append({"name": t, "shape": shapes[t], "dtype": types[t], "torch": torch_names})
        attributes = {a.name: _attribute(helper.get_attribute_value(a)) for a in n.attribute}
        node = GraphNode(
            name=n.name or f"{n.op_type}_{index}",
            op=n.op_type,
            inputs=[t for t in n.input if t],
            outputs=[t for t in n.output if t],
            attributes=attributes,
            weights=weights,
        )
        node.precision = onnx_precision(node, [types.get(t, "other") for t in node.outputs], quantized_graph)
        node.group = block_of(node.name) if n.name else None
        if node.group is None and node.modules():
            node.group = block_of(node.modules()[0])
        nodes.append(node)
    adopt_into_consumer_blocks(nodes)
    return Graph(
        kind="onnx",
        nodes=nodes,
        shapes=shapes,
        inputs=[i.name for i in proto.graph.input if i.name not in inits],
        outputs=[o.name for o in proto.graph.output],
    )


def adopt_into_consumer_blocks(nodes: list[GraphNode]) -> None:
    """Put a node without a block into the block of its readers when they all sit in one: the unnamed
    Constants and shape arithmetic an exporter emits for a layer would otherwise stay outside the collapsed
    layer, hundreds of loose boxes (a 32-layer Llama has over 500). Walked backwards so chains follow."""
    readers: dict[str, list[GraphNode]] = {}
    for n in nodes:
        for t in n.inputs:
            readers.setdefault(t, []).append(n)
    for n in reversed(nodes):
        if n.group is not None:
            continue
        blocks = {r.group for t in n.outputs for r in readers.get(t, [])}
        if len(blocks) == 1 and None not in blocks:
            n.group = blocks.pop()


def _inferred(proto: Any) -> Any:
    """The graph with the shapes of its intermediate tensors (contrib ops such as Attention stay unknown).
    Inference runs on a copy whose large weights are declared inputs, so a big graph is not serialized whole;
    small constants (the shapes a Reshape reads) stay, or their outputs could not be inferred."""
    import onnx
    from onnx import helper

    light = onnx.GraphProto(name=proto.graph.name)
    light.node.extend(proto.graph.node)
    light.input.extend(proto.graph.input)
    light.output.extend(proto.graph.output)
    for init in proto.graph.initializer:
        size = 1
        for d in init.dims:
            size *= int(d)
        if size <= 4096 and not init.external_data:
            light.initializer.append(init)
        else:
            light.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    model = helper.make_model(light, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # a graph shape inference cannot follow still has a graph, without inner shapes
        return proto


def onnx_precision(node: GraphNode, output_types: Sequence[str], quantized_graph: bool) -> str | None:
    """float32 / float16 / bfloat16 / int8 / int4, or "float (excluded)" for a matrix product left in float
    in a graph whose other products were quantized; None for nodes that move integers (shapes, ids)."""
    if node.op == "MatMulNBits":
        return "int4" if int(node.attributes.get("bits", 4)) == 4 else "int8"
    if node.op in INT_OPS or node.op in QDQ_OPS:
        return "int8"
    matrix_types = {w["dtype"] for w in node.weights if len(w["shape"]) >= 2}
    for low in ("int4", "uint4", "int8", "uint8"):
        if low in matrix_types:
            return low.removeprefix("u")
    floats = {w["dtype"] for w in node.weights} | {
        t for t in output_types if t.startswith(("float", "bfloat"))
    }
    for dtype in ("bfloat16", "float16", "float32", "float64"):
        if dtype in floats:
            if quantized_graph and node.op in MATMUL_OPS and dtype == "float32" and node.weights:
                return "float (excluded)"
            return dtype
    return None


def _attribute(value: Any) -> Any:
    """An attribute as JSON: tensors and graphs are described, not copied."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_attribute(v) for v in value]
    return type(value).__name__


# ------------------------------------------------------------------------------------------------ torch


def torch_graph(model: Any, examples: Sequence[Any] | None = None, sequence_length: int = 16) -> Graph:
    """The graph of a runnable torch checkpoint, from forward hooks on its leaf modules while one batch of
    two examples runs: a node per leaf call, tensors known by identity, so an edge joins the module that
    made a tensor to each module that reads it."""
    import torch

    from studio.evaluation.data import load_examples
    from studio.families import family_for

    module = model.module
    family = family_for(model)
    batch = family.batch(model, examples or load_examples("builtin:sentences", 2), sequence_length)
    nodes: list[GraphNode] = []
    made: dict[int, str] = {}
    shapes: dict[str, list[Any]] = {}
    keep: list[Any] = []  # tensors seen stay alive, so their ids stay unique during the run

    def tensors(value: Any) -> list[Any]:
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, (list, tuple)):
            return [t for v in value for t in tensors(v)]
        if isinstance(value, dict):
            return [t for v in value.values() for t in tensors(v)]
        return [
            t for v in getattr(value, "__dict__", {}).values() if isinstance(v, torch.Tensor) for t in [v]
        ]

    def hook(name: str, mod: Any) -> Any:
        def after(_mod: Any, args: Any, kwargs: Any, output: Any) -> None:
            call = f"{name}#{sum(1 for n in nodes if n.name.split('#')[0] == name)}"
            label = name if not any(n.name == name for n in nodes) else call
            ins = [made.get(id(t), f"input:{i}") for i, t in enumerate(tensors((args, kwargs)))]
            outs = []
            for i, t in enumerate(tensors(output)):
                tensor_name = f"{label}:{i}"
                made[id(t)] = tensor_name
                shapes[tensor_name] = list(t.shape)
                keep.append(t)
                outs.append(tensor_name)
            weights = [
                {
                    "name": f"{name}.{p}",
                    "shape": list(v.shape),
                    "dtype": str(v.dtype).removeprefix("torch."),
                    "torch": [f"{name}.{p}"],
                }
                for p, v in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
                if v.dim() >= 1
            ]
            node = GraphNode(label, type(mod).__name__, ins, outs, weights=weights)
            node.precision = torch_precision(mod, weights)
            node.group = block_of(name)
            nodes.append(node)

        return after

    handles = [
        m.register_forward_hook(hook(name, m), with_kwargs=True)
        for name, m in module.named_modules()
        if name and (not list(m.children()) or "packed" in type(m).__name__.lower())
    ]
    try:
        with torch.inference_mode():
            from studio.evaluation.runners import TorchRunner

            TorchRunner(module, model)(batch)
    finally:
        for h in handles:
            h.remove()
    if not nodes:
        raise BadInput("the model ran but no module was called: there is no graph to show", path=model.path)
    return Graph(kind="torch", nodes=nodes, shapes=shapes)


def torch_precision(module: Any, weights: list[dict[str, Any]]) -> str | None:
    kind = type(module).__module__
    if "quantized" in kind:
        return "int8"
    for w in weights:
        if w["dtype"] in ("bfloat16", "float16", "float32", "int8", "qint8"):
            return w["dtype"].removeprefix("q")
    return "float32" if weights else None


def graph_of(model: Any) -> Graph:
    """The graph of an opened checkpoint: the file's graph for ONNX, the traced leaf calls for torch."""
    if model.format == "onnx":
        return onnx_graph(model.path)
    return torch_graph(model)
