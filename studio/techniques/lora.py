"""LoRA recovery: low-rank adapters (peft) trained toward the original on top of a compressed model.

After pruning or quantization the base model stays frozen and only the adapters train (Hu et al.'s LoRA;
on a quantized base this is QLoRA's recipe): far fewer weights to train than `distill`, and a quantized
base keeps its codes. The objective is distill's (studio/techniques/recovery_training.py), or the task
loss where the calibration data has labels.

Adapters on a float Linear (or transformers Conv1D) are folded into its weight with `merge`, which leaves
a plain model of the same shape. Adapters on a quantized layer cannot be folded (the sum is no longer on
the integer grid) and stay as peft LoRA layers around it: the record this block appends lets a saved
variant rebuild them before its weights load, and the adapters are also written in peft's own format
(adapter_config.json + adapter_model.safetensors) in a `peft-adapter` folder beside the variant.

FBGEMM's int8 matmul (quantize.dynamic_int8's layer) has no backward, so while training, each such layer
passes gradients back through its dequantized weight (a straight-through estimator), letting adapters
before it learn; its forward, and the saved layer, are unchanged.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.techniques.base import Params, RunContext, StageState, Technique, register

ADAPTER_FOLDER = "peft-adapter"  # beside a saved variant's weights: the adapters in peft's format
ADAPTER_NAME = "default"


class LoraParams(Params):
    rank: int = Field(8, ge=1, le=4096, description="Rank of each adapter (r): columns of A, rows of B")
    alpha: int = Field(
        16, ge=1, le=100_000, description="LoRA alpha: the adapters' output is scaled by alpha / rank"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input while training")
    target_modules: list[str] = Field(
        default_factory=list,
        description="layers that get adapters: module names (e.g. 'encoder.layer.0.attention.self.query'), "
        "a last name part that covers every layer so named (e.g. 'query', 'value'), or glob patterns; each "
        "entry must match a Linear layer. Empty: every Linear layer whose weight is not tied to another",
    )
    steps: int = Field(100, ge=1, le=1_000_000, description="Optimizer steps (one mini-batch each)")
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="AdamW learning rate of the adapters")
    batch_size: int = Field(16, ge=1, le=4096, description="Calibration examples per step")
    loss: Literal["distill", "task"] = Field(
        "distill",
        description="distill: train toward the original's outputs and hidden states (as the distill block); "
        "task: the model's own task loss (cross-entropy against the calibration labels for classifiers)",
    )
    merge: bool = Field(
        True,
        description="fold the adapters into float Linear weights after training (a plain model of the "
        "same shape); adapters on quantized layers are always kept, and saved in peft's format",
    )
    seed: int = Field(0, ge=0, description="Seed of the adapters' initialisation and of the batch order")

    @field_validator("target_modules")
    @classmethod
    def _no_empty(cls, value: list[str]) -> list[str]:
        if any(not v.strip() for v in value):
            raise ValueError("a target_modules entry is empty")
        return value


def _is_float_linear(module: Any) -> bool:
    from studio.techniques.layer_swap import is_linear

    return is_linear(module)


def _quantized_linear_types() -> tuple[type, ...]:
    from studio.techniques.quantized_layers import DynamicInt8Linear, WeightOnlyLinear

    return (DynamicInt8Linear, WeightOnlyLinear)


def _width(module: Any) -> tuple[int, int]:
    """(in_features, out_features) of a float or quantized Linear."""
    from studio.techniques.layer_swap import shape

    if _is_float_linear(module):
        return shape(module)
    return int(module.in_features), int(module.out_features)


def _candidates(root: Any) -> list[str]:
    """Layers an adapter can sit on: float Linear / Conv1D (weights not tied to another layer) and the
    studio's quantized Linear layers."""
    quantized = _quantized_linear_types()
    seen: dict[int, int] = {}
    for _n, p in root.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    tied = {k for k, n in seen.items() if n > 1}
    out = []
    for name, module in root.named_modules():
        if not name:
            continue
        if isinstance(module, quantized) or (
            _is_float_linear(module) and id(getattr(module, "weight", None)) not in tied
        ):
            out.append(name)
    return out


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def resolve_targets(root: Any, patterns: list[str], technique: str) -> list[str]:
    """Full names of the layers `patterns` choose; an entry matching none is refused with the names
    there are (their last parts, which is how targets are usually written)."""
    names = _candidates(root)
    if not names:
        raise BadInput(f"{technique}: the model has no Linear layer to put adapters on")
    if not patterns:
        return names
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if _matches(n, pattern)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise BadInput(
                f"{technique}: target module '{pattern}' matches no Linear layer of this model; the Linear "
                f"layers are named {', '.join(short)} (full names like '{names[0]}')"
            )
        chosen += [n for n in hits if n not in chosen]
    return [n for n in names if n in set(chosen)]


