"""prune.structured: remove FFN neurons (transformers) or conv channels (CNNs), making the model smaller
and dense.

The transform record it appends (`ffn_sizes`, or `channels` with the example input shape) lets `restore`
re-create the same shapes on a model freshly built from the config, before the saved weights load.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import Field, field_validator, model_validator

from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register
from studio.techniques.prune.channels import prune_conv_channels, restore_channels
from studio.techniques.prune.ffn import FFN, find_ffns, neuron_scores, rounded_size, shrink_ffn
from studio.techniques.prune.fidelity import report_fidelity
from studio.techniques.prune.surgery import (
    param_count,
    require_module,
)


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
class StructuredPrune(Technique[StructuredParams]):
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
        module = require_module(state, self.id)
        before = param_count(module)
        ffns = find_ffns(module)
        if ffns:
            record = self._prune_ffns(ffns, params, ctx)
        else:
            if params.sizes:
                raise BadInput("`sizes` applies to transformer FFN blocks; this model has none")
            channels, shape = prune_conv_channels(module, state.model, params.fraction, params.round_to, ctx)
            record = {"technique": self.id, "channels": channels, "example_input_shape": list(shape)}
        after = param_count(module)
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
            restore_channels(module, record["channels"], record["example_input_shape"])
        return module
