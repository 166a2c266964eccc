"""The computation graph of a variant as plain data: nodes with their op, tensors, shapes, attributes,
weights and precision, grouped into repeated blocks (their structural diff is `graph_diff`).

ONNX graphs are read from the file (shapes from ONNX shape inference); torch models are captured by
`torch.export`, or traced by forward hooks on their leaf modules where it cannot capture them
(`torch_graph`), so any module the studio can run has a graph. The GUI's graph view and the
`graph`/`diagnose` verbs share this model (`graph_model`); nothing here draws.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studio.checkpoints.onnx_graph import QUANT_OPS
from studio.inspection.graph_model import Graph, GraphNode, block_of
from studio.inspection.torch_graph import torch_graph

__all__ = ["Graph", "GraphNode", "block_of", "graph_of", "onnx_graph", "torch_graph"]

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
        source="onnx",
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


def graph_of(model: Any) -> Graph:
    """The graph of an opened checkpoint: the file's graph for ONNX, the exported (or traced) one for torch."""
    if model.format == "onnx":
        return onnx_graph(model.path)
    return torch_graph(model)
