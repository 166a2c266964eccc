"""Quantization-aware training: torchao's QAT flow, converted into the post-training blocks' storage.

Post-training quantization rounds weights the model never saw rounded; QAT trains with the rounding in
the forward pass (fake quantization, straight-through gradients) so the weights settle where their
rounded values work. The flow is torchao 0.18's (`torchao.quantization.qat`): each chosen Linear becomes
a `FakeQuantizedLinear` with an `IntxFakeQuantizeConfig` for its weights (INT8 per output channel, or
INT4 per group, symmetric as the post-training blocks) and, for INT8, one for its input activations
(INT8 asymmetric, computed per batch as at inference), then the model trains toward the original on the
calibration data (studio/techniques/recovery_training.py, distill's objective).

The convert step is the studio's own rather than torchao's: the trained Linear layers are quantized into
exactly the layers of `quantize.dynamic_int8` (bits 8: FBGEMM int8 weights and activations) or
`quantize.weight_only` (bits 4: packed group-wise codes), so a QAT variant is stored, reopened and run
like a post-training one and the two compare directly. torchao's own converted tensors would need
pickling to save and, for INT4, do not run on CPU.

Two differences between what trains and what runs: torchao fake-quantizes activations per token while
FBGEMM quantizes them per tensor (per token is finer, so the trained model sees a little less noise than
it gets), and INT4's symmetric fake quantization divides by 7.5 where the weight-only layer uses the full
-8..7 range (scale max|w| / 8). Both leave the trained weights near their rounding points.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field, field_validator

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register
from studio.techniques.quantize import refuse_unbuildable


class QatParams(Params):
    bits: Literal[8, 4] = Field(
        8,
        description="8: INT8 weights and INT8 activations (stored as quantize.dynamic_int8 stores them); "
        "4: INT4 weights only, one scale per group (stored as quantize.weight_only with bits 4)",
    )
    group_size: int | None = Field(
        None,
        description="for bits 4: input columns sharing one scale; must divide every quantized layer's "
        "input width. Default 128",
    )
    steps: int = Field(100, ge=1, le=1_000_000, description="Optimizer steps (one mini-batch each)")
    learning_rate: float = Field(2e-5, gt=0.0, le=1.0, description="AdamW learning rate")
    batch_size: int = Field(16, ge=1, le=4096, description="Calibration examples per step")
    exclude: list[str] = Field(
        default_factory=list,
        description="Linear layers kept in floating point: module names, a prefix that covers everything "
        "inside it (e.g. 'pooler'), or glob patterns; each entry must match at least one layer",
    )
    seed: int = Field(0, ge=0, description="Seed of the batch order")

    @field_validator("group_size")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("group_size must be a positive number of input columns")
        return value


def _scheme(p: QatParams | dict[str, Any]) -> Any:
    """The post-training layer scheme the trained layers are converted into."""
    from studio.techniques.layer_swap import LayerScheme

    bits = p["bits"] if isinstance(p, dict) else p.bits
    group = p.get("group_size") if isinstance(p, dict) else p.group_size
    if bits == 8:
        return LayerScheme("int8", per_channel=True)
    return LayerScheme("weight-only", bits=4, group_size=group, symmetric=True)


def _fake_quant_configs(bits: int, group: int) -> tuple[Any, Any]:
    """(activation config or None, weight config): torchao's description of what is simulated. INT8
    activations are set per layer afterwards (`fbgemm_activations`); this one is torchao's default."""
    import torch
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    if bits == 8:
        activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        weights = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
        return activations, weights
    return None, IntxFakeQuantizeConfig(torch.int4, group_size=group, is_symmetric=True)  # type: ignore[attr-defined]


def fbgemm_activations() -> Any:
    """A fake quantizer of a Linear's input as FBGEMM's dynamic kernel quantizes it at run time: one
    asymmetric scale for the whole batch, 8 bits on VNNI CPUs and 7 otherwise (DynamicInt8Linear).

    torchao simulates activations per token only; per token is finer than what the converted layer does,
    and on MiniLM training toward it won back almost none of post-training INT8's loss (cosine 0.9770 ->
    0.9773 in 30 steps), because activation rounding is most of that loss."""
    import torch

    from studio.techniques.quantized_layers import vnni_available

    qmax = 255 if vnni_available() else 127

    class PerTensorActivations(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                lo = x.detach().min().clamp(max=0.0)
                hi = x.detach().max().clamp(min=0.0)
                scale = ((hi - lo) / qmax).clamp(min=1e-8).to(torch.float32)
                zero = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, qmax)

    return PerTensorActivations()


