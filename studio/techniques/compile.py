"""compile.inductor: run the torch model through torch.compile (TorchInductor) instead of eager PyTorch.

Inductor fuses the elementwise work between matmuls (bias, GELU, residual adds, layer norms, the
quantization of activations) into generated C++ loops and, with `freezing`, folds the weights into the
graph as constants so that oneDNN gets them pre-packed. The compiled code is not saved: a variant records
the settings, and reopening it compiles again on its first forward pass (about a minute for MiniLM on 2
cores; once per input shape kind, then reused).

Measured on MiniLM (2-core AVX-512 EPYC, torch 2.13, sequence 128, interleaved in one process, a shared
and unevenly loaded machine): bfloat16 eager -> compiled b1 19.2 -> 14.6 ms and b32 379 -> 335 ms in one
run, no difference in another (17.2 vs 18.0 ms, 342 vs 339 ms); quantize.dynamic_int8 -> compiled was
slower (b1 12.0 -> 18.9 ms, b32 260 -> 293 ms: FBGEMM's int8 linear is an opaque call Inductor cannot
fuse into). torchao's INT8 (per-token activations) compiled matched ONNX Runtime's dynamic INT8 (b1 1.09x,
b32 1.12x) at cosine 0.9976. It never beat the ONNX Runtime recipes on this CPU; it is kept as a block
for torch deployments, where eager is the alternative.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register


class CompileParams(Params):
    mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="default: fusions only; max-autotune-no-cudagraphs: also benchmarks kernel choices for "
        "every matmul while compiling (much longer compile, sometimes faster)",
    )
    freezing: bool = Field(
        True,
        description="fold the weights into the compiled graph as constants (lets oneDNN pre-pack them; the "
        "weights can no longer change, so this must be the last step)",
    )
    dynamic: Literal["auto", "always", "never"] = Field(
        "auto",
        description="shapes: auto (torch's default: the first shape, then any batch size and sequence length "
        "once a second one appears), always (any shape from the start), never (one compilation per shape)",
    )
    warm_up: bool = Field(
        True,
        description="compile during the step, on one calibration batch, and report how long it took "
        "(otherwise the first forward pass of the variant pays it)",
    )


def _options(mode: str, freezing: bool) -> dict[str, Any]:
    options: dict[str, Any] = {"freezing": freezing}
    if mode == "max-autotune-no-cudagraphs":
        options["max_autotune"] = True
    return options


DYNAMIC = {"auto": None, "always": True, "never": False}


def compile_module(module: Any, mode: str, freezing: bool, dynamic: str) -> Any:
    """Compile `module` in place (its state dict keeps its names, so saving and loading are unchanged)."""
    if dynamic not in DYNAMIC:
        raise BadInput(f"compile.inductor: unknown dynamic setting '{dynamic}' (known: {', '.join(DYNAMIC)})")
    module.compile(backend="inductor", dynamic=DYNAMIC[dynamic], options=_options(mode, freezing))
    return module


@register
class CompileInductor(Technique[CompileParams]):
    id = "compile.inductor"
    title = "torch.compile (Inductor)"
    category = "compile"
    input_kind = "torch"
    output_kind = "torch"
    description = (
        "Runs the model through torch.compile with TorchInductor: elementwise work fused into generated "
        "kernels, weights frozen and pre-packed for oneDNN. Same weights and results (to rounding); the "
        "variant compiles again when reopened. Put it last: after it the weights are constants."
    )
    Params = CompileParams

    def check(self, params: CompileParams, model: LoadedModel) -> None:
        super().check(params, model)
        if model.format == "onnx":
            raise BadInput("compile.inductor compiles torch models; an ONNX graph runs in ONNX Runtime")

    def run(self, state: StageState, params: CompileParams, ctx: RunContext) -> StageState:
        import time

        import torch

        if state.module is None or not isinstance(state.module, torch.nn.Module):
            raise BadInput("compile.inductor needs a torch module")
        if ctx.later_steps:
            raise BadInput(
                f"compile.inductor must be the last step (after it: {', '.join(ctx.later_steps)}); "
                "compiled code is not exported and frozen weights cannot change"
            )
        module = compile_module(state.module, params.mode, params.freezing, params.dynamic)
        if params.warm_up and ctx.calibration:
            from studio.families import family_for

            family = family_for(state.model)
            batch = family.batch(state.model, list(ctx.calibration)[:4], ctx.sequence_length)
            ctx.progress(0.1, "compiling (first forward pass)")
            started = time.perf_counter()
            with torch.inference_mode():
                family.forward(module, batch)
            seconds = time.perf_counter() - started
            ctx.metric("compile_seconds", seconds)
            ctx.log(f"compiled in {seconds:.1f} s (mode {params.mode}, freezing {params.freezing})")
        record = {
            "technique": self.id,
            "mode": params.mode,
            "freezing": params.freezing,
            "dynamic": params.dynamic,
        }
        ctx.progress(1.0, "compiled")
        return dataclasses.replace(
            state,
            module=module,
            transforms=[*state.transforms, record],
            info={**state.info, "compiled": True},
        )

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        return compile_module(
            module,
            str(record.get("mode", "default")),
            bool(record.get("freezing", True)),
            str(record.get("dynamic", "auto")),
        )