def check_rank(root: Any, names: list[str], rank: int, technique: str) -> None:
    """A rank above a layer's smaller side adds no expressiveness, only weights: refused."""
    for name in names:
        width_in, width_out = _width(root.get_submodule(name))
        if rank > min(width_in, width_out):
            raise BadInput(
                f"{technique}: rank {rank} is larger than layer '{name}' ({width_in} inputs, {width_out} "
                f"outputs); the rank can be at most {min(width_in, width_out)} there"
            )


def _lora_config(names: list[str], rank: int, alpha: int, dropout: float) -> Any:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    # peft wraps only the layer types it knows; the studio's quantized Linear layers call their own
    # forward inside peft's LoRA Linear, which adds the adapters' output.
    config._register_custom_module({cls: LoraLinear for cls in _quantized_linear_types()})
    return config


def inject(root: Any, names: list[str], rank: int, alpha: int, dropout: float) -> Any:
    """Wrap each named layer in a peft LoRA layer (new adapters: B = 0, so outputs are unchanged)."""
    import torch
    from peft import inject_adapter_in_model

    config = _lora_config(names, rank, alpha, dropout)
    # peft places new adapters on the device of the base layer's `weight` / `qweight`, and a dynamic INT8
    # layer holds only packed parameters: it is given a placeholder for the moment of injection.
    hinted = []
    for name in names:
        layer = root.get_submodule(name)
        if not any(True for _ in layer.parameters()) and not hasattr(layer, "qweight"):
            layer.qweight = torch.empty(0)
            hinted.append(layer)
    try:
        with warnings.catch_warnings():  # peft warns of every layer type it does not know: these are meant
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            return inject_adapter_in_model(config, root, adapter_name=ADAPTER_NAME)
    finally:
        for layer in hinted:
            del layer.qweight


@contextmanager
def _straight_through_int8(root: Any) -> Iterator[None]:
    """Let gradients pass dynamic INT8 layers (FBGEMM's kernel has no backward) through their
    dequantized weights, for as long as the adapters train."""
    import torch

    from studio.techniques.quantized_layers import DynamicInt8Linear

    layers = [m for m in root.modules() if isinstance(m, DynamicInt8Linear)]

    def differentiable(layer: Any) -> Any:
        codes, scales, _bias = layer.unpacked()
        weight = (codes.to(torch.float32) * scales.reshape(-1, 1)).contiguous()

        class _Int8Matmul(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, x: Any) -> Any:
                return DynamicInt8Linear.forward(layer, x)

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:
                return grad.to(torch.float32) @ weight

        return _Int8Matmul.apply

    try:
        for layer in layers:
            layer.forward = differentiable(layer)  # type: ignore[method-assign]  # this instance only
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def merge_adapters(root: Any, names: list[str]) -> None:
    from studio.techniques.layer_swap import set_submodule

    for name in names:
        layer = root.get_submodule(name)
        layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
        set_submodule(root, name, layer.get_base_layer())


