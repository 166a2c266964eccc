"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023): weight-only INT4 / INT8 that chooses the codes of each Linear layer to keep its
*outputs* on calibration text close, not its weights.

For a layer with weight W [out, in] and calibration inputs X [in, tokens], the loss ||WX - QX||^2 has the
Hessian H = 2 X X^T, the same for every output row. The columns are quantized one at a time; the rounding
error of column q is spread over the columns not yet quantized, in proportion to row q of H^-1 (the optimal
brain surgeon update), so later columns absorb what earlier ones lost. The paper's three changes make that
practical and are what this file implements:

- one fixed column order for all rows (natural, or by decreasing diag(H) with act-order, the inputs with
  the most energy first while there is the most room to compensate);
- the rows of H^-1 the updates need are those of its upper Cholesky factor, computed once (numerically
  stable, with `damp` x mean(diag H) added to the diagonal first);
- lazy batch updates: the error of a block of 128 columns is applied to the rest of the matrix in one
  matrix product once the block is done.

Groups and storage: codes and scales go into `WeightOnlyLinear`, the layout `quantize.weight_only` writes
(one scale, and a zero point when asymmetric, per group of `group_size` consecutive input columns), so a
GPTQ variant saves, reopens and is sized exactly like a weight-only one. Without act-order each group's
scale is computed from the error-updated weights when quantization reaches the group, as in the paper.
With act-order the columns of a group are no longer reached together, so every group's scale is computed
from the original weights before the pass ("static groups", as AutoGPTQ does); one scale per output row
(no groups) is always computed up front.

Layer by layer: the calibration text runs up to the first decoder block only; then each block is
quantized on its recorded inputs, group of layers after group of layers (q/k/v together, as they read the
same input; then the attention output; gate/up; down), each group's Hessian measured with the layers
before it already quantized, and the quantized block's outputs feed the next (studio.techniques.layerwise).
Linear layers outside the repeated blocks (an LM head that is not tied, a classifier) stay float, as in the
reference implementations.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Self

from pydantic import Field

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.techniques.base import RunContext, StageState, Technique, register
from studio.techniques.layer_swap import (
    Selection,
    float_weight,
    is_linear,
    select,
    set_submodule,
    weight_bytes,
)
from studio.techniques.quantize import (
    WeightOnly,
    WeightOnlyParams,
    WeightStorageParams,
    refuse_unbuildable,
    report_swap,
)

if TYPE_CHECKING:
    import torch

LAZY_BLOCK = 128  # columns per lazy batch update (the paper's B)


# ---------------------------------------------------------------------------------------------- the algorithm


