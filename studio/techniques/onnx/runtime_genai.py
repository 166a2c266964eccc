"""runtime.onnxruntime_genai: decode the variant's graph with onnxruntime-genai's Generator.

Not a change of the graph: a copy of it whose metadata (`studio.onnxruntime_genai`, JSON) says that the
studio's generation metrics, compare and bench run it in onnxruntime-genai's C++ Generator instead of the
studio's Python loop over an ONNX Runtime session. The Generator keeps one key/value buffer for the whole
run (the graph's past and present share it: no cache arrays copied per token) and has no per-token Python
cost, which at batch 1 on a 0.5B INT4 model is a few percent of every step. The graph needs the
genai_config.json export.onnx_genai writes (every later ONNX step carries it), so the step goes after
export.onnx_genai and its quantization. Quality (perplexity) still runs the same graph in a plain session.
"""

from __future__ import annotations

import json

from pydantic import Field

from studio.errors import BadInput
from studio.evaluation.openvino_runner import installed
from studio.evaluation.ortgenai_runner import RUNTIME_KEY, genai_problem
from studio.techniques.base import Params, RunContext, StageState, Technique, register
from studio.techniques.onnx.export_genai import NO_GENAI
from studio.techniques.onnx.graph_pass import GraphPass


class OrtGenaiParams(Params):
    intra_op_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="threads the Generator's session runs one operator on; empty: the evaluation's",
    )


@register
class OrtGenaiRuntime(Technique[OrtGenaiParams]):
    id = "runtime.onnxruntime_genai"
    title = "onnxruntime-genai Generator"
    category = "graph"
    input_kind = "onnx"
    output_kind = "onnx"
    families = ("causal-lm",)
    description = (
        "Decodes the variant with onnxruntime-genai's C++ Generator (one shared KV buffer, no per-token "
        "Python) instead of the studio's loop; for graphs from export.onnx_genai. The graph is unchanged."
    )
    Params = OrtGenaiParams

    def availability(self) -> tuple[bool, str | None]:
        return (True, None) if installed("onnxruntime_genai") else (False, NO_GENAI)

    def run(self, state: StageState, params: OrtGenaiParams, ctx: RunContext) -> StageState:
        frame = GraphPass.open(state, ctx, "onnxruntime-genai", technique=self.id)
        problem = genai_problem(frame.src)
        if problem:
            raise BadInput(f"{self.id}: {problem}", path=frame.src)
        ctx.progress(0.2, "copying the graph")
        frame.copy_input()
        settings = params.model_dump(mode="json")
        frame.finish({RUNTIME_KEY: json.dumps(settings, sort_keys=True)})
        threads = settings["intra_op_threads"] or "the evaluation's"
        ctx.log(f"decoding with onnxruntime-genai's Generator on {threads} intra-op threads")
        return frame.result("runtime recorded", onnxruntime_genai=settings)
