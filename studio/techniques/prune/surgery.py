"""Weight surgery shared by the pruning blocks: which layers hold a prunable weight, and cutting a
Linear / GPT-2 Conv1D down to some of its output or input features in place.

transformers' Conv1D stores its weight transposed, (in, out), so every slice here asks `is_conv1d` which
dimension holds the outputs. Slicing replaces the Parameter (keeping its `requires_grad`) and updates the
size attributes (`out_features` / `nf`, `in_features` / `nx`) that the forward and `repr` read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from studio.errors import BadInput
from studio.techniques.base import StageState


def is_conv1d(module: Any) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear_like(module: Any) -> bool:
    import torch

    return isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) or (
        is_conv1d(module)
    )


def dense_float_weight(module: Any) -> bool:
    import torch

    w = getattr(module, "weight", None)
    return isinstance(w, torch.nn.Parameter) and type(w.data) is torch.Tensor and w.is_floating_point()


def param_count(module: Any) -> int:
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _index(idx: Sequence[int], device: Any) -> Any:
    import torch

    return torch.as_tensor(list(idx), dtype=torch.long, device=device)


def out_features(layer: Any) -> int:
    return int(layer.weight.shape[1] if is_conv1d(layer) else layer.weight.shape[0])


def _set_param(layer: Any, name: str, value: Any) -> None:
    import torch

    old = getattr(layer, name)
    setattr(layer, name, torch.nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def keep_outputs(layer: Any, idx: Sequence[int]) -> None:
    """Keep only output features `idx` of a Linear (weight rows) or Conv1D (weight columns)."""
    import torch

    with torch.no_grad():
        index = _index(idx, layer.weight.device)
        dim = 1 if is_conv1d(layer) else 0
        _set_param(layer, "weight", layer.weight.index_select(dim, index))
        if getattr(layer, "bias", None) is not None:
            _set_param(layer, "bias", layer.bias.index_select(0, index))
    if is_conv1d(layer):
        layer.nf = len(idx)
    else:
        layer.out_features = len(idx)


def keep_inputs(layer: Any, idx: Sequence[int]) -> None:
    """Keep only input features `idx` of a Linear (weight columns) or Conv1D (weight rows)."""
    import torch

    with torch.no_grad():
        index = _index(idx, layer.weight.device)
        dim = 0 if is_conv1d(layer) else 1
        _set_param(layer, "weight", layer.weight.index_select(dim, index))
    if is_conv1d(layer):
        layer.nx = len(idx)
    else:
        layer.in_features = len(idx)


def out_features_of(layer: Any) -> int:
    import torch

    if isinstance(layer, torch.nn.modules.conv._ConvNd):
        return int(layer.out_channels)
    return out_features(layer)


def require_module(state: StageState, technique: str) -> Any:
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
