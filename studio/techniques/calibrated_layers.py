"""GPTQ and AWQ versions of chosen Linear layers, each built once, for per-layer sensitivity measurements.

The mixed-precision search and `model-studio sensitivity` swap one quantized layer at a time into a float
model, so every layer must be quantized on its own, in the float model's context: the statistics each
layer is calibrated on are the inputs it sees with every other layer float. That differs from the blocks
(quantize.gptq measures a layer's Hessian with the layers before it already quantized, so its error is
compensated further down), but it is exactly the question "what does quantizing this layer alone cost",
and it makes each measurement a swap instead of a recalibration.

- GPTQ: one pass of the float model over the calibration windows records every chosen layer's input
  Hessian at once (a pre-hook per layer); each layer is then quantized against its own Hessian. The
  Hessian is computed once per layer, not once per measurement.
- AWQ: per decoder block (float), the activation-aware scales of each group of layers reading one input
  are searched as quantize.awq searches them (every layer of the group rounded, the block's output error
  measured). The quantized layer stores the codes of W * s, exactly what quantize.awq stores, and divides
  its input by s itself: quantize.awq folds that 1/s into the operation producing the input (a norm, or
  the previous Linear layer's rows), which computes the same numbers but would touch a second layer.
  A group AWQ does not scale (o_proj under grouped-query attention) is rounded to nearest, as there.

Few calibration tokens are enough for a ranking: GPTQ's damping keeps a Hessian from fewer tokens than
the layer's width invertible, so no minimum token count is enforced here (the blocks enforce one).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from studio.errors import BadInput
from studio.techniques.layer_swap import LayerScheme, float_weight, is_linear, quantized_layer


def gptq_layers(
    root: Any,
    names: Sequence[str],
    windows: Sequence[Any],
    scheme: LayerScheme,
    *,
    act_order: bool = False,
    damp: float = 0.01,
) -> dict[str, Any]:
    """{name: WeightOnlyLinear} of each named Linear layer of the float `root`, quantized by GPTQ against
    the Hessian of its inputs on `windows` (token-id tensors [1, L])."""
    import inspect

    import torch

    from studio.techniques.gptq import Hessian, gptq_quantize, weight_only_layer

    hessians = {name: Hessian(int(float_weight(root.get_submodule(name)).shape[1])) for name in names}

    def recorder(name: str) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            hessians[name].add(args[0])

        return hook

    extra = {"use_cache": False} if "use_cache" in inspect.signature(root.forward).parameters else {}
    handles = [root.get_submodule(n).register_forward_pre_hook(recorder(n)) for n in names]
    try:
        with torch.no_grad():
            for ids in windows:
                root(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name in names:
        layer = root.get_submodule(name)
        if hessians[name].count == 0:
            raise BadInput(f"GPTQ sensitivity: layer '{name}' is never called on the calibration text")
        weight = float_weight(layer)
        group = scheme.group_for(int(weight.shape[1]))
        q = gptq_quantize(
            weight, hessians[name].matrix(), scheme.bits, group, scheme.symmetric, act_order, damp
        )
        out[name] = weight_only_layer(q, layer.bias, scheme.bits, group, scheme.symmetric)
    return out


@functools.cache
def input_scaled_class() -> type:
    """A quantized layer that divides its input by AWQ's per-channel scales (made on first use, so that
    importing this module does not import torch)."""
    import torch

    class InputScaled(torch.nn.Module):
        """`inner` (the codes of W * s) applied to x / s: the same product as W x, with the rounding AWQ
        chose. `inner` is what a budget counts; the scales would live in the producer once folded."""

        def __init__(self, inner: Any, scales: Any) -> None:
            super().__init__()
            self.inner = inner
            self.register_buffer("inverse", (1.0 / scales).to(torch.float32))

        def forward(self, x: Any) -> Any:
            return self.inner(x * self.inverse.to(x.dtype))

    return InputScaled


def awq_layers(
    root: Any, names: Sequence[str], windows: Sequence[Any], scheme: LayerScheme
) -> dict[str, Any]:
    """{name: quantized layer} of each named Linear layer inside the float model's Llama-style decoder
    blocks, with the scales quantize.awq would search for its group."""
    import torch

    from studio.techniques import layerwise
    from studio.techniques.awq import REQUIRED, SCALED_GROUPS, SEARCH_WINDOWS, abs_sum, has_submodule
    from studio.techniques.awq import search_scales as search
    from studio.techniques.quantize import WeightOnlyParams

    found = layerwise.decoder_blocks(root, is_linear)
    if found is None:
        raise BadInput("the int4-awq scheme needs a model made of repeated decoder blocks; this one has none")
    prefix, blocks = found
    missing = [n for n in REQUIRED if not has_submodule(blocks[0], n)]
    if missing:
        raise BadInput(
            "the int4-awq scheme applies to Llama-style decoder blocks (Llama, Mistral, Qwen2); this model's "
            f"{type(blocks[0]).__name__} has no {', '.join(missing[:3])}"
        )
    storage = WeightOnlyParams(bits=scheme.bits, group_size=scheme.group_size, symmetric=scheme.symmetric)
    wanted = set(names)
    scaled = input_scaled_class()
    out: dict[str, Any] = {}
    calls = layerwise.capture_first_block(root, blocks[0], windows)
    for b, block in enumerate(blocks):
        pre = f"{prefix}.{b}."
        search_calls = calls[:SEARCH_WINDOWS]
        reference = [o.hidden().to(torch.float32) for o in layerwise.run_block(block, search_calls)]
        for producer, group in SCALED_GROUPS:
            if not any(pre + n in wanted for n in group):
                continue
            prod = block.get_submodule(producer)
            layers = [block.get_submodule(n) for n in group]
            s = None
            if prod.weight.shape[0] == layers[0].weight.shape[1]:  # else grouped-query attention's o_proj
                sums: list[Any] = []

                def collect(x: Any, into: list[Any] = sums) -> None:
                    into.append(abs_sum(x))

                layerwise.feed_inputs(block, layers[0], calls, collect)
                tokens = sum(int(c.hidden().numel() // c.hidden().shape[-1]) for c in calls)
                magnitude = torch.stack(sums).sum(dim=0) / tokens
                s, _alpha, _err, _plain = search(
                    block, prod, layers, magnitude, search_calls, reference, storage
                )
            for name, layer in zip(group, layers, strict=True):
                if pre + name not in wanted:
                    continue
                if s is None:
                    out[pre + name] = quantized_layer(layer, scheme)
                    continue
                with torch.no_grad():
                    wide = torch.nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
                    wide = wide.to(layer.weight.dtype)
                    wide.weight.copy_(layer.weight * s.to(layer.weight.dtype))
                    if layer.bias is not None:
                        wide.bias.copy_(layer.bias)
                out[pre + name] = scaled(quantized_layer(wide, scheme), s)
        if b < len(blocks) - 1:
            calls = layerwise.run_block(block, calls)  # the float block's outputs: every other layer float
    outside = [n for n in names if n not in out]
    if outside:
        raise BadInput(f"the int4-awq scheme quantizes layers of the decoder blocks only, not {outside[0]}")
    return out