def save_adapter(root: Any, config: Any, folder: Path) -> None:
    """The adapters in peft's format, loadable with `PeftModel.from_pretrained(base, folder)` on the
    model they were trained on (the variant without its adapters)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    state = get_peft_model_state_dict(root, adapter_name=ADAPTER_NAME)
    state = {f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()}
    save_file(state, str(folder / "adapter_model.safetensors"))


@register
class Lora(Technique[LoraParams]):
    id = "train.lora"
    title = "LoRA recovery"
    category = "distillation"
    input_kind = "torch"
    output_kind = "torch"
    description = (
        "Trains low-rank adapters (LoRA, with peft) on the calibration data toward the original model while "
        "the compressed base stays frozen: win back quality lost to pruning or quantization with few trained "
        "weights. On a quantized base the adapters sit beside the integer weights (QLoRA). With merge, "
        "adapters on float layers are folded into the weights."
    )
    Params = LoraParams

    def check(self, params: LoraParams, model: LoadedModel) -> None:
        super().check(params, model)
        if model.format in ("torchscript", "exported-program", "onnx"):
            raise BadInput(
                f"{self.id} wraps layers of a Python torch module; a {model.format} model has no layers to wrap"
            )
        if model.module is not None:  # later steps may shrink layers further: run checks again
            check_rank(
                model.module,
                resolve_targets(model.module, params.target_modules, self.id),
                params.rank,
                self.id,
            )

    def run(self, state: StageState, params: LoraParams, ctx: RunContext) -> StageState:
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer

        from studio.techniques.recovery_training import TrainSettings, train_toward_original

        p = params
        root = state.module
        if root is None:
            raise BadInput(f"{self.id} needs a torch model in memory")
        if root is ctx.original.module:
            raise BadInput(f"{self.id} would train the reference model itself")
        if not ctx.calibration:
            raise BadInput(f"{self.id} needs training examples: set the recipe's data.calibration")
        if any(isinstance(m, BaseTunerLayer) for m in root.modules()):
            raise BadInput(
                f"{self.id}: the model already holds LoRA adapters; merge them (merge: true) first"
            )
        names = resolve_targets(root, p.target_modules, self.id)
        check_rank(root, names, p.rank, self.id)
        quantized_types = _quantized_linear_types()
        on_quantized = [n for n in names if isinstance(root.get_submodule(n), quantized_types)]

        grad_before = {id(q): q.requires_grad for q in root.parameters()}
        torch.manual_seed(p.seed)  # the A matrices' initialisation
        inject(root, names, p.rank, p.alpha, p.dropout)
        adapters = [q for n, q in root.named_parameters() if ".lora_" in n]
        dropouts = [m for n, m in root.named_modules() if n.endswith(f"lora_dropout.{ADAPTER_NAME}")]
        settings = TrainSettings(
            steps=p.steps,
            learning_rate=p.learning_rate,
            batch_size=p.batch_size,
            task_loss=p.loss == "task",
            seed=p.seed,
        )
        ctx.log(
            f"{self.id}: rank-{p.rank} adapters on {len(names)} layers"
            + (
                f" ({len(on_quantized)} of them quantized: their base stays frozen as stored)"
                if on_quantized
                else ""
            )
        )
        with _straight_through_int8(root):
            result = train_toward_original(root, adapters, ctx, settings, self.id, train_mode=dropouts)
        for q in root.parameters():
            if id(q) in grad_before:
                q.requires_grad_(grad_before[id(q)])

        merged = [n for n in names if n not in set(on_quantized)] if p.merge else []
        kept = [n for n in names if n not in set(merged)]
        if merged:
            merge_adapters(root, merged)
        if p.merge and on_quantized:
            ctx.log(
                f"{self.id}: {len(on_quantized)} adapters sit on quantized layers and cannot be folded into "
                "their integer weights: kept as adapters",
                "warning",
            )
        info = dict(state.info)
        info["lora"] = {**result.summary(), "rank": p.rank, "layers": len(names), "merged": len(merged)}
        transforms = list(state.transforms)
        if kept:
            folder = ctx.step_dir("lora") / ADAPTER_FOLDER
            save_adapter(root, _lora_config(kept, p.rank, p.alpha, p.dropout), folder)
            info["peft_adapter"] = str(folder)
            transforms.append(
                {
                    "technique": self.id,
                    "rank": p.rank,
                    "alpha": p.alpha,
                    "dropout": p.dropout,
                    "modules": kept,
                }
            )
        ctx.metric("lora_layers", len(names))
        ctx.metric("lora_merged_layers", len(merged))
        return dataclasses.replace(state, module=root, transforms=transforms, info=info)

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        names = list(record.get("modules", []))
        for name in names:
            try:
                module.get_submodule(name)
            except AttributeError as exc:
                raise BadInput(
                    f"{cls.id}: the variant names a layer '{name}' the model does not have"
                ) from exc
        return inject(
            module, names, int(record["rank"]), int(record["alpha"]), float(record.get("dropout", 0.0))
        )
