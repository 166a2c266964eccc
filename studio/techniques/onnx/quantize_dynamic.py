"""onnx.quantize_dynamic: INT8 weights with activations quantized on the fly (ONNX Runtime's
quantize_dynamic), optionally with mixed precision choosing the nodes that stay float."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from studio.techniques.base import RunContext, StageState, Technique, register
from studio.techniques.onnx.graph_pass import GraphPass
from studio.techniques.onnx.quantization import DYNAMIC_OP_TYPES, IntegerQuantizeParams, quantize_dynamic_file

INTEGER_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger", "QAttention")


class QuantizeDynamicParams(IntegerQuantizeParams):
    known_op_types: ClassVar[tuple[str, ...]] = DYNAMIC_OP_TYPES
    per_channel: bool = Field(
        True,
        description="one scale per output channel instead of per tensor (per tensor: MiniLM cosine 0.964 "
        "instead of 0.993)",
    )
    reduce_range: bool = Field(
        False, description="7-bit weights: avoids overflow in the int8 kernels of CPUs without VNNI"
    )
    op_types: list[str] = Field(
        default=["MatMul", "Attention", "EmbedLayerNormalization", "Gather"],
        description=f"operator types to quantize (of: {', '.join(DYNAMIC_OP_TYPES)}); the default covers "
        "the fused attention and the embedding tables too (MiniLM: 25% of the FP32 size instead of 74%). "
        "ONNX Runtime has no integer Gemm, so Gemm nodes stay float",
    )
    mixed_precision: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="mixed precision: a fidelity target (mean cosine to the original for encoders, 1 - the "
        "output divergence otherwise) measured on up to 64 calibration examples. Every node's sensitivity is "
        "measured (all but one quantized, with ONNX Runtime's own tool) and nodes stay float, most fidelity "
        "won back per parameter first, until the target is met; see `model-studio sensitivity`. Empty: quantize "
        "every node not excluded",
    )


@register
class OnnxQuantizeDynamic(Technique[QuantizeDynamicParams]):
    id = "onnx.quantize_dynamic"
    title = "ONNX dynamic INT8"
    category = "quantization"
    input_kind = "onnx"
    output_kind = "onnx"
    description = (
        "INT8 weights with activations quantized on the fly (onnxruntime.quantization.quantize_dynamic); "
        "no calibration data needed. Best for transformer MatMuls on CPU."
    )
    Params = QuantizeDynamicParams

    def run(self, state: StageState, params: QuantizeDynamicParams, ctx: RunContext) -> StageState:
        frame = GraphPass.open(
            state, ctx, "quantize_dynamic", technique=self.id, float32=True, exclude=params.exclude_nodes
        )
        exclude = list(params.exclude_nodes)
        if params.mixed_precision is not None:
            exclude += self._mixed_precision(frame.src, params, ctx)
        start = time.perf_counter()
        ctx.progress(0.1 if params.mixed_precision is None else 0.85, "quantizing")
        gemms = frame.input_counts.get("Gemm", 0)
        if "Gemm" in params.op_types and gemms:
            ctx.log(f"ONNX Runtime has no dynamic integer Gemm: {gemms} Gemm node(s) stay float")
        with frame.tool("ONNX Runtime's dynamic quantization", warnings=True):
            quantize_dynamic_file(
                frame.src,
                frame.out,
                op_types=params.op_types,
                per_channel=params.per_channel,
                reduce_range=params.reduce_range,
                weight_type=params.weight_type,
                nodes_to_exclude=exclude,
            )
        seconds = time.perf_counter() - start
        frame.finish()
        quantized = sum(frame.counts.get(op, 0) for op in INTEGER_OPS)
        ctx.metric("quantized_nodes", quantized)
        ctx.log(
            f"{quantized} integer node(s) ({params.weight_type} weights, "
            f"{'per channel' if params.per_channel else 'per tensor'}) in {seconds:.1f} s"
        )
        return frame.result("quantized", quantization="dynamic-int8")

    def _mixed_precision(self, src: Path, params: QuantizeDynamicParams, ctx: RunContext) -> list[str]:
        """The nodes mixed precision keeps float (see studio.techniques.mixed_precision)."""
        from studio.techniques.mixed_precision import OnnxScheme, mixed_precision

        assert params.mixed_precision is not None  # only called when set
        scheme = OnnxScheme(
            src,
            ctx.step_dir("mixed_precision"),
            per_channel=params.per_channel,
            reduce_range=params.reduce_range,
            weight_type=params.weight_type,
            op_types=[op for op in params.op_types if op != "Gemm"],
            exclude=params.exclude_nodes,
        )
        choice = mixed_precision(ctx, scheme, params.mixed_precision, self.id)
        if not choice.met:
            ctx.log(
                f"{self.id}: fidelity {choice.fidelity:.5f} stays below the target {params.mixed_precision} "
                f"even with {len(choice.excluded)} nodes float",
                level="warning",
            )
        return choice.excluded
