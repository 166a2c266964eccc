"""Conv channels for prune.structured on CNNs, through torch-pruning's dependency graph (which makes
the layers fed by a cut channel, BatchNorm, the next conv, ..., follow)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from studio.errors import BadInput
from studio.techniques.base import RunContext
from studio.techniques.prune.surgery import dense_float_weight, is_conv1d, is_linear_like, out_features_of


def example_input_shape(model: Any) -> tuple[int, ...]:
    from studio.families import image_shape_of

    return (1, *image_shape_of(model))


def example_input(model: Any, shape: Sequence[int]) -> Any:
    import torch

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return {"pixel_values": x} if model is not None and model.config is not None else x


def prune_conv_channels(
    module: Any, model: Any, fraction: float | None, round_to: int, ctx: RunContext
) -> tuple[dict[str, int], tuple[int, ...]]:
    """Remove `fraction` of the output channels of every layer but the classifier (magnitude importance);
    returns the kept channels of the layers that changed and the example input shape they were traced with."""
    import torch
    import torch_pruning as tp

    convs = [
        m
        for m in module.modules()
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and dense_float_weight(m)
    ]
    if not convs:
        raise BadInput(
            "nothing to prune structurally: no transformer FFN blocks and no Conv layers (an exported or "
            "scripted graph has no layers to cut; use the original Python model)",
            path=model.path,
        )
    shape = example_input_shape(model)
    example = example_input(model, shape)
    layers = {n: m for n, m in module.named_modules() if is_linear_like(m) and not is_conv1d(m)}
    sizes_before = {n: out_features_of(m) for n, m in layers.items()}
    output_layer = list(layers.values())[-1]  # the classifier: its outputs are the classes
    ctx.progress(0.1, "tracing the dependency graph")
    with torch.inference_mode(False), torch.enable_grad():  # the graph is traced through autograd
        pruner = tp.pruner.MagnitudePruner(
            module,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=fraction,
            round_to=round_to,
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
            f"no channel was removed: the layers are too small for fraction {fraction} "
            f"with round_to {round_to}",
            level="warning",
        )
    ctx.progress(1.0, "channels pruned")
    return channels, shape


def restore_channels(module: Any, channels: dict[str, int], shape: Sequence[int]) -> None:
    """Cut the same output channels on a fresh module through torch-pruning's dependency graph, so that
    the layers fed by them (BatchNorm, next conv, ...) follow."""
    import torch
    import torch_pruning as tp

    example: Any = torch.zeros(*shape)
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
