"""The graph of a torch model: its data flow as `torch.export` captures it, or its leaf-module calls where
export cannot capture the model.

From `torch.export` (non-strict, the family's batch of two examples, the call the studio's runner makes):
the ATen nodes are grouped by the innermost leaf module that ran them, one node per leaf module call
(`encoder.layer.0.attention.self.query`, a Linear), and the functional ops between modules are nodes of
their own, named by the module they ran in (`encoder.layer.0.attention.output/add`); edges are the FX
nodes' users, so a residual add reads both the dense output and the block's input. Node names are the
module paths the time shares, layer errors and the diff against ONNX match on.

From forward hooks (the fallback, said so in the graph's `notes`): a node per leaf call and tensors known
by identity, so an edge joins only a module that made a tensor to a module that reads it; the functional
ops between modules (adds, attention products) are not seen.
"""

from __future__ import annotations

import contextlib
import io
import operator
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from studio.errors import BadInput
from studio.inspection.graph_model import Graph, GraphNode, block_of

if TYPE_CHECKING:
    from studio.families import Batch

WRAPPER_ROOT = "model"  # the attribute the export wrapper holds the module under: stripped from paths
EXPORT_SOURCE = "torch.export"
HOOKS_SOURCE = "module hooks"
# The scope of the ops the family's forward runs on the model's output outside any module (an encoder's
# pooling): `forward/mean`; ops in the model's root module are `/to`, `/arange` (the attention mask).
FORWARD_SCOPE = "forward"
# Ops returning their input unchanged when dtype, device and shape stay (`.to(float32)` of a float32
# tensor, `x[:, -0:]`): their readers read the input, so a residual add reads the layer's input, not
# the norm that cast it.
ALIAS_OPS = ("to", "alias", "detach", "contiguous")


def torch_graph(model: Any, examples: Sequence[Any] | None = None, sequence_length: int = 16) -> Graph:
    """The graph of a runnable torch checkpoint: `torch.export`'s data flow where the model exports, else
    the leaf calls forward hooks see while one batch of two examples runs (the graph's notes say why)."""
    from studio.evaluation.data import load_examples
    from studio.families import family_for

    family = family_for(model)
    batch = family.batch(model, examples or load_examples("builtin:sentences", 2), sequence_length)
    try:
        return exported_graph(model, batch)
    except Exception as exc:  # torch.export raises many types (guard errors, Unsupported, UserError)
        graph = hooked_graph(model, batch)
        graph.notes.append(
            f"torch.export could not capture the model ({export_failure(exc)}): the graph comes from "
            "module hooks, so only modules passing tensors to one another are joined"
        )
        return graph


def export_failure(exc: BaseException) -> str:
    """The first line of torch.export's error, shortened."""
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:240]


# ------------------------------------------------------------------------------------------- torch.export


