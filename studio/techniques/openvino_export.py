"""export.openvino: the ONNX graph (or a torch model) as an OpenVINO IR (model.xml + model.bin), run by
OpenVINO's runtime.

`openvino.convert_model` reads the graph with OpenVINO's ONNX frontend; `openvino.save_model` writes the
IR. The studio's ONNX metadata (family, pooling, config) is copied into the IR's runtime info, so the
saved IR is judged like the graph it came from (studio/checkpoints/openvino_ir.py reads it back).

A torch model is exported to ONNX first, by export.onnx with its defaults, rather than handed to
OpenVINO's PyTorch frontend: the graph then carries the same metadata, the same input names and the same
compared output (last hidden state or logits) as the ONNX route, so the two IRs are one artifact, and
the verification compares the IR with the torch model itself. Both
files are written under temporary names and renamed into place, the weights first and the graph last, so
a model.xml on disk always has its complete model.bin.

OpenVINO is one of the runtimes the studio is compared against: this block (and quantize.nncf after it)
builds that peer with the same pipeline, so it is timed and judged with the same code as the studio's
own variants.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field

from studio.checkpoints.openvino_ir import METADATA_KEYS, RT_SECTION, import_openvino, openvino_message
from studio.errors import BadInput
from studio.evaluation.openvino_runner import openvino_availability
from studio.techniques.base import Params, RunContext, StageState, Technique, register

IR_NAME = "model.xml"  # its weights: model.bin beside it (OpenVINO finds them by that name)
QUANTIZED_OPS = ("FakeQuantize", "FakeConvert")
ONNX_SHARE = 0.4  # of the step's progress, taken by the ONNX export when the input is a torch model


class ExportOpenVinoParams(Params):
    compress_to_fp16: bool = Field(
        False,
        description="store float weights as FP16 in model.bin (half the size; OpenVINO computes in FP32 "
        "on the CPU, decompressing them)",
    )
    verify: bool = Field(
        True,
        description="run the IR and ONNX Runtime on a few calibration examples and report the difference",
    )


def set_metadata(ov_model: Any, props: dict[str, str]) -> None:
    """Write the studio's metadata (`studio.family`, ... as ONNX names them) into the IR's runtime info."""
    for key in METADATA_KEYS:
        value = props.get(f"studio.{key}")
        if value:
            ov_model.set_rt_info(str(value), [RT_SECTION, key])


def save_ir(ov_model: Any, folder: Path, compress_to_fp16: bool = False) -> Path:
    """Write `folder/model.xml` and `model.bin` atomically (see the module docstring); returns the xml."""
    ov = import_openvino()
    final = folder / IR_NAME
    partial = folder / f".partial-{IR_NAME}"
    try:
        ov.save_model(ov_model, str(partial), compress_to_fp16=compress_to_fp16)
        os.replace(partial.with_suffix(".bin"), final.with_suffix(".bin"))
        os.replace(partial, final)
    finally:
        for leftover in (partial, partial.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)
    return final


def op_counts(ov_model: Any) -> Counter[str]:
    return Counter(op.get_type_name() for op in ov_model.get_ops())


@register
class ExportOpenVino(Technique[ExportOpenVinoParams]):
    id = "export.openvino"
    title = "OpenVINO IR"
    category = "export"
    input_kind = "onnx"
    also_accepts = ("torch",)
    output_kind = "openvino"
    description = (
        "Converts the ONNX graph (a torch model: exported to ONNX first) to an OpenVINO IR (model.xml + "
        "model.bin), run by OpenVINO's CPU runtime: the OpenVINO peer, timed and judged like every other variant."
    )
    Params = ExportOpenVinoParams

    def availability(self) -> tuple[bool, str | None]:
        return openvino_availability()

    def run(self, state: StageState, params: ExportOpenVinoParams, ctx: RunContext) -> StageState:
        from studio.checkpoints.onnx_graph import read_metadata

        ov = import_openvino()
        reference = state
        done = 0.0  # the share of the step's progress already reported (the ONNX export's, from torch)
        if state.kind == "torch":
            state = onnx_of(state, ctx, share=ONNX_SHARE)
            done = ONNX_SHARE

        def progress(fraction: float, message: str) -> None:
            ctx.progress(done + (1.0 - done) * fraction, message)

        if state.kind != "onnx" or state.path is None:
            raise BadInput("export.openvino takes an ONNX graph or a torch model")
        onnx_path = Path(state.path)
        started = time.perf_counter()
        progress(0.1, "converting the ONNX graph with OpenVINO")
        try:
            ov_model = ov.convert_model(str(onnx_path))
        except Exception as exc:  # the frontend raises its own OpConversionFailure / GeneralFailure types
            raise BadInput(
                f"OpenVINO cannot convert the ONNX graph: {openvino_message(exc)}", path=onnx_path
            ) from exc
        set_metadata(ov_model, read_metadata(onnx_path))
        out_dir = ctx.step_dir("openvino")
        progress(0.6, "writing the IR")
        path = save_ir(ov_model, out_dir, params.compress_to_fp16)
        seconds = time.perf_counter() - started
        size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
        ctx.metric("convert_seconds", seconds)
        ctx.metric("ir_size_bytes", size)
        ctx.log(
            f"wrote {path.name} + {path.with_suffix('.bin').name} ({size / 1e6:.1f} MB"
            f"{', FP16 weights' if params.compress_to_fp16 else ''}) with OpenVINO {ov.__version__} "
            f"in {seconds:.1f} s"
        )
        new = StageState(kind="openvino", model=state.model, path=path, info=dict(state.info))
        if params.verify and ctx.calibration:
            progress(0.8, f"verifying against {'torch' if reference.kind == 'torch' else 'ONNX Runtime'}")
            verify_against(reference, new, ctx)
        new.info["openvino"] = {
            "version": ov.__version__,
            "compress_to_fp16": params.compress_to_fp16,
            "onnx": str(onnx_path),
            "from": reference.kind,
        }
        progress(1.0, "exported")
        return new


def onnx_of(state: StageState, ctx: RunContext, share: float) -> StageState:
    """The torch model as export.onnx writes it (defaults, its own check against torch skipped: the IR is
    checked against torch afterwards), in this step's folder; its progress fills the first `share` of the
    step's."""
    import dataclasses

    from studio.events import Event, Progress
    from studio.techniques.onnx.export import ExportOnnx, ExportOnnxParams

    if state.module is None:
        raise BadInput("export.openvino needs a torch module or an ONNX graph")

    def emit(event: Event) -> None:
        if isinstance(event, Progress):
            event = dataclasses.replace(event, fraction=event.fraction * share)
        ctx.emit(event)

    ctx.log("exporting the torch model to ONNX first (export.onnx's defaults), then converting the graph")
    return ExportOnnx().run(state, ExportOnnxParams(verify=False), dataclasses.replace(ctx, emit=emit))


def verify_against(
    reference: StageState, state: StageState, ctx: RunContext, warn_below: float = 0.99, rows: int = 4
) -> float:
    """Cosine of the IR's compared output against `reference`'s runtime on a few calibration examples,
    reported as a metric (a low one warns: it is the evaluation's fidelity that judges the variant)."""
    import torch

    from studio.evaluation.runners import make_runner
    from studio.families import family_for

    model = state.model
    batch = family_for(model).batch(model, list(ctx.calibration)[:rows], ctx.sequence_length)
    expected = make_runner(reference, device="cpu")(batch)  # both on the CPU: one kind of arithmetic
    got = make_runner(state)(batch)
    cosine = float(torch.nn.functional.cosine_similarity(got.flatten(1), expected.flatten(1), dim=-1).min())
    diff = float((got - expected).abs().max())
    ctx.metric("openvino_cosine", cosine)
    ctx.metric("openvino_max_abs_diff", diff)
    ctx.log(f"OpenVINO vs {reference.kind}: max |diff| {diff:.2e}, lowest cosine {cosine:.5f}")
    if cosine < warn_below:
        ctx.log(f"the IR's outputs are far from {reference.kind}'s (cosine {cosine:.3f})", level="warning")
    return cosine
