"""Pruning blocks: zeroing weights (magnitude), removing FFN neurons / conv channels (structured) and
removing attention heads (heads).

Magnitude pruning keeps every shape: it zeroes weights with `torch.nn.utils.prune` and makes the masks
permanent, so a saved variant needs no structure record. Structured and head pruning make the model
smaller and dense: they slice weight matrices, update the attributes the transformers 5 forward reads,
and append a transform record from which `restore` re-creates the same shapes on a model freshly built
from the config (see studio/techniques/torch_io.py).

Index conventions in the records: head and neuron indices refer to the model as it was when that step
ran, so several pruning steps replay correctly in order.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register

# Embeddings and output heads are left dense by default: pruning them costs the most quality per weight,
# and the output head is often tied to the input embedding.
DEFAULT_EXCLUDE = ["*embed*", "*lm_head*", "*classifier*", "score", "qa_outputs"]
FIDELITY_EXAMPLES = 16


# ----------------------------------------------------------------------------------------- shared helpers


def _is_conv1d(module: Any) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _is_linear_like(module: Any) -> bool:
    import torch

    return isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) or (
        _is_conv1d(module)
    )


def _dense_float_weight(module: Any) -> bool:
    import torch

    w = getattr(module, "weight", None)
    return isinstance(w, torch.nn.Parameter) and type(w.data) is torch.Tensor and w.is_floating_point()


def _param_count(module: Any) -> int:
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _require_module(state: StageState, technique: str) -> Any:
    import torch

    if state.kind != "torch" or not isinstance(state.module, torch.nn.Module):
        raise BadInput(f"{technique} needs a torch module (this stage holds a {state.kind} model)")
    if isinstance(state.module, torch.jit.ScriptModule):
        raise BadInput(
            f"{technique} cannot change a TorchScript module (its code is compiled); open the original "
            "Python model (a Hugging Face folder or a trusted pickled module) instead",
            path=state.model.path,
        )
    return state.module


def _loaded_with(model: Any, module: Any) -> Any:
    """A copy of the LoadedModel whose `.module` is `module` (the current stage, not the original)."""
    return dataclasses.replace(model, module_factory=lambda: module)


def report_fidelity(ctx: RunContext, model: Any, module: Any) -> dict[str, float]:
    """How far the pruned module moved from the original on up to 16 calibration examples, as metrics:
    `fidelity_cosine` (mean cosine of pooled embeddings) for encoders, `output_divergence` for every family."""
    import torch

    from studio.families import FeatureExtraction, family_for

    examples = list(ctx.calibration)[:FIDELITY_EXAMPLES]
    if not examples or not ctx.original.runnable or ctx.original.format == "onnx":
        return {}
    family = family_for(model)
    if family.takes_text and model.tokenizer_dir is None:
        return {}
    try:
        batch = family.batch(ctx.original, examples, min(ctx.sequence_length, 128))
        with torch.no_grad():
            reference = family.forward(ctx.original.module, batch).float()
            output = family.forward(module, batch).float()
    except Exception as exc:  # advisory only: e.g. an exported reference graph fixed to another batch size
        ctx.log(f"fidelity not measured: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", "warning")
        return {}
    out = {"output_divergence": family.divergence(reference, output, batch)}
    if isinstance(family, FeatureExtraction):
        out["fidelity_cosine"] = float(
            torch.nn.functional.cosine_similarity(reference, output, dim=-1).mean()
        )
    for name, value in out.items():
        ctx.metric(name, value, examples=len(examples))
    return out


# ------------------------------------------------------------------------------------- prune.magnitude


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
        holder = module.get_submodule(holder_name) if holder_name else module
        if _dense_float_weight(holder) and holder.weight.dim() >= 2:
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
        layers = [(n, m) for n, m in module.named_modules() if _is_linear_like(m) and _dense_float_weight(m)]
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
class MagnitudePrune(Technique):
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

        module = _require_module(state, self.id)
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


# ------------------------------------------------------------------------------------- slicing helpers


def _index(idx: Sequence[int], device: Any) -> Any:
    import torch

    return torch.as_tensor(list(idx), dtype=torch.long, device=device)


def out_features(layer: Any) -> int:
    return int(layer.weight.shape[1] if _is_conv1d(layer) else layer.weight.shape[0])


def _set_param(layer: Any, name: str, value: Any) -> None:
    import torch

    old = getattr(layer, name)
    setattr(layer, name, torch.nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def keep_outputs(layer: Any, idx: Sequence[int]) -> None:
    """Keep only output features `idx` of a Linear (weight rows) or Conv1D (weight columns)."""
    import torch

    with torch.no_grad():
        index = _index(idx, layer.weight.device)
        dim = 1 if _is_conv1d(layer) else 0
        _set_param(layer, "weight", layer.weight.index_select(dim, index))
        if getattr(layer, "bias", None) is not None:
            _set_param(layer, "bias", layer.bias.index_select(0, index))
    if _is_conv1d(layer):
        layer.nf = len(idx)
    else:
        layer.out_features = len(idx)


def keep_inputs(layer: Any, idx: Sequence[int]) -> None:
    """Keep only input features `idx` of a Linear (weight columns) or Conv1D (weight rows)."""
    import torch

    with torch.no_grad():
        index = _index(idx, layer.weight.device)
        dim = 0 if _is_conv1d(layer) else 1
        _set_param(layer, "weight", layer.weight.index_select(dim, index))
    if _is_conv1d(layer):
        layer.nx = len(idx)
    else:
        layer.in_features = len(idx)


# ------------------------------------------------------------------------------------ prune.structured


@dataclasses.dataclass
class FFN:
    """One feed-forward block: `up` layers produce the neurons, `down` consumes them."""

    name: str  # the module owning the FFN layers (a transformer layer or an MLP module)
    owner: Any
    up: list[Any]
    down: Any

    @property
    def size(self) -> int:
        return out_features(self.up[0])


def find_ffns(module: Any) -> list[FFN]:
    """Transformer FFN blocks: BERT-style (intermediate.dense / output.dense), Llama-style (gate/up/down
    projections), GPT-2 (mlp.c_fc / mlp.c_proj Conv1D) and BART/Marian-style (fc1 / fc2)."""
    found = []
    for name, m in module.named_modules():
        inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
        if hasattr(inter, "dense") and hasattr(out, "dense") and _dense_float_weight(inter.dense):
            found.append(FFN(name, m, [inter.dense], out.dense))
        elif all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")):
            found.append(FFN(name, m, [m.gate_proj, m.up_proj], m.down_proj))
        elif hasattr(m, "c_fc") and hasattr(m, "c_proj"):
            found.append(FFN(name, m, [m.c_fc], m.c_proj))
        elif hasattr(m, "fc1") and hasattr(m, "fc2") and _is_linear_like(m.fc1) and _is_linear_like(m.fc2):
            found.append(FFN(name, m, [m.fc1], m.fc2))
    return [f for f in found if all(_dense_float_weight(x) for x in (*f.up, f.down))]


def neuron_scores(ffn: FFN) -> Any:
    """L2 norm of each neuron's weights: its rows in the up projections and its column in the down one."""
    import torch

    with torch.no_grad():
        sq = torch.zeros(ffn.size, dtype=torch.float64)
        for layer in ffn.up:
            w = layer.weight.detach().double()
            sq += (w.T if _is_conv1d(layer) else w).pow(2).sum(1).cpu()
        w = ffn.down.weight.detach().double()
        sq += (w if _is_conv1d(ffn.down) else w.T).pow(2).sum(1).cpu()
    return sq.sqrt()


