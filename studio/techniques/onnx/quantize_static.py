"""onnx.quantize_static: INT8 weights and activations in QDQ format, the activation ranges calibrated on
the recipe's calibration data (ONNX Runtime's quantize_static after its shape inference)."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from studio.checkpoints.onnx_graph import needs_external_data
from studio.errors import BadInput
from studio.techniques.base import RunContext, StageState, Technique, register
from studio.techniques.onnx.graph_pass import GraphPass
from studio.techniques.onnx.quantization import STATIC_OP_TYPES, IntegerQuantizeParams

if TYPE_CHECKING:
    from studio.checkpoints.base import LoadedModel


class QuantizeStaticParams(IntegerQuantizeParams):
    known_op_types: ClassVar[tuple[str, ...]] = STATIC_OP_TYPES
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how activation ranges are chosen from the calibration outputs"
    )
    samples: int = Field(
        64, ge=1, le=10000, description="calibration examples (clipped to those available), one at a time"
    )
    per_channel: bool = Field(False, description="one weight scale per output channel")
    activation_type: Literal["int8", "uint8"] = Field(
        "int8", description="integer type of activations (int8: ONNX Runtime's default S8S8 QDQ)"
    )
    op_types: list[str] = Field(
        default=["MatMul", "Gemm", "Conv"],
        description=f"operator types to quantize (of: {', '.join(STATIC_OP_TYPES)})",
    )


@register
class OnnxQuantizeStatic(Technique[QuantizeStaticParams]):
    id = "onnx.quantize_static"
    title = "ONNX static INT8 (QDQ)"
    category = "quantization"
    input_kind = "onnx"
    output_kind = "onnx"
    description = (
        "INT8 weights and activations in QDQ format, activation ranges calibrated on the calibration data "
        "(onnxruntime.quantization.quantize_static)."
    )
    Params = QuantizeStaticParams

    def run(self, state: StageState, params: QuantizeStaticParams, ctx: RunContext) -> StageState:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        frame = GraphPass.open(
            state, ctx, "quantize_static", technique=self.id, float32=True, exclude=params.exclude_nodes
        )
        src = frame.src
        examples = list(ctx.calibration)
        if not examples:
            raise BadInput("onnx.quantize_static needs calibration data (recipe data.calibration)")
        n = min(params.samples, len(examples))
        if n < params.samples:
            ctx.log(f"calibrating on {n} examples (the calibration data has {len(examples)})")
        out = frame.out
        # Symbolic shape inference types every tensor (fused ops included), else their activations stay float.
        prepared = out.parent / "_prepared.onnx"
        ctx.progress(0.05, "shape inference")
        inference = preprocess(src, prepared)
        if inference != "symbolic":
            ctx.log("symbolic shape inference failed on this graph; ONNX shape inference typed it instead")
        reader = calibration_reader(state.model, src, examples[:n], ctx)
        qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[params.calibration_method]
        start = time.perf_counter()
        ctx.progress(0.1, f"calibrating ({params.calibration_method}, {n} examples)")
        try:
            with frame.tool("ONNX Runtime's static quantization", warnings=True):
                quantize_static(
                    str(prepared),
                    str(out),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(params.op_types),
                    per_channel=params.per_channel,
                    activation_type=qtype[params.activation_type],
                    weight_type=qtype[params.weight_type],
                    nodes_to_exclude=list(params.exclude_nodes) or None,
                    calibrate_method=method,
                    use_external_data_format=needs_external_data(src),
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
        finally:
            for scratch in (prepared, prepared.with_name(prepared.name + ".data")):
                scratch.unlink(missing_ok=True)
        seconds = time.perf_counter() - start
        frame.finish()
        counts = frame.counts
        ctx.metric("quantize_linear_nodes", counts.get("QuantizeLinear", 0))
        ctx.log(
            f"QDQ: {counts.get('QuantizeLinear', 0)} QuantizeLinear / {counts.get('DequantizeLinear', 0)} "
            f"DequantizeLinear nodes, calibrated on {n} examples in {seconds:.1f} s"
        )
        return frame.result("quantized", quantization="static-qdq-int8")


def preprocess(src: Path, out: Path) -> str:
    """ONNX Runtime's quantization pre-processing without its graph optimization (the graph stays
    portable; onnx.optimize is its own step): symbolic and ONNX shape inference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    external = needs_external_data(src)
    options = {
        "skip_optimization": True,
        "save_as_external_data": external,
        "all_tensors_to_one_file": True,
        "external_data_location": out.name + ".data" if external else None,
    }
    # A failed symbolic inference dumps its partial model into the working directory: keep that in a
    # scratch folder next to the output.
    scratch = out.parent / "_shape_inference"
    scratch.mkdir(exist_ok=True)
    try:
        with contextlib.chdir(scratch):
            try:
                quant_pre_process(str(src), str(out), auto_merge=True, **options)
                return "symbolic"
            except Exception:
                pass  # it gives up on some exported subgraphs; ONNX's own inference still types most
            try:
                quant_pre_process(str(src), str(out), skip_symbolic_shape=True, **options)
                return "onnx"
            except Exception as exc:
                raise BadInput(f"shape inference before quantization failed: {exc}", path=src) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def calibration_reader(model: LoadedModel, src: Path, examples: Sequence[Any], ctx: RunContext) -> Any:
    """One example per feed, made as the runners make them. The examples are tokenized together so every
    feed has the same shape (entropy and percentile calibration stack their histograms); padded
    positions are masked, as they are in any padded batch."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    from studio.checkpoints.onnx_graph import load_onnx_graph, metadata_of
    from studio.evaluation.runners import graph_config, graph_feeds
    from studio.families import Batch, family_for

    graph = load_onnx_graph(src)
    inputs = [
        (i.name, str(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)))
        for i in graph.graph.input
    ]
    family = family_for(model)
    config = graph_config(model, metadata_of(graph))
    full = family.batch(model, examples, ctx.sequence_length)
    rows = [
        Batch(
            inputs={k: v[i : i + 1] for k, v in full.inputs.items()},
            labels=None if full.labels is None else full.labels[i : i + 1],
        )
        for i in range(len(examples))
    ]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.index = 0

        def get_next(self) -> dict[str, Any] | None:
            if self.index >= len(rows):
                return None
            self.index += 1
            ctx.progress(0.1 + 0.6 * self.index / len(rows), "calibrating")
            return graph_feeds(rows[self.index - 1], inputs, family, config)

        def rewind(self) -> None:
            self.index = 0

    return Reader()
