"""quantize.nncf: NNCF post-training INT8 of an OpenVINO IR, the peer's own quantization.

`nncf.quantize` inserts FakeQuantize operations (INT8 weights and activations) whose ranges come from
running the IR on calibration data. That data is the recipe's calibration examples made into batches by
the model's family, exactly as the evaluation feeds the model, one example per item, and matched to the
IR's inputs by name (`runners.graph_feeds`). For text models `model_type: transformer` is NNCF's
transformer scheme (SmoothQuant, attention patterns kept in float where INT8 hurts), which the studio
chooses for every text family unless told otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from studio.checkpoints.openvino_ir import import_openvino, ir_metadata, openvino_message, read_ir
from studio.errors import BadInput, Unavailable
from studio.evaluation.openvino_runner import declared_inputs, installed, openvino_availability
from studio.techniques.base import Params, RunContext, StageState, Technique, register
from studio.techniques.openvino_export import (
    QUANTIZED_OPS,
    op_counts,
    save_ir,
    set_metadata,
    verify_against,
)

NO_NNCF = "NNCF is not installed (pip install nncf==3.4.0): OpenVINO models cannot be quantized here"
INT8_WARN_COSINE = 0.9  # below this the log warns that quantization cost much of the function


class NncfParams(Params):
    preset: Literal["default", "performance", "mixed"] = Field(
        "default",
        description="performance: symmetric INT8 weights and activations; mixed: asymmetric activations "
        "(better for activations that are not centred on zero, such as after GELU); default: NNCF's own "
        "choice (mixed for transformers, performance otherwise)",
    )
    subset_size: int = Field(
        300,
        ge=1,
        le=100_000,
        description="calibration examples the ranges are computed on (at most the data's)",
    )
    model_type: Literal["auto", "transformer", "none"] = Field(
        "auto",
        description="transformer: NNCF's transformer scheme (SmoothQuant, float where INT8 hurts "
        "attention); none: the generic scheme; auto: transformer for text models",
    )
    fast_bias_correction: bool = Field(
        True, description="the fast bias correction (off: the slower, more exact one)"
    )
    smooth_quant_alpha: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="transformer scheme: SmoothQuant's migration strength for matrix products (how much of "
        "the activations' outliers move into the weights, 0-1; -1 turns SmoothQuant off); empty: NNCF's "
        "default (0.95)",
    )
    ignored_names: list[str] = Field(
        default_factory=list, description="names of IR operations kept in float (all must exist)"
    )
    ignored_patterns: list[str] = Field(
        default_factory=list, description="regular expressions: IR operations whose names match stay float"
    )
    ignored_types: list[str] = Field(
        default_factory=list, description="IR operation types kept in float (e.g. MatMul)"
    )
    verify: bool = Field(
        True, description="run the INT8 IR and the float IR on a few calibration examples and report it"
    )


def nncf_availability() -> tuple[bool, str | None]:
    ok, reason = openvino_availability()
    if not ok:
        return ok, reason
    return (True, None) if installed("nncf") else (False, NO_NNCF)


def require_nncf() -> Any:
    try:
        import nncf
    except ImportError as exc:
        raise Unavailable(NO_NNCF) from exc
    return nncf


def calibration_items(state: StageState, ov_model: Any, ctx: RunContext, limit: int) -> list[dict[str, Any]]:
    """The IR's feeds for up to `limit` calibration examples, one example per item."""
    from studio.evaluation.runners import graph_config, graph_feeds
    from studio.families import family_for

    model = state.model
    family = family_for(model)
    inputs = declared_inputs(ov_model)
    config = graph_config(model, ir_metadata(ov_model))
    examples = list(ctx.calibration)[:limit]
    return [
        graph_feeds(family.batch(model, [example], ctx.sequence_length), inputs, family, config)
        for example in examples
    ]


@contextlib.contextmanager
def output_to_stderr() -> Iterator[None]:
    """NNCF logs (its logger's handler holds sys.stdout) and draws its progress bars (rich, on sys.stdout)
    on standard output, where `model-studio bench --json` and `run --json` write their JSON: for the call,
    both go to standard error instead, beside the studio's own progress."""
    from nncf.common.logging import nncf_logger

    handlers = [h for h in nncf_logger.handlers if type(h) is logging.StreamHandler]
    previous = [h.setStream(sys.stderr) for h in handlers]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for handler, stream in zip(handlers, previous, strict=True):
            if stream is not None:  # None: it wrote to stderr already
                handler.setStream(stream)