def prepare(root: Any, names: list[str], bits: int, group_size: int | None) -> list[str]:
    """torchao's prepare step on the named float Linear layers (weights shared, not copied); returns the
    names it wrapped (transformers' Conv1D has no fake-quantized form and is quantized at convert only)."""
    import torch
    from torchao.quantization.qat import FakeQuantizedLinear

    from studio.techniques.layer_swap import group_width, set_submodule

    wrapped = []
    for name in names:
        layer = root.get_submodule(name)
        if type(layer) is not torch.nn.Linear:
            continue
        act, weight = _fake_quant_configs(bits, group_width(bits, group_size, layer.in_features))
        fake = FakeQuantizedLinear.from_linear(layer, act, weight)
        if act is not None:
            fake.activation_fake_quantizer = fbgemm_activations()
        set_submodule(root, name, fake)
        wrapped.append(name)
    return wrapped


def unwrap(root: Any, names: list[str]) -> None:
    """Back to plain Linear layers holding the trained weights (what the post-training swap reads)."""
    from studio.techniques.layer_swap import set_submodule

    for name in names:
        set_submodule(root, name, root.get_submodule(name).to_linear())


@register
class Qat(Technique[QatParams]):
    id = "quantize.qat"
    title = "Quantization-aware training"
    category = "quantization"
    input_kind = "torch"
    output_kind = "torch"
    description = (
        "Trains the model on the calibration data toward the original with its Linear layers fake-quantized "
        "(torchao QAT: INT8 weights and activations, or INT4 weights), then stores them exactly as "
        "quantize.dynamic_int8 / quantize.weight_only do, so QAT and post-training variants compare "
        "directly. Needs calibration data; slower than post-training quantization, usually closer to the "
        "original."
    )
    Params = QatParams

    def check(self, params: QatParams, model: LoadedModel) -> None:
        super().check(params, model)
        refuse_unbuildable(self.id, model)

    def run(self, state: StageState, params: QatParams, ctx: RunContext) -> StageState:
        import torch

        from studio.techniques.distill import quantized_parts
        from studio.techniques.layer_swap import select, swap_layers
        from studio.techniques.quantize import WeightOnlyParams, refuse_misfits
        from studio.techniques.recovery_training import TrainSettings, train_toward_original

        p = params
        root = state.module
        if root is None:
            raise BadInput(f"{self.id} needs a torch model in memory")
        if not ctx.calibration:
            raise BadInput(
                f"{self.id} trains on calibration data and there is none: set the recipe's data.calibration "
                "(or use quantize.dynamic_int8 / quantize.weight_only, which need none)"
            )
        if root is ctx.original.module:
            raise BadInput(f"{self.id} would train the reference model itself")
        bad = quantized_parts(root)
        if bad:
            raise BadInput(
                f"{self.id}: the model already holds quantized layers ({', '.join(bad[:3])}) that cannot be "
                "trained: put quantize.qat before other quantization steps"
            )
        sel = select(root, p.exclude, self.id, embeddings=False)
        scheme = _scheme(p)
        if p.bits == 4:  # a group that does not tile a row is refused before anything changes
            refuse_misfits(
                root, sel.chosen, WeightOnlyParams(bits=4, group_size=p.group_size, symmetric=True), self.id
            )
        wrapped = prepare(root, sel.chosen, p.bits, p.group_size)
        if len(wrapped) < len(sel.chosen):
            ctx.log(f"{self.id}: {len(sel.chosen) - len(wrapped)} Conv1D layers are quantized without QAT")
        frozen = {id(m.weight) for m in root.modules() if isinstance(m, torch.nn.Embedding)}
        trainable = [q for q in root.parameters() if q.is_floating_point() and id(q) not in frozen]
        settings = TrainSettings(
            steps=p.steps, learning_rate=p.learning_rate, batch_size=p.batch_size, seed=p.seed
        )
        try:
            result = train_toward_original(root, trainable, ctx, settings, self.id)
        finally:
            unwrap(root, wrapped)
        before, after = swap_layers(root, sel.chosen, scheme, ctx.progress)
        ctx.log(
            f"{self.id}: {len(sel.chosen)} layers converted to {p.bits}-bit, {len(sel.excluded)} excluded"
        )
        ctx.metric("quantized_layers", len(sel.chosen))
        ctx.metric("quantized_weight_bytes_before", before)
        ctx.metric("quantized_weight_bytes_after", after)
        record = {
            "technique": self.id,
            "bits": p.bits,
            "group_size": p.group_size,
            "per_channel": True,
            "symmetric": True,
            "modules": sel.chosen,
        }
        info = {**state.info, "qat": {**result.summary(), "bits": p.bits, "layers": len(sel.chosen)}}
        return dataclasses.replace(state, module=root, transforms=[*state.transforms, record], info=info)

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        """The stored layers are the post-training blocks' layers: rebuilt as those blocks rebuild them."""
        from studio.techniques.quantize import DynamicInt8, WeightOnly

        if record.get("bits") == 8:
            return DynamicInt8.restore(module, record)
        return WeightOnly.restore(module, record)
