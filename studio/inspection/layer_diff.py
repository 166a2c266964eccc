"""Layer-wise error of one model against another (Polygraphy-style): every intermediate layer output of
both on the same few examples, compared layer by layer, and the first layer where the error jumps.

Layers are torch modules by path (`encoder.layer.2.intermediate.dense`). A torch model gives them through
forward hooks; an ONNX graph through a temporary copy that returns every node's output, each module's
output being that of the last node reading only that module's weights (export.onnx records which torch
weight each initializer holds), so a graph compares with its torch original as well as with another graph.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studio.errors import BadInput

JUMP_FLOOR = 1e-3  # relative errors below this are float rounding, never a jump
JUMP_FACTOR = 10.0  # a jump: an error this many times the largest one before it
# Ops whose output is exactly a torch module's output when they are the last to read its weights (a Linear's
# bias Add, an Embedding's Gather, a LayerNorm, an RMSNorm's Mul). Fused kernels (BiasGelu, Attention,
# SkipLayerNormalization) add an activation or another module's work, so their outputs match no module.
MODULE_OUTPUT_OPS = {
    "Add", "MatMul", "Gemm", "Conv", "Gather", "LayerNormalization", "SimplifiedLayerNormalization", "Mul",
    "MatMulNBits", "DynamicQuantizeMatMul", "FusedMatMul", "BatchNormalization",
}  # fmt: skip


def torch_layer_outputs(model: Any, batch: Any) -> list[tuple[str, Any]]:
    """(module path, its first output as float64 numpy) for each module holding weights, in call order."""
    import torch

    from studio.evaluation.runners import TorchRunner

    module = model.module
    seen: dict[str, Any] = {}

    def hook(name: str) -> Any:
        def after(_m: Any, _args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if name not in seen and isinstance(out, torch.Tensor) and out.is_floating_point():
                seen[name] = out.detach().double().cpu().numpy()

        return after

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in module.named_modules()
        if name and (any(True for _ in m.parameters(recurse=False)) or "quantized" in type(m).__module__)
    ]
    try:
        TorchRunner(module, model)(batch)
    finally:
        for h in handles:
            h.remove()
    return list(seen.items())


def onnx_layer_tensors(path: Path) -> dict[str, str]:
    """Module path -> the graph tensor holding that module's output."""
    from studio.inspection.graph import onnx_graph

    graph = onnx_graph(path)
    last_single: dict[str, tuple[int, str]] = {}
    last_any: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        modules = node.modules()
        for m in modules:
            last_any[m] = index
        if len(modules) == 1 and node.outputs and node.op in MODULE_OUTPUT_OPS:
            last_single[modules[0]] = (index, node.outputs[0])
    # a module whose weights a fused node reads after that node has no output of its own in the graph
    return {m: tensor for m, (index, tensor) in last_single.items() if last_any[m] == index}


def onnx_layer_outputs(model: Any, batch: Any) -> list[tuple[str, Any]]:
    """Every module's output of an ONNX graph, from a temporary copy that lists those tensors as outputs."""
    import numpy as np
    import onnx

    from studio.checkpoints.onnx_graph import load_onnx_graph
    from studio.evaluation.runners import OnnxRunner, graph_feeds

    path = Path(model.path)
    wanted = onnx_layer_tensors(path)
    proto = load_onnx_graph(path)
    declared = {o.name for o in proto.graph.output}
    for tensor in dict.fromkeys(wanted.values()):
        if tensor not in declared:
            proto.graph.output.append(onnx.ValueInfoProto(name=tensor))
    with tempfile.TemporaryDirectory(prefix="studio-layers-") as tmp:
        for side in path.parent.iterdir():  # external weight files, found by their relative names
            if side.is_file() and side != path:
                (Path(tmp) / side.name).symlink_to(side.resolve())
        copy = Path(tmp) / path.name
        copy.write_bytes(proto.SerializeToString())
        runner = OnnxRunner(copy, model, device="cpu")
        feeds = graph_feeds(batch, runner.inputs, runner.family, runner.config)
        names = list(dict.fromkeys(wanted.values()))
        values = dict(zip(names, runner.session.run(names, feeds), strict=True)) if names else {}
        del runner
    out = []
    for module, tensor in wanted.items():
        value = np.asarray(values[tensor])
        if value.dtype.kind == "f":
            out.append((module, value.astype(np.float64)))
    return out


def layer_outputs(model: Any, batch: Any) -> list[tuple[str, Any]]:
    from studio.checkpoints.stage import stage_of

    return (
        onnx_layer_outputs(model, batch) if stage_of(model) == "onnx" else torch_layer_outputs(model, batch)
    )


def compare_layers(a: Sequence[tuple[str, Any]], b: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Per layer present in both (in A's order): cosine and relative error (|b - a| / |a|) of B's output
    against A's, and `first_jump`: the first layer whose error is at least JUMP_FLOOR and JUMP_FACTOR times
    the largest error before it."""
    import numpy as np

    b_by_name = dict(b)
    layers = []
    first_jump = None
    worst = 0.0
    for name, va in a:
        vb = b_by_name.get(name)
        if vb is None or va.size != vb.size:
            continue
        x, y = va.reshape(-1), vb.reshape(-1)
        na, nb, dist = float(np.linalg.norm(x)), float(np.linalg.norm(y)), float(np.linalg.norm(y - x))
        cosine = 1.0 if na == 0 and nb == 0 else (float(x @ y) / (na * nb) if na and nb else 0.0)
        relative = dist / na if na else (0.0 if dist == 0 else math.inf)
        if dist == 0:
            cosine = 1.0
        layers.append({"name": name, "cosine": min(1.0, cosine), "relative_error": relative})
        if first_jump is None and relative >= max(JUMP_FLOOR, JUMP_FACTOR * worst):
            first_jump = name
        worst = max(worst, relative)
    return {"layers": layers, "first_jump": first_jump}


def layer_diff(
    a: Any, b: Any, *, examples: Sequence[Any] | None = None, sequence_length: int = 32
) -> dict[str, Any]:
    """`model-studio diff`: the layer-wise error of checkpoint B against checkpoint A on a few examples."""
    from studio.evaluation.data import load_examples
    from studio.families import family_for

    fed = a if a.tokenizer_dir is not None or b.tokenizer_dir is None else b
    family = family_for(fed)
    batch = family.batch(fed, examples or load_examples("builtin:sentences", 4), sequence_length)
    result = compare_layers(layer_outputs(a, batch), layer_outputs(b, batch))
    if not result["layers"]:
        raise BadInput(
            "the two models have no layer in common (no torch module of one matched a module of the other by "
            "name): diff compares a model with its own variants; a fused graph (after onnx.optimize) keeps "
            "few module outputs, so compare the graph before the fusion"
        )
    return result
