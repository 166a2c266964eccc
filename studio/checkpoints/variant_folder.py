"""Rebuilding a saved torch variant: the architecture from its config, the techniques' structure records
replayed on it, then the saved weights loaded.

A variant folder's config.json carries `studio_transforms`: one record per structure-changing technique
applied (pruned heads, quantized layers, a dtype). Only the technique that wrote a record knows how to
re-create that structure, and techniques sit above the checkpoints, so each technique registers its
`restore` here (`studio.techniques.base.register` does it for every block). The built-in blocks are loaded
by name the first time a record names a technique not registered yet, so every process that opens a variant
folder (the CLI, the worker, the memory probe, a library user) rebuilds it alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio.errors import BadInput

TRANSFORMS_KEY = "studio_transforms"

# technique id -> restore(module, record) -> module
Restorer = Callable[[Any, dict[str, Any]], Any]
_RESTORERS: dict[str, Restorer] = {}


def register_restorer(technique_id: str, restore: Restorer) -> None:
    """Let variant folders whose records name `technique_id` be rebuilt with `restore`."""
    _RESTORERS[technique_id] = restore


def restorer(technique_id: str) -> Restorer:
    if technique_id not in _RESTORERS:
        # The blocks sit above the checkpoints (no static import of them here): load the built-in ones by
        # name, as a plugin registry does, then look again.
        import importlib

        importlib.import_module("studio.techniques")
    if technique_id not in _RESTORERS:
        raise BadInput(f"unknown technique '{technique_id}' (known: {', '.join(sorted(_RESTORERS))})")
    return _RESTORERS[technique_id]


def build_variant_module(cls: Any, path: Path, config: Any) -> Any:
    """Architecture from the config, structure records replayed, then the saved weights loaded."""
    import torch

    from studio.checkpoints.torch_files import load_weights_only

    records = list(getattr(config, TRANSFORMS_KEY, None) or [])
    # The quantization_config is for plain transformers (torchao's, or one that refuses the folder): the
    # records rebuild the quantized layers here, and a model built from a config carrying it would look
    # quantized to transformers.
    config.__dict__.pop("quantization_config", None)
    module = cls._from_config(config)  # cls: a transformers model class
    for record in records:
        module = restorer(record["technique"])(module, record)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    elif (path / "model.pt").is_file():
        state = load_weights_only(path / "model.pt")
    else:
        raise BadInput("no model.safetensors or model.pt in the variant folder", path=path)
    # safetensors keeps one name per shared tensor (e.g. lm_head.weight): give the tied source its value
    # before loading, or tie_weights() would copy a random embedding over the loaded head.
    tied = dict(getattr(module, "all_tied_weights_keys", None) or {})
    for target, source in tied.items():
        if source not in state and target in state:
            state[source] = state[target]
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise BadInput(
            f"the saved weights do not fit the rebuilt model (missing {missing[:3]}, unexpected {unexpected[:3]})",
            path=path,
        )
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    return module.eval().to(torch.device("cpu"))