def exported_graph(model: Any, batch: Batch) -> Graph:
    """The data-flow graph of `torch.export.export(..., strict=False)` on the family's forward of `batch`."""
    import torch
    from torch.export.graph_signature import InputKind

    from studio.families import Batch, family_for

    module = model.module
    family = family_for(model)
    names = list(batch.inputs)
    labels = batch.labels

    class Forward(torch.nn.Module):
        """The family's forward (what the runner calls) taking the batch's tensors positionally."""

        def __init__(self) -> None:
            super().__init__()
            setattr(self, WRAPPER_ROOT, module)

        def forward(self, *args: Any) -> Any:
            inputs = dict(zip(names, args[: len(names)], strict=True))
            rest = args[len(names) :]
            return family.forward(
                getattr(self, WRAPPER_ROOT), Batch(inputs=inputs, labels=rest[0] if rest else None)
            )

    args = tuple(batch.inputs[n] for n in names) + ((labels,) if labels is not None else ())
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    if weight is not None:  # where the runner puts them: on the weights' device, images in their precision
        args = tuple(a.to(weight.device, weight.dtype if a.is_floating_point() else a.dtype) for a in args)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(Forward(), args, strict=False)

    leaves = leaf_modules(module)
    weight_of: dict[str, str] = {}  # placeholder -> the torch parameter or buffer it is
    tensor_of: dict[str, str] = {}  # FX node -> the tensor name the graph calls it
    user_inputs: list[str] = []
    for spec in program.graph_signature.input_specs:
        arg = getattr(spec.arg, "name", None)
        if arg is None:
            continue
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target:
            weight_of[arg] = strip_root(spec.target)
        elif spec.kind == InputKind.USER_INPUT:
            label = [*names, "labels"][len(user_inputs)]
            tensor_of[arg] = label
            user_inputs.append(label)

    fx_nodes = list(program.graph.nodes)
    placeholders = {n.name: n for n in fx_nodes if n.op == "placeholder"}
    member: dict[str, int] = {}  # FX node -> index of the graph node it is part of
    groups: list[dict[str, Any]] = []  # {"name", "op", "module", "fx": [FX nodes]}
    call_of: dict[str, int] = {}  # nn_module_stack key of a leaf call -> its group
    per_scope: dict[str, int] = {}
    leaf_calls: dict[str, int] = {}
    alias: dict[str, Any] = {}  # FX node -> the node whose tensor it returns unchanged

    def resolve(node: Any) -> Any:
        return alias.get(node.name, node)

    for n in fx_nodes:
        if n.op != "call_function":
            continue
        if n.target is operator.getitem and n.args and getattr(n.args[0], "name", None) in member:
            member[n.name] = member[n.args[0].name]  # one output of a multi-output op: its producer's
            groups[member[n.name]]["fx"].append(n)
            continue
        if not n.users and not _is_tensor(n.meta.get("val")):
            continue  # runtime asserts and other bookkeeping without an output
        if _is_alias(n):
            alias[n.name] = resolve(n.all_input_nodes[0])  # `.to(float32)` of a float32 tensor is itself
            continue
        stack = list((n.meta.get("nn_module_stack") or {}).items())
        leaf = next(((key, strip_root(path)) for key, (path, _) in stack if strip_root(path) in leaves), None)
        if leaf is not None:
            key, path = leaf
            if key not in call_of:
                count = leaf_calls.get(path, 0)
                leaf_calls[path] = count + 1
                call_of[key] = len(groups)
                groups.append(
                    {
                        "name": path if count == 0 else f"{path}#{count}",
                        "op": type(leaves[path]).__name__,
                        "module": leaves[path],
                        "fx": [],
                    }
                )
            index = call_of[key]
        else:
            raw = stack[-1][1][0] if stack else ""
            scope = FORWARD_SCOPE if raw == "" else strip_root(raw)  # the family's own ops (pooling)
            op = _op_name(n.target)
            seen = per_scope.get(f"{scope}/{op}", 0)
            per_scope[f"{scope}/{op}"] = seen + 1
            index = len(groups)
            groups.append(
                {"name": f"{scope}/{op}" + (f"_{seen}" if seen else ""), "op": op, "module": None, "fx": []}
            )
        member[n.name] = index
        groups[index]["fx"].append(n)

    outputs_fx = [
        resolve(a) for a in _flat(next(n for n in fx_nodes if n.op == "output").args) if hasattr(a, "name")
    ]
    readers: dict[str, list[Any]] = {}  # FX node -> the grouped nodes reading it (through casts)
    for n in fx_nodes:
        if n.name in member:
            for src in n.all_input_nodes:
                readers.setdefault(resolve(src).name, []).append(n)
    for n in fx_nodes:
        if n.name in member:
            tensor_of[n.name] = n.name
    shapes: dict[str, list[Any]] = {}
    for n in fx_nodes:
        val = n.meta.get("val")
        if n.name in tensor_of and _is_tensor(val):
            shapes[tensor_of[n.name]] = [d if isinstance(d, int) else str(d) for d in val.shape]
    wanted_outside = {a.name for a in outputs_fx}
    nodes: list[GraphNode] = []
    for index, g in enumerate(groups):
        inputs: list[str] = []
        weights: list[dict[str, Any]] = []
        outputs: list[str] = []
        for n in g["fx"]:
            for src in map(resolve, n.all_input_nodes):
                if member.get(src.name) == index:
                    continue
                if src.name in weight_of:
                    val = placeholders[src.name].meta.get("val")
                    if (
                        _is_tensor(val)
                        and val.dim() >= 1
                        and all(w["name"] != weight_of[src.name] for w in weights)
                    ):
                        weights.append(
                            {
                                "name": weight_of[src.name],
                                "shape": list(val.shape),
                                "dtype": str(val.dtype).removeprefix("torch."),
                                "torch": [weight_of[src.name]],
                            }
                        )
                elif src.name in tensor_of and tensor_of[src.name] not in inputs:
                    inputs.append(tensor_of[src.name])
            if n.name in wanted_outside or any(member.get(r.name) != index for r in readers.get(n.name, [])):
                outputs.append(tensor_of[n.name])
        node = GraphNode(g["name"], g["op"], inputs, outputs, weights=weights)
        node.precision = torch_precision(g["module"], weights) if g["module"] is not None else None
        node.group = block_of(g["name"])
        nodes.append(node)
    if not nodes:
        raise BadInput("torch.export captured no operation: there is no graph to show", path=model.path)
    return Graph(
        kind="torch",
        source=EXPORT_SOURCE,
        nodes=nodes,
        shapes=shapes,
        inputs=user_inputs,
        outputs=[tensor_of[a.name] for a in outputs_fx if a.name in tensor_of],
    )


