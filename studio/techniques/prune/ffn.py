"""Transformer feed-forward blocks for prune.structured: finding them, scoring their neurons and
removing neurons from the up projections (outputs) and the down projection (inputs) together."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from studio.techniques.prune.surgery import (
    dense_float_weight,
    is_conv1d,
    is_linear_like,
    keep_inputs,
    keep_outputs,
    out_features,
)


@dataclasses.dataclass
class FFN:
    """One feed-forward block: `up` layers produce the neurons, `down` consumes them."""

    name: str  # the module owning the FFN layers (a transformer layer or an MLP module)
    owner: Any
    up: list[Any]
    down: Any

    @property
    def size(self) -> int:
        return out_features(self.up[0])


def find_ffns(module: Any) -> list[FFN]:
    """Transformer FFN blocks: BERT-style (intermediate.dense / output.dense), Llama-style (gate/up/down
    projections), GPT-2 (mlp.c_fc / mlp.c_proj Conv1D) and BART/Marian-style (fc1 / fc2)."""
    found = []
    for name, m in module.named_modules():
        inter: Any = getattr(m, "intermediate", None)
        out: Any = getattr(m, "output", None)
        if hasattr(inter, "dense") and hasattr(out, "dense") and dense_float_weight(inter.dense):
            found.append(FFN(name, m, [inter.dense], out.dense))
        elif all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")):
            found.append(FFN(name, m, [m.gate_proj, m.up_proj], m.down_proj))
        elif hasattr(m, "c_fc") and hasattr(m, "c_proj"):
            found.append(FFN(name, m, [m.c_fc], m.c_proj))
        elif hasattr(m, "fc1") and hasattr(m, "fc2") and is_linear_like(m.fc1) and is_linear_like(m.fc2):
            found.append(FFN(name, m, [m.fc1], m.fc2))
    return [f for f in found if all(dense_float_weight(x) for x in (*f.up, f.down))]


def neuron_scores(ffn: FFN) -> Any:
    """L2 norm of each neuron's weights: its rows in the up projections and its column in the down one."""
    import torch

    with torch.no_grad():
        sq = torch.zeros(ffn.size, dtype=torch.float64)
        for layer in ffn.up:
            w = layer.weight.detach().double()
            sq += (w.T if is_conv1d(layer) else w).pow(2).sum(1).cpu()
        w = ffn.down.weight.detach().double()
        sq += (w if is_conv1d(ffn.down) else w.T).pow(2).sum(1).cpu()
    return sq.sqrt()


def shrink_ffn(ffn: FFN, keep: Sequence[int]) -> None:
    for layer in ffn.up:
        keep_outputs(layer, keep)
    keep_inputs(ffn.down, keep)
    if isinstance(getattr(ffn.owner, "intermediate_size", None), int):
        ffn.owner.intermediate_size = len(keep)  # LlamaMLP keeps it (informational in transformers 5)


def rounded_size(raw: float, size: int, round_to: int) -> int:
    """`raw` neurons rounded to a multiple of `round_to`, at least one multiple, at most `size`."""
    if size <= round_to:
        return max(1, min(size, round(raw)))
    kept = max(round_to, round(raw / round_to) * round_to)
    return min(kept, size)