def shrink_ffn(ffn: FFN, keep: Sequence[int]) -> None:
    for layer in ffn.up:
        keep_outputs(layer, keep)
    keep_inputs(ffn.down, keep)
    if isinstance(getattr(ffn.owner, "intermediate_size", None), int):
        ffn.owner.intermediate_size = len(keep)  # LlamaMLP keeps it (informational in transformers 5)


def rounded_size(raw: float, size: int, round_to: int) -> int:
    """`raw` neurons rounded to a multiple of `round_to`, at least one multiple, at most `size`."""
    if size <= round_to:
        return max(1, min(size, round(raw)))
    kept = max(round_to, round(raw / round_to) * round_to)
    return min(kept, size)


class StructuredParams(Params):
    fraction: float | None = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Fraction of the FFN neurons (transformers) or conv channels (CNNs) removed from every "
        "layer, the least important first (L2 norm of the neuron's weights). Null: only the layers in "
        "`sizes` change.",
    )
    sizes: dict[str, int] | None = Field(
        None,
        description="Transformers only: neurons to keep per FFN block, by module name "
        "(e.g. 'encoder.layer.0') or by FFN index ('0'); overrides `fraction` for these blocks.",
    )
    round_to: int = Field(
        8,
        ge=1,
        le=1024,
        description="Kept sizes are rounded to a multiple of this (fast matrix kernels like multiples of 8).",
    )

    @field_validator("sizes")
    @classmethod
    def _positive_sizes(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value is not None and any(v < 1 for v in value.values()):
            raise ValueError("every kept size in `sizes` must be at least 1")
        return value

    @model_validator(mode="after")
    def _something_to_do(self) -> StructuredParams:
        if self.fraction is None and not self.sizes:
            raise ValueError(
                "give `fraction` (remove that share of every FFN) or `sizes` (kept sizes per FFN)"
            )
        return self


@register
class StructuredPrune(Technique):
    id = "prune.structured"
    title = "Structured pruning (FFN neurons / channels)"
    category = "pruning"
    input_kind = "torch"
    output_kind = "torch"
    description = (
        "Removes the least important FFN neurons of every transformer layer (BERT, GPT-2, Llama, "
        "Marian/BART: L2 norm of each neuron's in+out weights), or conv channels of a CNN (torch-pruning "
        "dependency graph, magnitude importance). The result is a smaller dense model that runs faster "
        "everywhere."
    )
    Params = StructuredParams

    def run(self, state: StageState, params: StructuredParams, ctx: RunContext) -> StageState:
        module = _require_module(state, self.id)
        before = _param_count(module)
        ffns = find_ffns(module)
        if ffns:
            record = self._prune_ffns(ffns, params, ctx)
        else:
            if params.sizes:
                raise BadInput("`sizes` applies to transformer FFN blocks; this model has none")
            record = self._prune_channels(module, state, params, ctx)
        after = _param_count(module)
        ctx.log(f"parameters {before:,} -> {after:,} ({1 - after / before:.1%} fewer)")
        ctx.metric("parameters", after, before=before)
        ctx.metric("parameters_removed_fraction", 1 - after / before)
        report_fidelity(ctx, state.model, module)
        return dataclasses.replace(state, module=module, transforms=[*state.transforms, record])

    @staticmethod
    def _targets(ffns: list[FFN], params: StructuredParams) -> dict[str, int]:
        by_index = {str(i): f.name for i, f in enumerate(ffns)}
        names = {f.name for f in ffns}
        explicit: dict[str, int] = {}
        for key, kept in (params.sizes or {}).items():
            name = by_index.get(key, key)
            if name not in names:
                raise BadInput(
                    f"`sizes` names '{key}', which is not an FFN block of this model "
                    f"(FFN blocks: {', '.join(f.name for f in ffns[:4])}{', ...' if len(ffns) > 4 else ''})"
                )
            explicit[name] = kept
        targets = {}
        for f in ffns:
            if f.name in explicit:
                if explicit[f.name] > f.size:
                    raise BadInput(
                        f"`sizes` keeps {explicit[f.name]} neurons in {f.name}, which has {f.size}"
                    )
                targets[f.name] = explicit[f.name]
            elif params.fraction is not None:
                targets[f.name] = rounded_size(f.size * (1 - params.fraction), f.size, params.round_to)
        return targets

    def _prune_ffns(self, ffns: list[FFN], params: StructuredParams, ctx: RunContext) -> dict[str, Any]:
        import torch

        targets = self._targets(ffns, params)
        sizes: dict[str, int] = {}
        for i, f in enumerate(ffns):
            kept = targets.get(f.name, f.size)
            if kept < f.size:
                keep = sorted(torch.topk(neuron_scores(f), kept).indices.tolist())
                ctx.log(f"{f.name}: {f.size} -> {kept} FFN neurons")
                shrink_ffn(f, keep)
            sizes[f.name] = kept
            ctx.progress((i + 1) / len(ffns), f"FFN {i + 1}/{len(ffns)}")
        return {"technique": self.id, "ffn_sizes": sizes}

    def _prune_channels(
        self, module: Any, state: StageState, params: StructuredParams, ctx: RunContext
    ) -> dict[str, Any]:
        import torch
        import torch_pruning as tp

        convs = [
            m
            for m in module.modules()
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and _dense_float_weight(m)
        ]
        if not convs:
            raise BadInput(
                "nothing to prune structurally: no transformer FFN blocks and no Conv layers (an exported or "
                "scripted graph has no layers to cut; use the original Python model)",
                path=state.model.path,
            )
        shape = example_input_shape(state.model)
        example = _example_input(state.model, shape)
        layers = {n: m for n, m in module.named_modules() if _is_linear_like(m) and not _is_conv1d(m)}
        sizes_before = {n: out_features_of(m) for n, m in layers.items()}
        output_layer = list(layers.values())[-1]  # the classifier: its outputs are the classes
        ctx.progress(0.1, "tracing the dependency graph")
        with torch.inference_mode(False), torch.enable_grad():  # the graph is traced through autograd
            pruner = tp.pruner.MagnitudePruner(
                module,
                example,
                importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=params.fraction,
                round_to=params.round_to,
                ignored_layers=[output_layer],
            )
            pruner.step()
        channels = {}
        for n, m in layers.items():
            if out_features_of(m) != sizes_before[n]:
                channels[n] = out_features_of(m)
                ctx.log(f"{n}: {sizes_before[n]} -> {channels[n]} output channels")
        if not channels:
            ctx.log(
                f"no channel was removed: the layers are too small for fraction {params.fraction} "
                f"with round_to {params.round_to}",
                level="warning",
            )
        ctx.progress(1.0, "channels pruned")
        return {"technique": self.id, "channels": channels, "example_input_shape": list(shape)}

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        if "ffn_sizes" in record:
            ffns = {f.name: f for f in find_ffns(module)}
            for name, kept in record["ffn_sizes"].items():
                if name not in ffns:
                    raise BadInput(
                        f"prune.structured record names FFN block '{name}', not in the rebuilt model"
                    )
                f = ffns[name]
                if kept < f.size:
                    shrink_ffn(f, range(kept))  # the values come from the saved weights
        if record.get("channels"):
            _restore_channels(module, record["channels"], record["example_input_shape"])
        return module


def out_features_of(layer: Any) -> int:
    import torch

    if isinstance(layer, torch.nn.modules.conv._ConvNd):
        return int(layer.out_channels)
    return out_features(layer)


def example_input_shape(model: Any) -> tuple[int, ...]:
    from studio.families import image_shape_of

    return (1, *image_shape_of(model))


def _example_input(model: Any, shape: Sequence[int]) -> Any:
    import torch

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return {"pixel_values": x} if model is not None and model.config is not None else x


def _restore_channels(module: Any, channels: dict[str, int], shape: Sequence[int]) -> None:
    """Cut the same output channels on a fresh module through torch-pruning's dependency graph, so that
    the layers fed by them (BatchNorm, next conv, ...) follow."""
    import torch
    import torch_pruning as tp

    example = torch.zeros(*shape)
    if hasattr(module, "config"):
        example = {"pixel_values": example}
    with torch.inference_mode(False), torch.enable_grad():  # the graph is traced through autograd
        graph = tp.DependencyGraph().build_dependency(module, example_inputs=example)
    named = dict(module.named_modules())
    for name, kept in channels.items():
        layer = named.get(name)
        if layer is None:
            raise BadInput(f"prune.structured record names layer '{name}', not in the rebuilt model")
        now = out_features_of(layer)
        if kept >= now:
            continue  # already cut as a dependant of an earlier layer
        fn = (
            tp.prune_conv_out_channels
            if isinstance(layer, torch.nn.modules.conv._ConvNd)
            else tp.prune_linear_out_channels
        )
        graph.get_pruning_group(layer, fn, idxs=list(range(kept, now))).prune()


# ---------------------------------------------------------------------------------------- prune.heads


class HeadsParams(Params):
    fraction: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Remove this fraction of all self-attention heads, least important first (ranked across "
        "layers). Give exactly one of fraction, count, heads.",
    )
    count: int | None = Field(
        None,
        ge=1,
        description="Remove this many self-attention heads, least important first. Give exactly one of "
        "fraction, count, heads.",
    )
    heads: dict[int, list[int]] | None = Field(
        None,
        description="Explicit heads to remove: attention-block index (as in the head-importance view) -> "
        "head indices. Give exactly one of fraction, count, heads.",
    )
    importance: Literal["gradient", "ablation"] = Field(
        "gradient",
        description="How heads are ranked for fraction/count: gradient of the loss w.r.t. a head mask "
        "(Michel et al. 2019) or output change when the head is zeroed. Computed on the calibration data.",
    )
    balance: Literal["layers", "global"] = Field(
        "layers",
        description="For fraction/count. layers: every layer keeps the same number of heads (its least "
        "important go), never more removed than asked: ONNX Runtime fuses attention with one head count "
        "for the whole graph, so uneven counts lose the Attention fusion of onnx.optimize (MiniLM: 285 nodes "
        "instead of 46, b1 about 2.4x slower). global: the least important heads across all layers, which "
        "keeps a little more fidelity but leaves uneven counts",
    )

    @field_validator("heads")
    @classmethod
    def _valid_heads(cls, value: dict[int, list[int]] | None) -> dict[int, list[int]] | None:
        if value is None:
            return value
        for block, heads in value.items():
            if block < 0 or any(h < 0 for h in heads):
                raise ValueError("block and head indices in `heads` must be >= 0")
            if len(set(heads)) != len(heads):
                raise ValueError(f"block {block}: a head is listed twice")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> HeadsParams:
        given = [n for n in ("fraction", "count", "heads") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `fraction` (share of heads), `count` (number of heads) or `heads` "
                f"(explicit block -> head indices); got {', '.join(given) if given else 'none'}"
            )
        return self


@dataclasses.dataclass
class HeadLayout:
    """How one attention block stores its heads (see `head_layout`)."""

    style: str  # "bert" | "gpt2" | "qkv"
    heads: int  # query heads
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def head_layout(block: Any) -> HeadLayout:
    m = block.module
    if hasattr(getattr(m, "self", None), "query") and hasattr(getattr(m, "output", None), "dense"):
        return HeadLayout("bert", block.num_heads, block.num_heads, block.head_dim)
    if hasattr(m, "c_attn") and hasattr(m, "c_proj") and not hasattr(m, "q_attn"):
        return HeadLayout("gpt2", block.num_heads, block.num_heads, block.head_dim)
    if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj")):
        kv = out_features(m.k_proj) // block.head_dim
        if kv < 1 or block.num_heads % kv or out_features(m.v_proj) != out_features(m.k_proj):
            raise BadInput(
                f"{block.name}: unsupported attention layout ({block.num_heads} heads, {kv} KV heads)"
            )
        return HeadLayout("qkv", block.num_heads, kv, block.head_dim)
    raise BadInput(
        f"{block.name}: cannot remove heads from a {type(m).__name__} (supported: BERT-style query/key/value, "
        "GPT-2 c_attn, q_proj/k_proj/v_proj attention)"
    )


def kv_heads_removed(name: str, layout: HeadLayout, removed: Sequence[int]) -> list[int]:
    """Which KV heads go with the removed query heads under grouped-query attention.

    A KV head serves a group of consecutive query heads. Either whole groups are removed (the KV head goes
    with them) or every group loses the same number of query heads and all KV heads stay (the model needs
    equal groups). Any other pattern is refused.
    """
    g = layout.group
    removed_set = set(removed)
    if g == 1:
        return sorted(removed_set)
    whole = [k for k in range(layout.kv_heads) if all(k * g + j in removed_set for j in range(g))]
    if removed_set == {k * g + j for k in whole for j in range(g)}:
        return whole
    per_group = [sum(1 for j in range(g) if k * g + j in removed_set) for k in range(layout.kv_heads)]
    if len(set(per_group)) == 1 and per_group[0] < g:
        return []
    raise BadInput(
        f"{name}: grouped-query attention ({layout.heads} query heads share {layout.kv_heads} KV heads, "
        f"{g} per group) can only lose whole groups of query heads, or the same number of query heads "
        f"from every group; heads {sorted(removed_set)} are neither"
    )


def _head_columns(heads: Sequence[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def prune_block_heads(block: Any, removed: Sequence[int], kv_removed: Sequence[int] | None = None) -> None:
    """Physically remove query heads `removed` (and KV heads `kv_removed`) from one attention block and
    update the head-count attributes the transformers 5 forward uses."""
    layout = head_layout(block)
    if not removed:
        return
    if len(set(removed)) >= layout.heads or any(h >= layout.heads for h in removed):
        raise BadInput(f"{block.name}: cannot remove heads {sorted(removed)} of {layout.heads}")
    m, hd = block.module, layout.head_dim
    keep = [h for h in range(layout.heads) if h not in set(removed)]
    cols = _head_columns(keep, hd)
    if layout.style == "bert":
        s = m.self
        for layer in (s.query, s.key, s.value):
            keep_outputs(layer, cols)
        keep_inputs(m.output.dense, cols)
        s.num_attention_heads = len(keep)
        s.all_head_size = len(keep) * hd
    elif layout.style == "gpt2":
        width = layout.heads * hd  # c_attn holds q | k | v, each `width` wide
        keep_outputs(m.c_attn, [c + part * width for part in range(3) for c in cols])
        keep_inputs(m.c_proj, cols)
        m.num_heads = len(keep)
        m.split_size = len(keep) * hd
    else:
        if kv_removed is None:
            kv_removed = kv_heads_removed(block.name, layout, removed)
        keep_kv = [k for k in range(layout.kv_heads) if k not in set(kv_removed)]
        keep_outputs(m.q_proj, cols)
        if kv_removed:
            kv_cols = _head_columns(keep_kv, hd)
            keep_outputs(m.k_proj, kv_cols)
            keep_outputs(m.v_proj, kv_cols)
        keep_inputs(m.o_proj if hasattr(m, "o_proj") else m.out_proj, cols)
        for attr, value in (
            ("num_heads", len(keep)),
            ("num_attention_heads", len(keep)),
            ("num_key_value_heads", len(keep_kv)),
            ("num_key_value_groups", len(keep) // len(keep_kv)),
        ):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, value)


def select_heads(
    blocks: Sequence[Any], layouts: Sequence[HeadLayout], scores: Sequence[Sequence[float]], target: int
) -> tuple[dict[int, list[int]], list[str]]:
    """The `target` least important heads across layers, never a whole layer.

    Under grouped-query attention the unit removed is a KV group (scored by the sum of its query heads), so
    the number removed is rounded down to whole groups (at least one group). Returns the choice and notes.
    """
    units = []  # (score, block index, heads)
    for i, (layout, row) in enumerate(zip(layouts, scores, strict=True)):
        g = layout.group
        for k in range(layout.kv_heads):
            heads = list(range(k * g, (k + 1) * g))
            units.append((sum(row[h] for h in heads), i, heads))
    units.sort(key=lambda u: u[0])
    chosen: dict[int, list[int]] = {}
    left = {i: layout.kv_heads for i, layout in enumerate(layouts)}
    removed, notes = 0, []
    for _score, i, heads in units:
        if removed >= target:
            break
        if left[i] <= 1:
            continue  # one head (group) per layer is always kept
        if removed + len(heads) > target and removed > 0:
            continue  # a KV group larger than what is left to remove: never overshoot (after the first)
        chosen.setdefault(i, []).extend(heads)
        left[i] -= 1
        removed += len(heads)
    if removed != target:
        notes.append(
            f"removed {removed} heads instead of {target}: grouped-query attention removes whole KV groups, "
            "and every layer keeps at least one"
        )
    return {i: sorted(h) for i, h in chosen.items()}, notes


def select_heads_per_layer(
    layouts: Sequence[HeadLayout], scores: Sequence[Sequence[float]], target: int
) -> dict[int, list[int]] | None:
    """At most `target` heads removed so that every layer keeps the same number (a multiple of its KV
    group size under grouped-query attention), each layer losing its least important heads (whole KV groups,
    scored by the sum of their query heads); None when no such choice removes anything."""
    total = sum(layout.heads for layout in layouts)
    group = max(layout.group for layout in layouts)
    keep = max(math.ceil((total - target) / len(layouts)), 1)  # never more removed than asked
    keep = math.ceil(keep / group) * group
    if keep >= max(layout.heads for layout in layouts) or any(
        keep > layout.heads or keep % layout.group for layout in layouts
    ):
        return None
    chosen: dict[int, list[int]] = {}
    for i, (layout, row) in enumerate(zip(layouts, scores, strict=True)):
        g = layout.group
        units = sorted(
            (sum(row[h] for h in range(k * g, (k + 1) * g)), list(range(k * g, (k + 1) * g)))
            for k in range(layout.kv_heads)
        )
        drop = (layout.heads - keep) // g
        if drop:
            chosen[i] = sorted(h for _score, heads in units[:drop] for h in heads)
    return chosen or None


def uneven_heads_note(counts: Sequence[int]) -> str | None:
    """A warning when layers end with different head counts (onnx.optimize cannot fuse their attention)."""
    if len(set(counts)) <= 1:
        return None
    return (
        f"layers keep uneven head counts ({', '.join(map(str, counts))}): ONNX Runtime's attention fusion "
        "(onnx.optimize) takes one head count for the whole graph, so these layers stay unfused and run "
        "slower; prune the same number of heads in every layer to keep it"
    )


@register
class HeadsPrune(Technique):
    id = "prune.heads"
    title = "Attention-head pruning"
    category = "pruning"
    input_kind = "torch"
    output_kind = "torch"
    description = (
        "Removes self-attention heads physically (query/key/value rows and output-projection columns), "
        "chosen by importance on the calibration data (gradient or ablation) or given explicitly. Every "
        "layer keeps at least one head. Grouped-query attention (Llama) loses whole KV groups, or the same "
        "number of query heads per group when heads are given explicitly. Cross-attention is left alone."
    )
    Params = HeadsParams
    starter_params: ClassVar[dict[str, Any]] = {"fraction": 0.25}
    families = ("feature-extraction", "text-classification", "causal-lm", "seq2seq")

    def run(self, state: StageState, params: HeadsParams, ctx: RunContext) -> StageState:
        from studio.inspection.attention import find_attention_blocks, require_attention_blocks

        module = _require_module(state, self.id)
        blocks, _skipped = require_attention_blocks(module, state.model.path)
        layouts = [head_layout(b) for b in blocks]
        total = sum(layout.heads for layout in layouts)
        before = _param_count(module)

        if params.heads is not None:
            chosen = self._explicit(params.heads, blocks, layouts)
            method = "explicit"
        else:
            limit = total - len(blocks)
            target = params.count if params.count is not None else round(params.fraction * total)
            if target < 1:
                raise BadInput(f"fraction {params.fraction} of {total} heads rounds to no head at all")
            if target > limit:
                raise BadInput(
                    f"cannot remove {target} of {total} heads: every one of the {len(blocks)} attention "
                    f"layers keeps at least one head, so at most {limit} can go"
                )
            scores = self._importance(state, module, params, ctx)
            balanced = select_heads_per_layer(layouts, scores, target) if params.balance == "layers" else None
            if balanced is not None:
                chosen = balanced
                removing = sum(len(h) for h in chosen.values())
                ctx.log(
                    f"the same number of heads removed in every layer (balance: layers, keeps ONNX Runtime's "
                    f"attention fusion): {removing} of the {target} asked"
                    + ("" if removing == target else f" ({target} does not split evenly over the layers)")
                )
            else:
                if params.balance == "layers":
                    ctx.log(
                        f"{target} heads cannot be removed evenly from {len(blocks)} layers: ranking them "
                        "across layers instead",
                        level="warning",
                    )
                chosen, notes = select_heads(blocks, layouts, scores, target)
                for note in notes:
                    ctx.log(note, level="warning")
            method = params.importance

        pruned: dict[str, list[int]] = {}
        pruned_kv: dict[str, list[int]] = {}
        for i, heads in sorted(chosen.items()):
            block, layout = blocks[i], layouts[i]
            kv = kv_heads_removed(block.name, layout, heads) if layout.style == "qkv" else None
            prune_block_heads(block, heads, kv)
            pruned[block.name] = heads
            if layout.style == "qkv" and layout.group > 1:
                pruned_kv[block.name] = kv or []
            ctx.log(
                f"{block.name}: removed heads {heads} ({layout.heads - len(heads)} of {layout.heads} left)"
            )
        removed = sum(len(h) for h in pruned.values())
        after = _param_count(module)
        ctx.progress(1.0, f"{removed} heads removed")
        ctx.log(f"{removed} of {total} heads removed; parameters {before:,} -> {after:,}")
        ctx.metric("heads_removed", removed, total=total)
        ctx.metric("parameters", after, before=before)
        report_fidelity(ctx, state.model, module)
        record: dict[str, Any] = {"technique": self.id, "pruned": pruned, "method": method}
        if pruned_kv:
            record["pruned_kv"] = pruned_kv
        # later steps (ONNX attention fusion) must not take the head count from the config any more
        heads_now = {b.name: b.num_heads for b in find_attention_blocks(module)[0]}
        note = uneven_heads_note(list(heads_now.values()))
        if note:
            ctx.log(note, level="warning" if "onnx.optimize" in ctx.later_steps else "info")
        return dataclasses.replace(
            state,
            module=module,
            transforms=[*state.transforms, record],
            info={**state.info, "attention_heads": heads_now},
        )

    @staticmethod
    def _explicit(
        heads: dict[int, list[int]], blocks: Sequence[Any], layouts: Sequence[HeadLayout]
    ) -> dict[int, list[int]]:
        chosen = {}
        for i, listed in heads.items():
            if i >= len(blocks):
                raise BadInput(
                    f"`heads` names attention block {i}; the model has {len(blocks)} (0-{len(blocks) - 1})"
                )
            n = layouts[i].heads
            bad = [h for h in listed if h >= n]
            if bad:
                raise BadInput(f"`heads`: block {i} ({blocks[i].name}) has {n} heads, no head {bad[0]}")
            if len(listed) >= n:
                raise BadInput(
                    f"`heads` removes all {n} heads of block {i} ({blocks[i].name}): every layer keeps at "
                    "least one head"
                )
            if listed:
                if layouts[i].style == "qkv":
                    kv_heads_removed(
                        blocks[i].name, layouts[i], listed
                    )  # refuses impossible GQA patterns early
                chosen[i] = sorted(listed)
        if not chosen:
            raise BadInput("`heads` lists no head to remove")
        return chosen

    @staticmethod
    def _importance(
        state: StageState, module: Any, params: HeadsParams, ctx: RunContext
    ) -> list[list[float]]:
        from studio.inspection.heads import compute_head_importance

        if not ctx.calibration:
            raise BadInput("choosing heads by importance needs calibration examples (data: calibration)")
        result = compute_head_importance(
            _loaded_with(state.model, module),
            ctx.calibration,
            method=params.importance,
            sequence_length=ctx.sequence_length,
            progress=lambda f, m: ctx.progress(0.9 * f, m),
        )
        ctx.log(f"head importance: {result.objective} ({result.seconds:.1f} s)")
        return [[v if v is not None else math.inf for v in row] for row in result.importance]

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        from studio.inspection.attention import find_attention_blocks

        blocks = {b.name: b for b in find_attention_blocks(module)[0]}
        for name, heads in record.get("pruned", {}).items():
            if name not in blocks:
                raise BadInput(f"prune.heads record names attention block '{name}', not in the rebuilt model")
            kv = record.get("pruned_kv", {}).get(name)
            prune_block_heads(blocks[name], heads, kv)
        return module