def leaf_modules(module: Any) -> dict[str, Any]:
    """Path -> module for the modules whose calls are graph nodes: those without children, and those
    whose only children hold packed weights (a dynamic INT8 Linear's `_packed_params`: the Linear is the
    layer, its packed parameters are never called)."""
    return {
        name: m
        for name, m in module.named_modules()
        if name and not _packed(m) and all(_packed(c) for c in m.children())
    }


def _packed(module: Any) -> bool:
    return "packed" in type(module).__name__.lower()


def strip_root(path: str) -> str:
    """A module path in the export wrapper (`model.encoder.layer.0`) as a path in the model."""
    if path == WRAPPER_ROOT:
        return ""
    return path.removeprefix(WRAPPER_ROOT + ".")


def _op_name(target: Any) -> str:
    """`aten.scaled_dot_product_attention.default` -> `scaled_dot_product_attention`."""
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(target, "__name__", None) or str(target)
    return name.split(".")[-1]


def _is_alias(node: Any) -> bool:
    """A `.to(...)` or alias returning its input's tensor: the same dtype, device and shape."""
    if _op_name(node.target) not in ALIAS_OPS or len(node.all_input_nodes) != 1:
        return False
    out, src = node.meta.get("val"), node.all_input_nodes[0].meta.get("val")
    if not (_is_tensor(out) and _is_tensor(src)):
        return False
    return bool(out.dtype == src.dtype and out.device == src.device and list(out.shape) == list(src.shape))


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _flat(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    return [value]


# -------------------------------------------------------------------------------------------- module hooks


def hooked_graph(model: Any, batch: Batch) -> Graph:
    """The graph of a runnable torch checkpoint from forward hooks on its leaf modules while `batch` runs:
    a node per leaf call, tensors known by identity, so an edge joins the module that made a tensor to each
    module that reads it."""
    import torch

    module = model.module
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
        m.register_forward_hook(hook(name, m), with_kwargs=True) for name, m in leaf_modules(module).items()
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
    return Graph(kind="torch", source=HOOKS_SOURCE, nodes=nodes, shapes=shapes)


def torch_precision(module: Any, weights: list[dict[str, Any]]) -> str | None:
    kind = type(module).__module__
    if "quantized" in kind:
        return "int8"
    for w in weights:
        if w["dtype"] in ("bfloat16", "float16", "float32", "int8", "qint8"):
            return w["dtype"].removeprefix("q")
    return "float32" if weights else None
