"""runtime.onnxruntime: the ONNX Runtime session settings the variant's graph is run with.

Not a change of the graph: a copy of it whose metadata (`studio.onnxruntime`) records intra-op threads,
graph optimization level and execution mode (studio/evaluation/ort_settings.py), so every session opened
on the variant (evaluation, memory probe, compare, bench) is built the same way, and a search can
explore the settings like any step parameter.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from studio.evaluation.ort_settings import SETTINGS_KEY
from studio.techniques.base import Params, RunContext, StageState, Technique, register
from studio.techniques.onnx.graph_pass import GraphPass


class OrtSessionParams(Params):
    intra_op_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="threads ONNX Runtime runs one operator on; empty: the evaluation's thread count",
    )
    graph_optimization_level: Literal["disabled", "basic", "extended", "all"] = Field(
        "all",
        description="ONNX Runtime's graph optimizations when the session loads: disabled, basic (constant "
        "folding, redundant nodes), extended (fusions) or all (also layout changes)",
    )
    execution_mode: Literal["sequential", "parallel"] = Field(
        "sequential",
        description="sequential runs one operator at a time; parallel runs independent branches at once",
    )


@register
class OrtSession(Technique[OrtSessionParams]):
    id = "runtime.onnxruntime"
    title = "ONNX Runtime settings"
    category = "graph"
    input_kind = "onnx"
    output_kind = "onnx"
    description = (
        "Records the ONNX Runtime session settings the variant runs with (intra-op threads, graph "
        "optimization level, execution mode) in the graph, so every measurement of it uses them. "
        "The graph itself is unchanged; searchable like any parameter."
    )
    Params = OrtSessionParams

    def run(self, state: StageState, params: OrtSessionParams, ctx: RunContext) -> StageState:
        frame = GraphPass.open(state, ctx, "onnxruntime", technique=self.id)
        ctx.progress(0.2, "copying the graph")
        frame.copy_input()
        settings = params.model_dump(mode="json")
        frame.finish({SETTINGS_KEY: json.dumps(settings, sort_keys=True)})
        threads = settings["intra_op_threads"] or "the evaluation's"
        ctx.log(
            f"ONNX Runtime settings: {threads} intra-op threads, optimization level "
            f"{settings['graph_optimization_level']}, {settings['execution_mode']} execution"
        )
        return frame.result("settings recorded", onnxruntime=settings)
