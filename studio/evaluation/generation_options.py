"""How a torch causal LM generates while it is timed: its attention implementation and its KV cache
(`evaluate.generation.attention` and `.cache`), checked before a run and applied by the greedy loop.

FlashAttention 2 needs a CUDA device and the flash-attn package; transformers would otherwise fail only
at the first forward pass, so both are checked first. A static cache is allocated for the positions it
will hold; a config it cannot be built from is refused, naming the option.
"""

from __future__ import annotations

from typing import Any

from studio.errors import BadInput

# the recipe's names for the attention implementations, and what transformers calls them
ATTENTION = {"eager": "eager", "sdpa": "sdpa", "flash": "flash_attention_2"}
CACHES = ("dynamic", "static", "none")


def static_cache(config: Any, max_len: int) -> Any:
    """A transformers StaticCache of `max_len` positions; a model whose config it cannot be built from is
    a BadInput saying so."""
    from transformers import StaticCache

    try:
        return StaticCache(config=config, max_cache_len=max_len)
    except (AttributeError, TypeError, ValueError, NotImplementedError) as exc:
        raise BadInput(f"cache 'static' is not possible for this model: {exc}") from exc


def flash_unavailable(device: Any = None) -> str | None:
    """Why FlashAttention 2 cannot run here (None when it can): it needs a CUDA device and the flash-attn
    package, and transformers would otherwise fail only at the first forward pass."""
    import torch
    from transformers.utils import is_flash_attn_2_available

    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return "attention 'flash' (FlashAttention 2) needs a CUDA GPU, and this model runs on the CPU"
    if not is_flash_attn_2_available():
        return "attention 'flash' needs the flash-attn package, which is not installed here"
    return None


def set_attention(module: Any, attention: str, device: Any = None) -> None:
    """Switch a transformers module to `attention` (a key of ATTENTION); a BadInput when it cannot."""
    if attention not in ATTENTION:
        raise BadInput(f"unknown attention '{attention}' (expected one of: {', '.join(ATTENTION)})")
    if attention == "flash":
        reason = flash_unavailable(device)
        if reason:
            raise BadInput(reason)
    if not hasattr(module, "set_attn_implementation"):
        raise BadInput(
            f"the attention of {type(module).__name__} cannot be chosen (not a transformers model)"
        )
    try:
        module.set_attn_implementation(ATTENTION[attention])
    except (ValueError, ImportError) as exc:
        raise BadInput(f"attention '{attention}' is not possible for {type(module).__name__}: {exc}") from exc
