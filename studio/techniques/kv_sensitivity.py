"""Per-layer sensitivity of a causal LM to a quantized KV cache: which decoder layers' caches tolerate the
bits and which do not (the `kv-bits` scheme of `model-studio sensitivity`).

A quantized cache changes nothing in a single forward pass over a whole sequence: only tokens read back
from the cache are affected. So every measurement feeds the calibration windows through a fresh cache in
which the chosen layers are quantized and the others kept in the model's precision
(`KVCacheSpec.float_layers`, which kv_cache.quantize takes too), and compares each position's next-token
distribution with the float model's: fidelity is 1 - the mean KL divergence, the causal-LM family's
measure.

The windows are fed in steps of `residual_length` tokens rather than one token at a time
(studio.evaluation.kv_quant.decode_logits): a token then reads every token older than the previous step
from the quantized store and the newer ones in float, where decoding would hold exactly the last
`residual_length` in float; the difference is at most one step of float context, and a measurement costs
a few forward passes per window instead of one per token (with no residual window, one token at a time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import Any

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.evaluation.kv_quant import KVCacheSpec
from studio.techniques.mixed_precision import Layer


class KVProbe:
    """Calibration windows and the float model's logits on them, computed once."""

    def __init__(self, model: LoadedModel, examples: Sequence[Any], sequence_length: int) -> None:
        import torch

        from studio.techniques.layerwise import calibration_windows

        if not examples:
            raise BadInput("sensitivity needs examples to run the model on")
        if model.module is None:
            raise BadInput("the kv-bits scheme needs a torch causal LM", path=model.path)
        self.model = model
        self.examples = len(examples)
        self.sequence_length = sequence_length
        self.windows = calibration_windows(model, examples, sequence_length, 1, "the kv-bits scheme")
        with torch.inference_mode():
            self.reference = [model.module(input_ids=ids).logits.float().cpu() for ids in self.windows]

    @property
    def objective(self) -> str:
        return "1 - KL divergence of next-token distributions from the original's, decoding through the cache"

    def fidelity(self, logits: Sequence[Any]) -> float:
        """1 - the KL divergence from the reference, averaged over every position of every window."""
        import torch

        total, positions = 0.0, 0
        for ref, out in zip(self.reference, logits, strict=True):
            p = torch.log_softmax(ref.double(), dim=-1)
            q = torch.log_softmax(out.double(), dim=-1)
            kl = (p.exp() * (p - q)).sum(-1)
            total += float(kl.sum())
            positions += kl.numel()
        return 1.0 - total / max(1, positions)


class KVScheme:
    """One layer per decoder layer; `fidelity(names, probe)` decodes with exactly those layers' caches
    quantized by `spec`."""

    def __init__(self, module: Any, spec: KVCacheSpec) -> None:
        from studio.evaluation.kv_quant import quantized_cache

        config = getattr(module, "config", None)
        if config is None:
            raise BadInput("the kv-bits scheme needs a transformers causal LM (one with a config)")
        quantized_cache(config, spec)  # refuses what a quantized cache cannot hold, before measuring
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.module = module
        self.spec = spec
        self.count = int(text.num_hidden_layers)
        self.layers = [Layer(str(i), _attention_name(module, i), "kv-cache", 0) for i in range(self.count)]
        self.skipped: list[str] = []

    def logits(self, quantized: Collection[int], probe: KVProbe) -> list[Any]:
        keep = tuple(i for i in range(self.count) if i not in set(quantized))
        spec = dataclasses.replace(self.spec, float_layers=keep)
        return [stepped_logits(self.module, ids, spec) for ids in probe.windows]

    def fidelity(self, names: Collection[str], probe: KVProbe) -> float:
        return probe.fidelity(self.logits([int(n) for n in names], probe))

    def close(self) -> None:
        return None


def stepped_logits(module: Any, ids: Any, spec: KVCacheSpec) -> Any:
    """Logits [1, L, vocab] of `ids` [1, L] fed through a fresh cache of `spec` in steps of its residual
    window (one token at a time without one)."""
    import torch

    from studio.evaluation.kv_quant import quantized_cache

    step = max(1, spec.residual_length)
    cache = quantized_cache(module.config, spec)
    out = []
    with torch.inference_mode():
        for i in range(0, ids.shape[1], step):
            chunk = module(input_ids=ids[:, i : i + step], past_key_values=cache, use_cache=True)
            out.append(chunk.logits.float().cpu())
    return torch.cat(out, dim=1)


def _attention_name(module: Any, index: int) -> str:
    """The attention module of decoder layer `index` ("model.layers.3.self_attn"), or "" if not found."""
    from studio.techniques import layerwise
    from studio.techniques.layer_swap import is_linear

    found = layerwise.decoder_blocks(module, is_linear)
    if found is None or index >= len(found[1]):
        return ""
    prefix, blocks = found
    for name, _child in blocks[index].named_children():
        if "attn" in name or "attention" in name:
            return f"{prefix}.{index}.{name}"
    return f"{prefix}.{index}"
