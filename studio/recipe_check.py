"""Checking a pipeline against the model it will run on, before anything runs.

`pipeline.check_steps` refuses what is wrong with a recipe on any model (stage order, parameters,
availability) and techniques whose family does not fit. What it cannot see is a parameter that names
parts of one particular model: `prune.heads` heads by attention block and head index, `exclude` patterns
by layer name. A pipeline built on one model and then applied to another keeps those names, and the run
failed only after loading and calibrating. `check_recipe` adds those checks.

The model's structure comes from `model_layout`: the torch module when it is already built, otherwise the
architecture instantiated on the meta device from its config (shapes only, no weights; milliseconds once
transformers is imported), otherwise the layer names implied by the weight names. Where the structure
cannot be known the structural checks are skipped: the run still refuses at the step itself.
"""

from __future__ import annotations

import copy
import fnmatch
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from studio.checkpoints.base import LoadedModel
from studio.checkpoints.stage import stage_of
from studio.pipeline import Recipe, check_steps


@dataclass(frozen=True)
class Problem:
    """One reason the recipe cannot run on the model: the step (0-based, None for the whole recipe), the
    parameter concerned (None when it is the step as a whole), and a message that names both."""

    step: int | None
    field: str | None
    message: str


@dataclass(frozen=True)
class ModelLayout:
    """What the structural checks need to know about a model; None where it cannot be told."""

    attention: tuple[tuple[str, int], ...] | None  # (block name, heads) in the head-importance view's order
    modules: frozenset[str] | None  # every module (layer) name

    @property
    def total_heads(self) -> int:
        return sum(h for _, h in self.attention or ())


UNKNOWN = ModelLayout(None, None)

_CACHE: dict[int, tuple[weakref.ref, ModelLayout]] = {}
_CACHE_LOCK = threading.Lock()


def _forget(key: int, _ref: weakref.ref) -> None:
    """Drop a model's cached layout once the model is garbage collected (ids are reused)."""
    _CACHE.pop(key, None)


def _layout_of_module(module: Any) -> ModelLayout:
    from studio.inspection.attention import find_attention_blocks

    blocks, _skipped = find_attention_blocks(module)
    names = frozenset(n for n, _ in module.named_modules() if n)
    return ModelLayout(tuple((b.name, b.num_heads) for b in blocks) if blocks else None, names)


def _meta_module(model: LoadedModel) -> Any | None:
    """The architecture without weights (meta tensors), with any structure a saved variant records."""
    if model.config_factory is None:
        return None
    import torch

    from studio.checkpoints.hf import model_class
    from studio.checkpoints.variant_folder import TRANSFORMS_KEY
    from studio.techniques.base import get_technique

    config = model.config
    cls = model_class(config, model.path)
    with torch.device("meta"):
        module = cls._from_config(config)
        for record in getattr(config, TRANSFORMS_KEY, None) or []:
            module = get_technique(record["technique"]).restore(module, record)
    return module


def _names_from_tensors(model: LoadedModel) -> frozenset[str]:
    names = set()
    for ref in model.tensors():
        parts = ref.name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            names.add(".".join(parts[:i]))
    return frozenset(names)


def model_layout(model: LoadedModel) -> ModelLayout:
    """The model's attention blocks and layer names (cached per opened model; safe on any thread).

    The first call for a Hugging Face model imports its transformers class (seconds): the GUI calls this
    on a pool thread.
    """
    key = id(model)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0]() is model:
            return hit[1]
    layout = _compute_layout(model)
    with _CACHE_LOCK:
        _CACHE[key] = (weakref.ref(model, partial(_forget, key)), layout)
    return layout


def _compute_layout(model: LoadedModel) -> ModelLayout:
    if stage_of(model) != "torch":
        return UNKNOWN  # torch-only parameters never reach an ONNX model (the stage check refuses them)
    built = model.__dict__.get("module")  # `LoadedModel.module` is a cached_property: built already?
    try:
        module = built if built is not None else _meta_module(model)
        if module is not None:
            return _layout_of_module(module)
    except Exception:  # an architecture that cannot be built on meta: fall back to names
        pass
    try:
        return ModelLayout(None, _names_from_tensors(model))
    except Exception:  # unreadable weights are reported when the model is opened
        return UNKNOWN


# ------------------------------------------------------------------------------------------------ checks


GENAI_RUNTIME, GENAI_EXPORT = "runtime.onnxruntime_genai", "export.onnx_genai"


