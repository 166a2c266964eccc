"""KV-cache quantization: a causal LM that generates with its keys and values stored in fewer bits.

The weights are not touched. The block records the cache choice in the model's config (`studio_kv_cache`,
also kept as a transform record so a saved variant carries it) and the generation loop builds the cache
from that record (studio/evaluation/kv_quant.py holds the caches and their quantizers), so decoding,
`metrics.generation.kv_cache_bytes` and the perplexity of the variant all go through the quantized cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field, model_validator

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.evaluation.kv_quant import CONFIG_KEY, QUANTO_BITS, TURBOQUANT_BITS, KVCacheSpec
from studio.techniques.base import Params, RunContext, StageState, Technique, register


def _bits_list(bits: tuple[float, ...]) -> str:
    return ", ".join(f"{b:g}" for b in bits)


class KVCacheParams(Params):
    method: Literal["quanto", "turboquant"] = Field(
        "turboquant",
        description="quanto: asymmetric integer codes, keys per channel and values per token, each group with "
        "its own scale; turboquant: a random rotation, one Lloyd-Max codebook for every coordinate (no "
        "per-group scale) and, for keys, a 1-bit sketch of the residual that keeps attention scores unbiased",
    )
    bits: float = Field(
        4,
        description=f"bits per key coordinate (quanto: {_bits_list(QUANTO_BITS)}; turboquant: "
        f"{_bits_list(TURBOQUANT_BITS)}, where x.5 gives half the coordinates one bit more)",
    )
    value_bits: float | None = Field(
        None, description="bits per value coordinate, same choices as bits (empty: the same as bits)"
    )
    residual_length: int | None = Field(
        None,
        ge=0,
        le=4096,
        description="the most recent tokens kept in the model's precision; older ones are quantized (empty: "
        "16 for quanto, whose key scales span a block of tokens; 0 for turboquant, which quantizes each token "
        "alone)",
    )
    group_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="quanto only: tokens sharing a key channel's scale, and channels sharing a value "
        "token's scale (a head width it does not divide uses the whole head)",
    )
    float_layers: list[int] = Field(
        default_factory=list,
        description="decoder layers (numbered from 0) whose cache stays in the model's precision: the layers "
        "`model-studio sensitivity --scheme kv-bits` finds least tolerant of the bits",
    )

    @model_validator(mode="after")
    def _supported(self) -> KVCacheParams:
        try:
            self.spec()
        except BadInput as exc:
            raise ValueError(exc.problem) from exc
        return self

    def spec(self) -> KVCacheSpec:
        return KVCacheSpec(
            method=self.method,
            bits=float(self.bits),
            value_bits=float(self.bits if self.value_bits is None else self.value_bits),
            residual_length=-1 if self.residual_length is None else self.residual_length,
            group_size=self.group_size,
            float_layers=tuple(self.float_layers),
        )


def _attention_config(model: LoadedModel) -> Any:
    config = getattr(model.module, "config", None) or model.config
    if config is None:
        raise BadInput("kv_cache.quantize needs a transformers model (one with a config)")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if not getattr(text, "num_attention_heads", None):
        raise BadInput(
            "kv_cache.quantize needs a model with attention (a KV cache to quantize); this model's config "
            "has no attention heads"
        )
    return config


@register
class KVCacheQuantize(Technique[KVCacheParams]):
    id = "kv_cache.quantize"
    title = "KV-cache quantization"
    category = "quantization"
    input_kind = "torch"
    output_kind = "torch"
    families = ("causal-lm",)
    description = (
        "Generate with the KV cache stored in 1-8 bits instead of the model's precision: the cache, not the "
        "weights, is what grows with context. The newest tokens stay in full precision; older ones are "
        "quantized per channel/per token (quanto) or with TurboQuant's rotation and optimal scalar codes. "
        "The weights are unchanged; generation, kv_cache_bytes and perplexity use the quantized cache."
    )
    Params = KVCacheParams

    def check(self, params: KVCacheParams, model: LoadedModel) -> None:
        super().check(params, model)
        if model.format in ("torchscript", "exported-program", "onnx"):
            raise BadInput(
                f"kv_cache.quantize needs a transformers model; a {model.format} model has no cache"
            )
        from studio.evaluation.kv_quant import quantized_cache

        quantized_cache(_attention_config(model), params.spec())  # refuses layers it cannot hold

    def run(self, state: StageState, params: KVCacheParams, ctx: RunContext) -> StageState:
        from studio.evaluation.kv_quant import quantized_cache

        module = state.module
        config = getattr(module, "config", None)
        if config is None:
            raise BadInput("kv_cache.quantize needs a transformers model (one with a config)")
        spec = params.spec()
        quantized_cache(config, spec)  # the same refusal as check, for a module changed by earlier steps
        setattr(config, CONFIG_KEY, spec.record())
        kept = f"; layers {', '.join(map(str, spec.float_layers))} kept float" if spec.float_layers else ""
        ctx.log(
            f"{self.id}: {spec.method} cache, keys {spec.bits:g} bits, values {spec.value_bits:g} bits, "
            f"last {spec.residual_length} tokens in full precision{kept}"
        )
        ctx.metric("kv_cache_key_bits", spec.bits)
        ctx.metric("kv_cache_value_bits", spec.value_bits)
        record = {"technique": self.id, **spec.record()}
        return dataclasses.replace(state, module=module, transforms=[*state.transforms, record])

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        spec = KVCacheSpec.from_record(record)
        setattr(module.config, CONFIG_KEY, spec.record())
        return module