class Hessian:
    """Accumulates H = 2/n * sum x x^T over calibration batches of a layer's inputs (x: [..., in])."""

    def __init__(self, columns: int) -> None:
        import torch

        self.sum = torch.zeros(columns, columns, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        import torch

        x = x.detach().reshape(-1, self.sum.shape[0]).to(torch.float32)
        self.sum += (x.T @ x).to(torch.float64)  # one window in float32, the running sum in float64
        self.count += x.shape[0]

    def matrix(self) -> torch.Tensor:
        return 2 * self.sum / max(self.count, 1)


@dataclasses.dataclass
class QuantizedWeight:
    """GPTQ's result in WeightOnlyLinear's terms: `codes` [out, in] as stored (symmetric 4-bit with the +8
    offset), `scales` [out, groups] in the weight's dtype, `zeros` [out, groups] uint8 (asymmetric only),
    and `dequantized` [out, in] float32, what the codes stand for."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    dequantized: torch.Tensor


def group_params(
    columns: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scales [out], zeros [out] or None) of one group of weight columns [out, g], by the very rule
    round-to-nearest storage uses (WeightOnlyLinear.from_float), so GPTQ and RTN share one grid."""
    from studio.techniques.quantized_layers import WeightOnlyLinear

    width = columns.shape[1]
    layer = WeightOnlyLinear.from_float(columns.to(dtype), None, bits, width, symmetric)
    return layer.scales[:, 0], None if layer.zeros is None else layer.zeros[:, 0]


def quantize_column(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored codes, dequantized values) of one column [out] on the grid of (scale, zero)."""
    import torch

    s = scale.to(torch.float32)
    if zero is None:
        qmin = -(2 ** (bits - 1))
        c = torch.round(w / s).clamp(qmin, -qmin - 1)
        return (c + 8 if bits == 4 else c), c * s
    z = zero.to(torch.float32)
    c = (torch.round(w / s) + z).clamp(0, 2**bits - 1)
    return c, (c - z) * s


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1: row q of U, divided by U[q, q],
    is row q of the inverse Hessian of the columns not yet quantized when q is reached."""
    import torch

    h = h.clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as exc:
        raise BadInput(
            "GPTQ: the layer's Hessian is not positive definite even after damping; raise `damp` "
            "(e.g. 0.1) or calibrate on more text"
        ) from exc


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool = False,
    damp: float = 0.01,
    block: int = LAZY_BLOCK,
) -> QuantizedWeight:
    """Quantize one weight [out, in] against its input Hessian [in, in] (Algorithm 1 of the paper)."""
    import torch

    dtype = weight.dtype
    w = weight.detach().to(torch.float32).clone()
    rows, cols = w.shape
    groups = cols // group_size
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    static = act_order or groups == 1
    scales = torch.empty(rows, groups, dtype=dtype)
    zeros = None if symmetric else torch.empty(rows, groups, dtype=torch.uint8)
    if static:
        for k in range(groups):
            s, z = group_params(w[:, k * group_size : (k + 1) * group_size], bits, symmetric, dtype)
            scales[:, k] = s
            if zeros is not None and z is not None:
                zeros[:, k] = z
    else:  # a group's columns are quantized together: keep each group inside one lazy block
        block = group_size * max(1, block // group_size)

    w = w[:, perm]
    u = inverse_hessian_factor(h[perm][:, perm], damp).to(torch.float32)
    codes = torch.empty(rows, cols, dtype=torch.float32)
    deq = torch.empty(rows, cols, dtype=torch.float32)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i  # position in quantization order; perm[j] is the input column
            k = int(perm[j]) // group_size
            if not static and j % group_size == 0:
                s, z = group_params(w1[:, i : i + group_size], bits, symmetric, dtype)
                scales[:, k] = s
                if zeros is not None and z is not None:
                    zeros[:, k] = z
            col = w1[:, i]
            c, q = quantize_column(col, scales[:, k], None if zeros is None else zeros[:, k], bits)
            codes[:, j], deq[:, j] = c, q
            err = (col - q) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # the lazy update of everything after the block
    inverse = torch.argsort(perm)
    return QuantizedWeight(codes[:, inverse], scales, zeros, deq[:, inverse])


def weight_only_layer(
    q: QuantizedWeight, bias: torch.Tensor | None, bits: int, group_size: int, symmetric: bool
) -> Any:
    """A WeightOnlyLinear holding these codes (4-bit: column 2j in the low nibble, 2j+1 in the high one)."""
    import torch

    from studio.techniques.quantized_layers import WeightOnlyLinear

    out_features, in_features = q.codes.shape
    layer = WeightOnlyLinear(
        in_features, out_features, bias is not None, bits, group_size, symmetric, q.scales.dtype
    )
    if bits == 4:
        nibbles = q.codes.to(torch.uint8)
        layer.qweight.copy_(nibbles[:, 0::2] | (nibbles[:, 1::2] << 4))
    else:
        layer.qweight.copy_(q.codes.to(layer.qweight.dtype))
    layer.scales.copy_(q.scales)
    if q.zeros is not None and layer.zeros is not None:
        layer.zeros.copy_(q.zeros)
    if bias is not None and layer.bias is not None:
        layer.bias.data.copy_(bias.detach().to(q.scales.dtype))
    return layer


# ---------------------------------------------------------------------------------------------- the block


class CalibratedWeightParams(WeightStorageParams):
    """What the calibrated weight-only quantizers (GPTQ, AWQ) share: the storage and the calibration."""

    calibration_examples: int = Field(
        128,
        ge=1,
        description="how many calibration examples are read; their text is joined and cut into windows of "
        "the recipe's sequence length. At least as many tokens as the widest quantized layer's input width "
        "are needed",
    )

    def storage(self) -> WeightOnlyParams:
        """The weight-only storage the codes use (the same default group sizes)."""
        return WeightOnlyParams(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def with_budget(
        self, state: StageState, ctx: RunContext, technique: str, scheme: str, **options: Any
    ) -> Self:
        """These params with the layers `max_bits_per_weight` keeps float added to `exclude`: each layer
        quantized alone by `scheme` ("gptq", "awq") on the calibration text, its fidelity measured."""
        if self.max_bits_per_weight is None:
            return self
        from studio.techniques import layerwise
        from studio.techniques.quantize import mixed_precision_exclusions

        examples = list(ctx.calibration)[: self.calibration_examples]
        windows = layerwise.calibration_windows(state.model, examples, ctx.sequence_length, 1, technique)
        kept = mixed_precision_exclusions(
            ctx,
            technique,
            state.module,
            self,
            scheme=scheme,
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            windows=windows,
            **options,
        )
        return self.model_copy(update={"exclude": [*self.exclude, *kept]})


def calibration_texts(examples: list[Any], count: int) -> list[Any]:
    """The first `count` calibration examples as texts, both sentences of a pair: the quantizers only need
    the activations text produces, and a sentence-pair set (an encoder's usual calibration data) has about
    twice the tokens that way, enough for a 1536-wide FFN layer's Hessian from 120 short pairs."""
    from studio.evaluation.data import Example

    texts: list[Any] = []
    for example in examples[:count]:
        texts.append(example)
        if getattr(example, "text_pair", None):
            texts.append(Example(text=example.text_pair))
    return texts


def check_widths(root: Any, names: list[str], p: CalibratedWeightParams, technique: str) -> None:
    """Every layer's input width fits the group size (and 4-bit pairs), checked before anything changes."""
    storage = p.storage()
    for name in names:
        in_features = int(float_weight(root.get_submodule(name)).shape[1])
        group = storage.group_for(in_features)
        if in_features % group:
            raise BadInput(
                f"{technique}: group_size {group} does not divide the input width {in_features} of layer "
                f"'{name}'; choose a divisor of {in_features} or exclude the layer"
            )
        if p.bits == 4 and in_features % 2:
            raise BadInput(
                f"{technique}: layer '{name}' has an odd input width ({in_features}); 4-bit codes are "
                "packed in pairs: exclude the layer or use bits 8"
            )


class GPTQParams(CalibratedWeightParams):
    act_order: bool = Field(
        False,
        description="quantize the input columns with the largest activations first (desc_act), while the "
        "most columns are left to absorb their error; group scales are then fixed from the original weights",
    )
    damp: float = Field(
        0.01,
        gt=0.0,
        le=1.0,
        description="added to the Hessian's diagonal, as a fraction of its mean, so that it can be inverted "
        "stably (percdamp); raise it if a layer's Hessian is reported singular",
    )


@register
class GPTQ(Technique[GPTQParams]):
    id = "quantize.gptq"
    title = "GPTQ INT4 / INT8"
    category = "quantization"
    input_kind = "torch"
    output_kind = "torch"
    description = (
        "GPTQ (Frantar et al. 2023): weight-only 4- or 8-bit quantization of the Linear layers inside the "
        "decoder blocks that chooses each layer's codes to keep its outputs on the calibration text close "
        "(column by column, each rounding error compensated by the columns not yet quantized, using the "
        "Hessian of the layer's inputs). Quantizes one block at a time, so only one block's activations are "
        "in memory. Stored like quantize.weight_only (same size, same reload); less quality lost than "
        "round-to-nearest at the same bits and group size. Needs calibration text."
    )
    Params = GPTQParams

    def check(self, params: GPTQParams, model: LoadedModel) -> None:
        super().check(params, model)
        refuse_unbuildable(self.id, model)
        if model.module is not None:
            self._plan(model.module, params)

    def _plan(self, root: Any, p: GPTQParams) -> Selection:
        """The layers to quantize, each width checked against the group size before anything changes."""
        sel = select(root, p.exclude, self.id, embeddings=False)
        check_widths(root, sel.chosen, p, self.id)
        return sel

    def run(self, state: StageState, params: GPTQParams, ctx: RunContext) -> StageState:
        from studio.techniques import layerwise

        p = params.with_budget(state, ctx, self.id, "gptq", act_order=params.act_order, damp=params.damp)
        root = state.module
        sel = self._plan(root, p)
        found = layerwise.decoder_blocks(root, is_linear)
        if found is None:
            blocks = [("", root)]
        else:
            prefix, blocks_list = found
            blocks = [(f"{prefix}.{i}.", b) for i, b in enumerate(blocks_list)]
        inside = [n for n in sel.chosen if any(n.startswith(pre) for pre, _ in blocks)]
        outside = [n for n in sel.chosen if n not in set(inside)]
        if not inside:
            raise BadInput(f"{self.id}: no Linear layer to quantize inside the model's decoder blocks")
        needed = max(int(float_weight(root.get_submodule(n)).shape[1]) for n in inside)
        examples = calibration_texts(list(ctx.calibration), p.calibration_examples)
        windows = layerwise.calibration_windows(state.model, examples, ctx.sequence_length, needed, self.id)
        ctx.log(
            f"{self.id}: calibrating on {sum(int(w.shape[1]) for w in windows)} tokens in {len(windows)} "
            f"windows, {len(blocks)} blocks"
        )
        if found is None:
            calls = layerwise.whole_model_calls(root, windows)
        else:
            calls = layerwise.capture_first_block(root, blocks[0][1], windows)

        quantized: list[str] = []
        unreached: list[str] = []
        before = after = 0
        for b, (pre, block) in enumerate(blocks):
            local = [n[len(pre) :] for n in inside if n.startswith(pre)]
            groups = layerwise.shared_input_groups(block, local, calls[0]) if local else []
            unreached += [pre + n for n in local if not any(n in g for g in groups)]
            for group in groups:
                h = self._hessian(block, group[0], calls)
                for name in group:
                    old = block.get_submodule(name)
                    new = self._quantize(old, h, p)
                    before, after = before + weight_bytes(old), after + weight_bytes(new)
                    set_submodule(block, name, new)
                    quantized.append(pre + name)
                    ctx.progress(len(quantized) / len(inside), f"quantized {pre + name}")
            if b < len(blocks) - 1:
                calls = layerwise.run_block(block, calls)
        kept = outside + unreached
        if outside:
            ctx.log(f"{self.id}: kept float, outside the decoder blocks: {', '.join(outside)}")
        if unreached:
            ctx.log(f"{self.id}: kept float, never called on the calibration text: {', '.join(unreached)}")
        report_swap(ctx, self.id, Selection(quantized, sel.excluded + kept, sel.tied), before, after)
        record = {
            "technique": self.id,
            "bits": p.bits,
            "group_size": p.group_size,
            "symmetric": p.symmetric,
            "act_order": p.act_order,
            "damp": p.damp,
            "modules": quantized,
        }
        return dataclasses.replace(state, module=root, transforms=[*state.transforms, record])

    @staticmethod
    def _hessian(block: Any, name: str, calls: list[Any]) -> Any:
        from studio.techniques import layerwise

        layer = block.get_submodule(name)
        hess = Hessian(int(float_weight(layer).shape[1]))
        layerwise.feed_inputs(block, layer, calls, hess.add)
        return hess.matrix()

    def _quantize(self, old: Any, h: Any, p: GPTQParams) -> Any:
        weight = float_weight(old)
        group = p.storage().group_for(int(weight.shape[1]))
        try:
            q = gptq_quantize(weight, h, p.bits, group, p.symmetric, p.act_order, p.damp)
        except BadInput as exc:
            raise BadInput(f"{self.id}: {exc.message}") from exc
        return weight_only_layer(q, old.bias, p.bits, group, p.symmetric)

    @classmethod
    def restore(cls, module: Any, record: dict[str, Any]) -> Any:
        # The same storage as weight-only: the layers are rebuilt from bits, group size and symmetry alone.
        return WeightOnly.restore(module, record)
