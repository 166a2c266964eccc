"""prune.magnitude: zero the smallest weights of Linear / conv layers, keeping every shape.

It zeroes weights with `torch.nn.utils.prune` and makes the masks permanent, so a saved variant needs no
structure record: the zeros are in the saved weights.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register
from studio.techniques.prune.fidelity import report_fidelity
from studio.techniques.prune.surgery import dense_float_weight, is_linear_like, require_module

# Embeddings and output heads are left dense by default: pruning them costs the most quality per weight,
# and the output head is often tied to the input embedding.
DEFAULT_EXCLUDE = ["*embed*", "*lm_head*", "*classifier*", "score", "qa_outputs"]


class MagnitudeParams(Params):
    sparsity: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Fraction of the prunable weights set to zero (0 <= sparsity < 1).",
    )
    scope: Literal["global", "layer"] = Field(
        "global",
        description="global: one magnitude threshold across all prunable layers (layers differ in sparsity); "
        "layer: every layer pruned to the same sparsity by its own threshold.",
    )
    iterations: int = Field(
        1,
        ge=1,
        le=100,
        description="Reach the target in this many steps following `schedule`. Without training between "
        "steps the magnitude order does not change, so the final mask equals one-shot pruning.",
    )
    schedule: Literal["cubic", "linear"] = Field(
        "cubic",
        description="Sparsity after step k of N: cubic s·(1-(1-k/N)^3) (Zhu & Gupta 2017, prunes most "
        "early), or linear s·k/N.",
    )
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="Module name patterns (fnmatch globs) left dense. The default leaves embeddings and "
        "classifier / LM heads dense.",
    )
    keep_output_layer: bool = Field(
        True,
        description="Leave the last Linear/Conv layer of the model (its output layer, e.g. a CNN's classifier) dense.",
    )


def schedule_targets(sparsity: float, iterations: int, kind: str) -> list[float]:
    """Cumulative sparsity after each of `iterations` steps."""
    out = []
    for k in range(1, iterations + 1):
        t = k / iterations
        out.append(sparsity * (1 - (1 - t) ** 3) if kind == "cubic" else sparsity * t)
    out[-1] = sparsity
    return out


# The ATen ops whose argument 1 is a Linear / convolution weight, in an exported graph.
_WEIGHT_OPS = ("linear", "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d")


def graph_weight_layers(module: Any) -> list[tuple[str, Any]] | None:
    """(name, holder) of every Linear / conv weight of an fx GraphModule (an ExportedProgram's module()),
    in the order the graph uses them; None for an ordinary module.

    An exported program keeps the original module names but not its layer types: each layer is a plain
    `Module` holding `weight` and `bias`, so layer types cannot say what to prune. The graph can: a
    parameter passed as the weight of aten.linear / aten.conv* is a layer's weight (an embedding table or a
    norm's scale is not), and pruning that parameter in place is pruning the layer, as for modules."""
    import torch

    graph = getattr(module, "graph", None)
    if not isinstance(module, torch.fx.GraphModule) or graph is None:
        return None
    attrs = {n.name: str(n.target) for n in graph.nodes if n.op == "get_attr"}
    seen: dict[str, Any] = {}
    for node in graph.nodes:
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if node.op != "call_function" or op not in _WEIGHT_OPS or len(node.args) < 2:
            continue
        weight = node.args[1]
        target = attrs.get(getattr(weight, "name", ""), "")
        holder_name, _, leaf = target.rpartition(".")
        if leaf != "weight" or holder_name in seen:
            continue
        holder: Any = module.get_submodule(holder_name) if holder_name else module
        if dense_float_weight(holder) and holder.weight.dim() >= 2:
            seen[holder_name] = holder
    return list(seen.items())


def prunable_layers(module: Any, exclude: Sequence[str], keep_output_layer: bool) -> list[tuple[str, Any]]:
    """(name, module) of every Linear / Conv / GPT-2 Conv1D whose dense float weight may be pruned (for an
    exported program: every weight its graph uses as one, see `graph_weight_layers`)."""
    import torch

    embedding_weights = {
        m.weight.data_ptr()
        for m in module.modules()
        if isinstance(m, torch.nn.Embedding) and m.weight.numel()
    }
    layers = graph_weight_layers(module)
    if layers is None:
        layers = [(n, m) for n, m in module.named_modules() if is_linear_like(m) and dense_float_weight(m)]
    if keep_output_layer and layers:
        layers = layers[:-1]
    return [
        (n, m)
        for n, m in layers
        if not any(fnmatch.fnmatchcase(n, pat) for pat in exclude)
        and m.weight.data_ptr() not in embedding_weights  # an output head tied to the input embedding
    ]


def weight_sparsity(layers: Sequence[tuple[str, Any]]) -> float:
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    total = sum(m.weight.numel() for _, m in layers)
    return zeros / total if total else 0.0


@register
class MagnitudePrune(Technique[MagnitudeParams]):
    id = "prune.magnitude"
    title = "Magnitude pruning"
    category = "pruning"
    input_kind = "torch"
    output_kind = "torch"
    description = (
        "Zeroes the smallest-magnitude weights of Linear/Conv layers (torch.nn.utils.prune, L1 criterion), "
        "globally or per layer, optionally in a cubic or linear schedule. Shapes do not change: the model "
        "only gets faster with a sparse runtime, but it compresses well and the zeros are real in the saved "
        "weights."
    )
    Params = MagnitudeParams

    def run(self, state: StageState, params: MagnitudeParams, ctx: RunContext) -> StageState:
        import torch
        from torch.nn.utils import prune

        module = require_module(state, self.id)
        layers = prunable_layers(module, params.exclude, params.keep_output_layer)
        if not layers:
            raise BadInput(
                "no prunable layers: no Linear/Conv layer with dense float weights is left after `exclude`"
            )
        sizes = [m.weight.numel() for _, m in layers]
        total = sum(sizes)
        targets = schedule_targets(params.sparsity, params.iterations, params.schedule)
        before = weight_sparsity(layers)
        previous = 0.0
        with torch.no_grad():
            for step, target in enumerate(targets, 1):
                # integer counts of weights pruned *in this step*, taken from those still unpruned, so the
                # cumulative sparsity follows the schedule exactly
                if params.scope == "global":
                    amount = round(target * total) - round(previous * total)
                    if amount > 0:
                        prune.global_unstructured(
                            [(m, "weight") for _, m in layers],
                            pruning_method=prune.L1Unstructured,
                            amount=amount,
                        )
                else:
                    for (_, m), n in zip(layers, sizes, strict=True):
                        amount = round(target * n) - round(previous * n)
                        if amount > 0:
                            prune.l1_unstructured(m, "weight", amount=amount)
                previous = target
                ctx.progress(step / len(targets), f"magnitude pruning: step {step}/{len(targets)}")
                if len(targets) > 1:
                    ctx.log(f"step {step}/{len(targets)}: target sparsity {target:.4f}")
            for _, m in layers:
                if prune.is_pruned(m):
                    prune.remove(m, "weight")  # permanent: real zeros, no weight_orig / weight_mask
        achieved = weight_sparsity(layers)
        ctx.log(
            f"{len(layers)} layers, {total:,} prunable weights: sparsity {before:.4f} -> {achieved:.4f} "
            f"({params.scope} scope)"
        )
        ctx.metric("sparsity", achieved, scope=params.scope, layers=len(layers), weights=total)
        report_fidelity(ctx, state.model, module)
        return dataclasses.replace(state, module=module, info={**state.info, "sparsity": round(achieved, 6)})
