"""onnx.quantize_blockwise: 8- or 4-bit block-wise weights for the float MatMuls of an ONNX graph.

ONNX Runtime's `MatMulNBitsQuantizer` stores each MatMul's constant weight as codes with one scale per
block of `block_size` input rows and replaces the node by the `MatMulNBits` contrib op. With accuracy
level 4 the activations are quantized to int8 per block at run time and the product uses the CPU's int8
dot products (AVX512-VNNI), so the layer keeps most of the speed of dynamic INT8 while its activation
scales follow each row block instead of the whole tensor.

Why it is here (measured on MiniLM, 2-core AVX-512 EPYC, ONNX Runtime 1.31):
- every MatMul at 8 bits, blocks of 128: mean cosine 0.9997 (per-tensor dynamic INT8: 0.964), but about
  1.3x slower than dynamic INT8 (MLAS's int8 GEMM is the faster kernel);
- the layers dynamic INT8 hurts most (the FFN output projections, whose input is the GELU output with its
  outliers) kept out of onnx.quantize_dynamic and given to this block instead: the fidelity of keeping
  them float, at the size and nearly the speed of INT8. The two blocks compose: this one only takes
  MatMuls that are still float.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from pydantic import Field, field_validator

from studio.checkpoints.onnx_graph import QUANT_OPS, save_onnx
from studio.errors import BadInput
from studio.techniques.base import RunContext, StageState, Technique, register
from studio.techniques.onnx.graph_pass import GraphPass
from studio.techniques.onnx.quantization import OnnxQuantizeParams


class BlockwiseParams(OnnxQuantizeParams):
    bits: Literal[8, 4] = Field(8, description="bits per weight: 8, or 4 (two codes per byte)")
    block_size: int = Field(
        128,
        ge=16,
        le=2048,
        description="input rows sharing one scale (a power of two, at least 16); smaller blocks are more "
        "precise and slower",
    )
    symmetric: bool = Field(True, description="codes centred on zero; off: a zero point per block too")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4,
        description="compute type of MatMulNBits: 4 quantizes activations to int8 per block and uses int8 dot "
        "products (fastest on VNNI CPUs); 0 (unset), 1 (float32), 2 (float16), 3 (bfloat16) dequantize the "
        "weights instead",
    )

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two, got {value}")
        return value


@register
class OnnxQuantizeBlockwise(Technique[BlockwiseParams]):
    id = "onnx.quantize_blockwise"
    title = "ONNX block-wise INT8 / INT4 MatMul"
    category = "quantization"
    input_kind = "onnx"
    output_kind = "onnx"
    description = (
        "Stores the weight of every float MatMul as 8- or 4-bit codes with one scale per block of input rows "
        "(onnxruntime MatMulNBits); with accuracy level 4 activations are quantized per block and multiplied "
        "in int8. Use alone, or after onnx.quantize_dynamic for the layers it excluded (still float here)."
    )
    Params = BlockwiseParams

    def run(self, state: StageState, params: BlockwiseParams, ctx: RunContext) -> StageState:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        frame = GraphPass.open(
            state, ctx, "quantize_blockwise", technique=self.id, exclude=params.exclude_nodes
        )
        src = frame.src
        graph = onnx.load(str(src))
        candidates = float_matmuls(graph, params.exclude_nodes)
        if not candidates:
            if not (QUANT_OPS | {"MatMulNBits"}) & set(frame.input_counts):
                raise BadInput(
                    "onnx.quantize_blockwise: the graph has no MatMul with a constant float weight to quantize",
                    path=src,
                )
            # After onnx.quantize_dynamic with mixed precision, every node may have been quantized already.
            ctx.log("every MatMul is already quantized: the graph is passed on unchanged", level="warning")
            ctx.metric("blockwise_nodes", 0)
            return state
        start = time.perf_counter()
        ctx.progress(0.1, f"quantizing {len(candidates)} MatMul node(s)")
        quantizer = MatMulNBitsQuantizer(
            graph,
            bits=params.bits,
            block_size=params.block_size,
            is_symmetric=params.symmetric,
            accuracy_level=params.accuracy_level,
            nodes_to_exclude=list(params.exclude_nodes),
            op_types_to_quantize=("MatMul",),
        )
        quantizer_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
        level = quantizer_logger.level
        quantizer_logger.setLevel(logging.WARNING)  # it logs every node at INFO
        try:
            with frame.tool("ONNX Runtime's block-wise quantization"):
                quantizer.process()
        finally:
            quantizer_logger.setLevel(level)
        save_onnx(quantizer.model.model, frame.out)
        seconds = time.perf_counter() - start
        frame.finish()
        done = frame.counts.get("MatMulNBits", 0) - frame.input_counts.get("MatMulNBits", 0)
        ctx.metric("blockwise_nodes", done)
        ctx.log(
            f"{done} MatMul node(s) to MatMulNBits ({params.bits} bits, blocks of {params.block_size}, "
            f"accuracy level {params.accuracy_level}) in {seconds:.1f} s"
        )
        return frame.result("quantized", blockwise_bits=params.bits)


def float_matmuls(graph: object, exclude: list[str]) -> list[str]:
    """Names of MatMul nodes whose second input is a float32 initializer (what MatMulNBits can take)."""
    import onnx

    g = graph.graph  # type: ignore[attr-defined]
    floats = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}
    return [
        n.name
        for n in g.node
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in floats and n.name not in exclude
    ]
