"""What the ONNX quantization passes share: the op types ONNX Runtime's tools can quantize, the params
base of onnx.quantize_dynamic, onnx.quantize_static and onnx.quantize_blockwise, and the one call of
ONNX Runtime's `quantize_dynamic` (the pass and mixed precision's trials quantize the same way)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from studio.techniques.base import Params

# Ops quantize_dynamic can make integer (its IntegerOps registry) and Gemm, which it leaves float.
DYNAMIC_OP_TYPES = (
    "MatMul",
    "Gemm",
    "Attention",
    "Conv",
    "EmbedLayerNormalization",
    "Gather",
    "LSTM",
    "Transpose",
)
# Ops quantize_static can surround with QuantizeLinear/DequantizeLinear (its QDQ registry and more).
STATIC_OP_TYPES = (
    "MatMul",
    "Gemm",
    "Conv",
    "ConvTranspose",
    "Attention",
    "Gather",
    "Add",
    "Mul",
    "Relu",
    "Clip",
    "LayerNormalization",
    "Softmax",
    "AveragePool",
    "MaxPool",
    "GlobalAveragePool",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Concat",
    "Split",
    "Slice",
    "Where",
    "Resize",
    "Pad",
)


class OnnxQuantizeParams(Params):
    """Every ONNX quantization pass leaves named nodes as they are (each name is checked against the graph
    before the pass runs)."""

    exclude_nodes: list[str] = Field(
        default=[], description="names of graph nodes to keep as they are (e.g. the last MatMul)"
    )


class IntegerQuantizeParams(OnnxQuantizeParams):
    """The INT8 passes (dynamic and static) also choose the op types to quantize, among those their tool
    knows (`known_op_types`), and the weights' integer type."""

    known_op_types: ClassVar[tuple[str, ...]] = ()
    op_types: list[str]
    weight_type: Literal["int8", "uint8"] = Field("int8", description="integer type of the weights")

    @field_validator("op_types")
    @classmethod
    def _known_ops(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in cls.known_op_types]
        if unknown:
            raise ValueError(f"unknown op types {unknown}; known: {', '.join(cls.known_op_types)}")
        if not value:
            raise ValueError("name at least one op type to quantize")
        return value


def quantize_dynamic_file(
    src: Path,
    out: Path,
    *,
    op_types: Sequence[str],
    per_channel: bool,
    reduce_range: bool,
    weight_type: str,
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] | None = None,
) -> None:
    """ONNX Runtime's dynamic INT8 quantization of `src` into `out` (external weights kept when the input
    has them or nears 2 GB). `nodes_to_quantize` None or empty means every node of `op_types`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from studio.checkpoints.onnx_graph import needs_external_data

    quantize_dynamic(
        str(src),
        str(out),
        op_types_to_quantize=list(op_types),
        per_channel=per_channel,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8,
        nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize is not None else None,
        nodes_to_exclude=list(nodes_to_exclude) if nodes_to_exclude else None,
        use_external_data_format=needs_external_data(src),
        # fused graphs (Attention, SkipLayerNormalization) lack type information for some tensors
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
