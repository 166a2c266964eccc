"""prune.heads: remove self-attention heads physically, chosen by importance on the calibration data
or given explicitly.

The transform record (`pruned`, and `pruned_kv` under grouped-query attention) names heads as indices of
the model as it was when the step ran, so `restore` replays several pruning steps correctly in order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register
from studio.techniques.prune.fidelity import report_fidelity
from studio.techniques.prune.head_selection import select_heads, select_heads_per_layer, uneven_heads_note
from studio.techniques.prune.head_surgery import HeadLayout, head_layout, kv_heads_removed, prune_block_heads
from studio.techniques.prune.surgery import param_count, require_module


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


def _loaded_with(model: Any, module: Any) -> Any:
    """A copy of the LoadedModel whose `.module` is `module` (the current stage, not the original)."""
    return dataclasses.replace(model, module_factory=lambda: module)


@register
class HeadsPrune(Technique[HeadsParams]):
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

        module = require_module(state, self.id)
        blocks, _skipped = require_attention_blocks(module, state.model.path)
        layouts = [head_layout(b) for b in blocks]
        total = sum(layout.heads for layout in layouts)
        before = param_count(module)

        if params.heads is not None:
            chosen = self._explicit(params.heads, blocks, layouts)
            method = "explicit"
        else:
            limit = total - len(blocks)
            target = params.count if params.count is not None else round((params.fraction or 0.0) * total)
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
        after = param_count(module)
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
        uneven = uneven_heads_note(list(heads_now.values()))
        if uneven:
            ctx.log(uneven, level="warning" if "onnx.optimize" in ctx.later_steps else "info")
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
