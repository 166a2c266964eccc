"""onnx.half: weights and compute in float16 (ONNX Runtime's float16 conversion, with symbolic shape
inference for fused graphs). Halves the file; fast on GPUs, slow on most CPUs."""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from studio.checkpoints.onnx_graph import QUANT_OPS, float_initializer_types, save_onnx
from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register
from studio.techniques.onnx.graph_pass import GraphPass


class HalfParams(Params):
    keep_io_types: bool = Field(
        True, description="keep float32 graph inputs and outputs (casts inside the graph)"
    )
    op_block_list: list[str] | None = Field(
        None,
        description="operator types kept in float32; empty: ONNX Runtime's default list of "
        "numerically fragile ops",
    )


@register
class OnnxHalf(Technique[HalfParams]):
    id = "onnx.half"
    title = "ONNX float16"
    category = "precision"
    input_kind = "onnx"
    output_kind = "onnx"
    description = (
        "Converts weights and compute to float16 (onnxruntime.transformers float16 conversion, with "
        "symbolic shape inference for fused graphs). Halves the file; fast on GPUs, slow on most CPUs."
    )
    Params = HalfParams

    def run(self, state: StageState, params: HalfParams, ctx: RunContext) -> StageState:
        import onnx
        from onnxruntime.transformers.onnx_model import OnnxModel

        frame = GraphPass.open(state, ctx, "half", technique=self.id)
        src = frame.src
        if QUANT_OPS & set(frame.input_counts):
            raise BadInput("the graph is already quantized to integers: apply onnx.half before quantization")
        if float_initializer_types(src) == {"float16"}:
            raise BadInput("the graph is already float16", path=src)
        start = time.perf_counter()
        ctx.progress(0.1, "converting to float16")
        wrapped = OnnxModel(onnx.load(str(src)))
        kwargs: dict[str, Any] = {"keep_io_types": params.keep_io_types}
        if params.op_block_list is not None:
            kwargs["op_block_list"] = list(params.op_block_list)
        with frame.tool("float16 conversion"):
            wrapped.convert_float_to_float16(use_symbolic_shape_infer=True, **kwargs)
        save_onnx(wrapped.model, frame.out)
        frame.finish({"studio.dtype": "float16"})
        ctx.log(f"float16 graph in {time.perf_counter() - start:.1f} s")
        return frame.result("converted", dtype="float16")