def _label(index: int, technique: str) -> str:
    return f"step {index + 1} ({technique})"


def _heads_problems(index: int, technique: str, params: Any, layout: ModelLayout) -> list[Problem]:
    if layout.attention is None:
        return []
    blocks = layout.attention
    label = _label(index, technique)
    out: list[Problem] = []
    if params.heads is not None:
        for block, listed in sorted(params.heads.items()):
            if block >= len(blocks):
                out.append(
                    Problem(
                        index,
                        "heads",
                        f"{label}: field 'heads' names attention block {block}; this model has "
                        f"{len(blocks)} (0-{len(blocks) - 1})",
                    )
                )
                continue
            name, n = blocks[block]
            bad = sorted(h for h in listed if h >= n)
            if bad:
                heads = ", ".join(str(h) for h in bad)
                out.append(
                    Problem(
                        index,
                        "heads",
                        f"{label}: field 'heads': block {block} ({name}) has {n} heads (0-{n - 1}), "
                        f"no head {heads}",
                    )
                )
            elif len(set(listed)) >= n:
                out.append(
                    Problem(
                        index,
                        "heads",
                        f"{label}: field 'heads' removes all {n} heads of block {block} ({name}); every "
                        "layer keeps at least one",
                    )
                )
        return out
    total = layout.total_heads
    limit = total - len(blocks)
    if params.count is not None and params.count > limit:
        out.append(
            Problem(
                index,
                "count",
                f"{label}: field 'count': cannot remove {params.count} of {total} heads; every one of the "
                f"{len(blocks)} attention layers keeps one, so at most {limit} can go",
            )
        )
    return out


def _default_of(params_cls: Any, field: str) -> list[str]:
    info = params_cls.model_fields[field]
    default = info.get_default(call_default_factory=True)
    return list(default or [])


def _exclude_problems(
    index: int, technique: str, params: Any, layout: ModelLayout, names: Iterable[str] = ("exclude",)
) -> list[Problem]:
    if layout.modules is None:
        return []
    out: list[Problem] = []
    for field in names:
        patterns = getattr(params, field, None)
        if not patterns:
            continue
        defaults = set(_default_of(type(params), field))  # generic defaults may match nothing: fine
        missing = [
            p
            for p in patterns
            if p not in defaults and not any(fnmatch.fnmatchcase(n, p) for n in layout.modules)
        ]
        if missing:
            shown = ", ".join(f"'{p}'" for p in missing[:3]) + (" …" if len(missing) > 3 else "")
            out.append(
                Problem(
                    index,
                    field,
                    f"{_label(index, technique)}: field '{field}': {shown} "
                    f"match{'es' if len(missing) == 1 else ''} no layer of this model",
                )
            )
    return out


def check_recipe(recipe: Recipe, model: LoadedModel, layout: ModelLayout | None = None) -> list[Problem]:
    """Every problem of `recipe` on `model`: those `check_steps` finds, then the parameters that name
    parts of the model (heads, layer names) and do not exist in it. `layout` defaults to
    `model_layout(model)`; pass `UNKNOWN` to skip the structural checks (the GUI does while it is computed).
    """
    if layout is None:
        layout = model_layout(model)
    if recipe.task is not None and recipe.task != model.family:
        model = copy.copy(model)  # as `plan` does: the recipe's task decides the family
        model.family = recipe.task
    planned, found = check_steps(recipe.steps, stage_of(model), model)
    problems = [Problem(i, None, message) for i, message in found]
    failing = {p.step for p in problems}
    for step in planned:
        if step.index in failing:
            continue  # one thing at a time: a step of the wrong stage or family has no meaningful names here
        technique = step.technique.id
        if technique == "prune.heads":
            problems.extend(_heads_problems(step.index, technique, step.params, layout))
        if "exclude" in type(step.params).model_fields:
            problems.extend(_exclude_problems(step.index, technique, step.params, layout))
        if technique == GENAI_RUNTIME and stage_of(model) == "torch":
            exported = any(s.technique.id == GENAI_EXPORT for s in planned if s.index < step.index)
            if not exported:
                problems.append(
                    Problem(
                        step.index,
                        None,
                        f"{_label(step.index, technique)}: onnxruntime-genai's Generator loads the graph "
                        f"{GENAI_EXPORT} writes (with its genai_config.json): put {GENAI_EXPORT} before it",
                    )
                )
    return sorted(problems, key=lambda p: p.step if p.step is not None else -1)
