"""Half precision of a torch module: bfloat16 or float16 weights, and so compute.

bfloat16 keeps float32's exponent range, so activations that overflow float16 (large attention logits,
LayerNorm inputs) stay finite; on CPUs with AVX512-BF16 / AMX it is also the fast choice. float16 has more
mantissa bits but on most CPUs PyTorch has no native float16 matmul and runs it several times slower than
float32: it is meant for GPUs and for a later ONNX / TensorRT stage (`state.info["dtype"]` tells
export.onnx to produce a half-precision graph).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register

_DTYPES = ("float16", "bfloat16")


class HalfParams(Params):
    dtype: Literal["float16", "bfloat16"] = Field(
        "bfloat16",
        description="bfloat16 (float32's range, fast on recent CPUs) or float16 (more precise digits, "
        "narrow range; fast on GPUs, slow on most CPUs)",
    )


def _convert(module: Any, dtype_name: str) -> Any:
    import torch

    if dtype_name not in _DTYPES:
        raise BadInput(f"precision.half: unknown dtype '{dtype_name}' (known: {', '.join(_DTYPES)})")
    dtype = getattr(torch, dtype_name)
    module = module.to(dtype)
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "dtype"):
        config.dtype = dtype  # a saved Hugging Face folder then says what its weights are
    return module


@register
class Half(Technique[HalfParams]):
    id = "precision.half"
    title = "Half precision"
    category = "precision"
    input_kind = "torch"
    output_kind = "torch"
    description = (
        "Converts every floating-point weight and buffer to bfloat16 or float16, halving the size and "
        "running the model in that precision. Integer (quantized) layers are left as they are."
    )
    Params = HalfParams

    def check(self, params: HalfParams, model: LoadedModel) -> None:
        super().check(params, model)
        if model.format == "onnx":
            raise BadInput("precision.half converts torch models; for an ONNX graph use onnx.half")

    def run(self, state: StageState, params: HalfParams, ctx: RunContext) -> StageState:
        import torch

        module = state.module
        floats = [p for p in module.parameters() if p.is_floating_point()]
        if not floats:
            raise BadInput("precision.half: the model has no floating-point weights to convert")
        if params.dtype == "float16" and ctx.device == "cpu":
            ctx.log(
                "float16 on CPU: most matmuls have no native float16 kernel and run slower than float32; "
                "bfloat16 is usually the faster half precision on CPU",
                level="warning",
            )
        before = {p.dtype for p in floats}
        ctx.progress(0.0, f"converting to {params.dtype}")
        with torch.no_grad():
            module = _convert(module, params.dtype)
        ctx.progress(1.0, f"{len(floats)} weight tensors now {params.dtype}")
        ctx.log(f"weights converted from {', '.join(sorted(str(d) for d in before))} to {params.dtype}")
        record = {"technique": self.id, "dtype": params.dtype}
        return dataclasses.replace(
            state,
            module=module,
            transforms=[*state.transforms, record],
            info={**state.info, "dtype": params.dtype},
        )

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        return _convert(module, str(record.get("dtype", "")))