@register
class QuantizeNncf(Technique[NncfParams]):
    id = "quantize.nncf"
    title = "NNCF INT8 (OpenVINO)"
    category = "quantization"
    input_kind = "openvino"
    output_kind = "openvino"
    description = (
        "NNCF post-training INT8 of the OpenVINO IR: FakeQuantize on weights and activations, ranges "
        "calibrated on the calibration data (transformer scheme for text models). The OpenVINO + NNCF peer."
    )
    Params = NncfParams

    def availability(self) -> tuple[bool, str | None]:
        return nncf_availability()

    def run(self, state: StageState, params: NncfParams, ctx: RunContext) -> StageState:
        from studio.families import family_for

        nncf = require_nncf()
        ov = import_openvino()
        if state.kind != "openvino" or state.path is None:
            raise BadInput("quantize.nncf takes an OpenVINO IR: put export.openvino before it")
        if not ctx.calibration:
            raise BadInput("quantize.nncf needs calibration data (data.calibration) to compute INT8 ranges")
        ov_model = read_ir(state.path)
        metadata = ir_metadata(ov_model)
        items = calibration_items(state, ov_model, ctx, params.subset_size)
        transformer = params.model_type == "transformer" or (
            params.model_type == "auto" and family_for(state.model).takes_text
        )
        options: dict[str, Any] = {
            "subset_size": len(items),
            "fast_bias_correction": params.fast_bias_correction,
        }
        if transformer:
            options["model_type"] = nncf.ModelType.TRANSFORMER
        if params.smooth_quant_alpha is not None:
            options["advanced_parameters"] = nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=params.smooth_quant_alpha)
            )
        if params.preset != "default":
            options["preset"] = nncf.QuantizationPreset(params.preset)
        if params.ignored_names or params.ignored_patterns or params.ignored_types:
            options["ignored_scope"] = nncf.IgnoredScope(
                names=params.ignored_names, patterns=params.ignored_patterns, types=params.ignored_types
            )
        scheme = "transformer" if transformer else "generic"
        ctx.progress(0.1, f"NNCF: calibrating on {len(items)} examples ({scheme} scheme)")
        started = time.perf_counter()
        try:
            with output_to_stderr():
                quantized = nncf.quantize(ov_model, nncf.Dataset(items), **options)
        except nncf.ValidationError as exc:  # an ignored scope naming what the IR does not have
            raise BadInput(f"quantize.nncf: {openvino_message(exc)}") from exc
        seconds = time.perf_counter() - started
        set_metadata(quantized, metadata)  # NNCF's copy need not keep the studio's runtime info
        ctx.progress(0.7, "writing the INT8 IR")
        path = save_ir(quantized, ctx.step_dir("nncf"))
        counts = op_counts(quantized)
        fake = sum(counts[op] for op in QUANTIZED_OPS)
        if not fake:
            raise BadInput("NNCF quantized nothing in this IR (no FakeQuantize inserted): check ignored_*")
        ctx.metric("quantize_seconds", seconds)
        ctx.metric("fake_quantize_ops", fake)
        ctx.log(
            f"NNCF {nncf.__version__} ({scheme} scheme, preset {params.preset}): {fake} FakeQuantize "
            f"operations from {len(items)} calibration examples in {seconds:.1f} s"
        )
        new = StageState(kind="openvino", model=state.model, path=path, info=dict(state.info))
        if params.verify:
            ctx.progress(0.85, "verifying against the float IR")
            verify_against(state, new, ctx, warn_below=INT8_WARN_COSINE)
        new.info["nncf"] = {
            "version": nncf.__version__,
            "openvino_version": ov.__version__,
            "settings": params.model_dump(),
            "model_type": scheme,
            "calibration_examples": len(items),
            "fake_quantize_ops": fake,
        }
        ctx.progress(1.0, "quantized")
        return new
