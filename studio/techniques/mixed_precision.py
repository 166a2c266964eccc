"""Mixed precision: which layers to keep float so that a quantized model stays close to the original.

A scheme quantizes any chosen subset of a model's layers and measures the result's fidelity against the
original on fixed batches: `TorchScheme` swaps layers of a private copy of a torch module (the layers
quantize.dynamic_int8 and quantize.weight_only would build, each built once); `OnnxScheme` runs ONNX
Runtime's quantize_dynamic on the graph with a node list, so what is measured is what
onnx.quantize_dynamic produces. `choose_exclusions` measures each layer all-but-one and keeps layers
float, best fidelity won back per parameter first, until a target is met, or with a bits-per-weight budget
(the stored bits of every layer known from its quantized storage, scales counted) the best fidelity won back
per extra bit within it; `mixed_precision` runs it inside a pipeline step. GPTQ and AWQ schemes build their
layers with studio/techniques/calibrated_layers.py. The `sensitivity` verb (studio/sensitivity.py) reports the same measurements
layer by layer.

Fidelity is measured the way variants are judged: against the original's outputs on the same batches,
as 1 - the family's divergence, which for encoders is the mean cosine of pooled embeddings (for
classifiers and LMs: 1 - the KL divergence of the output distributions).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.checkpoints.base import LoadedModel
from studio.checkpoints.stage import stage_of
from studio.errors import BadInput
from studio.techniques.layer_swap import (
    LayerScheme,
    empty_layer,
    is_linear,
    quantized_layer,
    select,
    set_submodule,
    shape,
    weight_bits,
)

# Ops whose constant weight onnx.quantize_dynamic turns into integers (input index of that weight).
ONNX_WEIGHT_INPUT = {"MatMul": 1, "Attention": 1, "EmbedLayerNormalization": 2, "Gather": 0, "Conv": 1}

Progress = Callable[[float, str], None]


def no_progress(_fraction: float, _message: str = "") -> None:
    return None


@dataclass
class Layer:
    """One quantizable unit: `name` is what the scheme's block takes in its exclusion list."""

    name: str
    module: str  # the torch module it comes from ("" when the graph does not say)
    kind: str  # linear, embedding, attention (fused), ...
    parameters: int
    quantized_bits: int = 0  # bits of its stored weight once quantized, scales counted (0: not known)
    float_bits: int = 0  # bits of its weight kept float


def bits_per_weight(layers: Sequence[Layer], kept_float: Collection[str] = ()) -> float:
    """Average bits per weight over `layers` with `kept_float` float and the rest quantized (scales and zero
    points counted, biases not)."""
    keep = set(kept_float)
    bits = sum(layer.float_bits if layer.name in keep else layer.quantized_bits for layer in layers)
    return bits / max(1, sum(layer.parameters for layer in layers))


def refuse_budget(layers: Sequence[Layer], budget: float, what: str) -> float:
    """The average bits per weight with every layer quantized (the least a budget can ask for); a budget
    below it, or a scheme whose storage is not known, is refused."""
    if any(layer.quantized_bits <= 0 for layer in layers):
        raise BadInput(f"{what}: a bits-per-weight budget needs a torch weight scheme (not an ONNX graph)")
    floor = bits_per_weight(layers)
    if budget < floor - 1e-9:
        raise BadInput(
            f"{what}: a budget of {budget:g} bits per weight is below what the scheme itself stores with every "
            f"layer quantized ({floor:.3f} bits per weight, scales counted); raise the budget, or use a larger "
            "group size"
        )
    return floor


@dataclass
class MixedPrecisionChoice:
    """Layers kept float so that the quantized model reaches a fidelity target, or the most fidelity a
    bits-per-weight budget allows (or the target within the budget)."""

    target: float | None
    excluded: list[str]
    fidelity: float  # with those layers float, everything else quantized
    fidelity_all: float  # everything quantized
    met: bool  # the target reached (True when there is only a budget: it is always respected)
    trace: list[tuple[int, float]]  # (layers kept float, fidelity) for each count tried
    budget: float | None = None  # the most bits per weight allowed
    bits_per_weight: float | None = None  # with `excluded` float (torch schemes; None for ONNX graphs)


# ------------------------------------------------------------------------------------------------ fidelity


class FidelityProbe:
    """Reference outputs computed once; `fidelity(runner)` runs a candidate on the same batches."""

    def __init__(
        self,
        model: LoadedModel,
        examples: Sequence[Any],
        sequence_length: int,
        reference: Callable[[Any], Any] | None = None,
    ) -> None:
        from studio.evaluation.measure import quality_batches
        from studio.families import family_for

        if not examples:
            raise BadInput("sensitivity needs examples to run the model on")
        self.model = model
        self.family = family_for(model)
        self.examples = len(examples)
        self.sequence_length = sequence_length
        self.batches = quality_batches(model, examples, sequence_length)
        if reference is None:
            from studio.evaluation.measure import runner_for

            kind = stage_of(model)
            reference = runner_for(kind, model.path if kind == "onnx" else model.module, model)
        self.reference = [reference(b) for b in self.batches]

    @property
    def objective(self) -> str:
        if self.family.name == "feature-extraction":
            return "mean cosine of pooled embeddings against the original"
        return f"1 - {self.family.name} divergence from the original's outputs"

    def fidelity(self, runner: Callable[[Any], Any]) -> float:
        total = 0.0
        rows = 0
        for batch, ref in zip(self.batches, self.reference, strict=True):
            n = int(ref.shape[0])
            total += (1.0 - self.family.divergence(ref, runner(batch), batch)) * n
            rows += n
        return total / rows


# ------------------------------------------------------------------------------------------------ schemes


# Torch schemes: (the layer quantization, the block whose layers it builds); "int4*" fix the bits at 4.
TORCH_SCHEMES = {
    "torch-int8": ("int8", "quantize.dynamic_int8"),
    "weight-only": ("weight-only", "quantize.weight_only"),
    "gptq": ("weight-only", "quantize.gptq"),
    "awq": ("weight-only", "quantize.awq"),
}
CALIBRATED = ("gptq", "awq")


class TorchScheme:
    """Quantize layers of a private copy of a torch module, one swap at a time.

    `scheme` is "torch-int8" (quantize.dynamic_int8's layers), "weight-only" (quantize.weight_only's,
    with `bits`, `group_size`, `symmetric`), or "gptq" / "awq" (the same storage with the codes those
    blocks choose on calibration `windows`, token-id tensors [1, L]; see calibrated_layers.py); "int4",
    "int4-gptq" and "int4-awq" are those with 4 bits. Layers are chosen as the block chooses them (tied
    weights and `exclude` left out; for GPTQ and AWQ only the layers inside the decoder blocks, which are
    the only ones those blocks quantize: the others are listed in `outside`).
    """

    def __init__(
        self,
        module: Any,
        scheme: str,
        *,
        per_channel: bool = True,
        embeddings: bool | None = None,
        bits: int = 4,
        group_size: int | None = None,
        symmetric: bool = True,
        exclude: Sequence[str] = (),
        windows: Sequence[Any] = (),
        act_order: bool = False,
        damp: float = 0.01,
    ) -> None:
        if scheme in ("int4", "int4-gptq", "int4-awq"):
            scheme, bits = {"int4": "weight-only"}.get(scheme, scheme.removeprefix("int4-")), 4
        if scheme not in TORCH_SCHEMES:
            raise BadInput(f"unknown torch scheme '{scheme}'")
        kind, technique = TORCH_SCHEMES[scheme]
        if embeddings is None:
            embeddings = scheme == "torch-int8"
        if scheme in CALIBRATED:
            embeddings = False
            if not windows:
                raise BadInput(f"{technique}: the {scheme} scheme needs calibration text")
        self.scheme = scheme
        self.calibration_tokens = sum(int(w.shape[-1]) for w in windows)
        self.swap = LayerScheme(
            "int8" if kind == "int8" else "weight-only", per_channel, bits, group_size, symmetric
        )
        self.root = copy.deepcopy(module)
        sel = select(self.root, list(exclude), technique, embeddings=embeddings)
        self.layers: list[Layer] = []
        self.skipped: list[str] = []
        self.outside: list[str] = []
        inside = _inside_blocks(self.root) if scheme in CALIBRATED else None
        for name in sel.chosen:
            m = self.root.get_submodule(name)
            if inside is not None and not any(name.startswith(pre) for pre in inside):
                self.outside.append(name)  # the block keeps these float
                continue
            if self.swap.misfit(m):
                self.skipped.append(name)  # the block refuses these: they must be excluded
                continue
            if is_linear(m):
                width, out_features = shape(m)
                params, kind = width * out_features, "linear"
            else:
                params, kind = int(m.weight.numel()), "embedding"
            quantized = weight_bits(self._storage_of(m))
            self.layers.append(Layer(name, name, kind, params, quantized, weight_bits(m)))
        if not self.layers:
            raise BadInput(f"{technique}: no layer of this model can be quantized by the {scheme} scheme")
        self._float = {layer.name: self.root.get_submodule(layer.name) for layer in self.layers}
        self._quantized: dict[str, Any] = {}
        if scheme in CALIBRATED:  # every layer calibrated now, while the whole copy is float
            from studio.techniques import calibrated_layers

            names = [layer.name for layer in self.layers]
            if scheme == "gptq":
                built = calibrated_layers.gptq_layers(
                    self.root, names, windows, self.swap, act_order=act_order, damp=damp
                )
            else:
                built = calibrated_layers.awq_layers(self.root, names, windows, self.swap)
            self._quantized.update(built)

    def _storage_of(self, module: Any) -> Any:
        """An empty quantized layer of this scheme shaped like `module`: what its storage costs (GPTQ and
        AWQ store the same tensors as round-to-nearest)."""
        return empty_layer(module, self.swap)

    def _make(self, name: str) -> Any:
        """Each layer's quantized version is built once and swapped in and out across measurements."""
        if name not in self._quantized:
            self._quantized[name] = quantized_layer(self._float[name], self.swap)
        return self._quantized[name]

    @contextlib.contextmanager
    def quantized(self, names: Collection[str]) -> Iterator[Any]:
        """The module with exactly `names` quantized (put back to float afterwards)."""
        names = list(names)
        try:
            for name in names:
                set_submodule(self.root, name, self._make(name))
            yield self.root
        finally:
            for name in names:
                set_submodule(self.root, name, self._float[name])

    def fidelity(self, names: Collection[str], probe: FidelityProbe) -> float:
        from studio.evaluation.measure import runner_for

        with self.quantized(names) as module:
            return probe.fidelity(runner_for("torch", module, probe.model))

    def close(self) -> None:
        self._quantized.clear()


def _inside_blocks(root: Any) -> list[str]:
    """Name prefixes ("model.layers.3.") of the model's repeated decoder blocks (none: the whole model)."""
    from studio.techniques import layerwise

    found = layerwise.decoder_blocks(root, is_linear)
    if found is None:
        return [""]
    prefix, blocks = found
    return [f"{prefix}.{i}." for i in range(len(blocks))]


class OnnxScheme:
    """Quantize chosen nodes of an ONNX graph with onnx.quantize_dynamic's own tool, one file per trial."""

    def __init__(
        self,
        graph: Path,
        workdir: Path,
        *,
        per_channel: bool = True,
        reduce_range: bool = False,
        weight_type: str = "int8",
        op_types: Sequence[str] = ("MatMul", "Attention", "EmbedLayerNormalization", "Gather"),
        exclude: Sequence[str] = (),
    ) -> None:
        from studio.checkpoints.onnx_graph import load_onnx_graph

        self.graph = Path(graph)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.weight_type = weight_type
        self.op_types = list(op_types)
        proto = load_onnx_graph(self.graph).graph
        self.layers = onnx_layers(proto, self.op_types, exclude)
        if not self.layers:
            raise BadInput("the graph has no node onnx.quantize_dynamic can quantize", path=self.graph)
        self._trial = 0

    def quantize(self, names: Collection[str], out: Path) -> Path:
        from studio.techniques.onnx.quantization import quantize_dynamic_file

        with _quiet_root_logger():
            quantize_dynamic_file(
                self.graph,
                out,
                op_types=self.op_types,
                per_channel=self.per_channel,
                reduce_range=self.reduce_range,
                weight_type=self.weight_type,
                nodes_to_quantize=sorted(names),
            )
        return out

    def fidelity(self, names: Collection[str], probe: FidelityProbe) -> float:
        import shutil

        from studio.evaluation.runners import OnnxRunner

        if not names:  # nodes_to_quantize=[] would mean "every node" to ONNX Runtime
            return probe.fidelity(OnnxRunner(self.graph, probe.model))
        self._trial += 1
        folder = self.workdir / f"trial{self._trial:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            path = self.quantize(names, folder / "model.onnx")
            return probe.fidelity(OnnxRunner(path, probe.model))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        return None


def onnx_layers(graph: Any, op_types: Sequence[str], exclude: Sequence[str] = ()) -> list[Layer]:
    """The nodes of `op_types` with a constant weight, named as onnx.quantize_dynamic's lists take them."""
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers = []
    for node in graph.node:
        slot = ONNX_WEIGHT_INPUT.get(node.op_type)
        if node.op_type not in op_types or slot is None or len(node.input) <= slot:
            continue
        weight = inits.get(node.input[slot])
        if weight is None or not node.name or node.name in exclude:
            continue
        params = 1
        for d in weight.dims:
            params *= int(d)
        kind = {
            "MatMul": "linear",
            "Attention": "attention",
            "EmbedLayerNormalization": "embedding",
            "Gather": "embedding",
            "Conv": "conv",
        }[node.op_type]
        layers.append(Layer(node.name, _module_of(node, consumers), kind, params))
    return layers


def _path_module(name: str) -> str:
    """'/model/encoder/layer.0/output/dense/MatMul' -> 'encoder.layer.0.output.dense'."""
    if not name.startswith("/"):
        return ""
    parts = name.strip("/").split("/")[:-1]
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts)


def _module_of(node: Any, consumers: dict[str, list[Any]]) -> str:
    own = _path_module(node.name)
    if own:
        return own
    if node.op_type == "EmbedLayerNormalization":
        return "embeddings"
    if node.op_type == "Attention":  # fused: named after the output projection that reads it
        for out in node.output:
            for user in consumers.get(out, []):
                module = _path_module(user.name)
                if module.endswith(".output.dense"):
                    return module.removesuffix(".output.dense") + ".self"
    return ""


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantization tool logs every node at INFO and warns through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ------------------------------------------------------------------------------------------------ mixed precision


def within_budget(layers: Sequence[Layer], gains: dict[str, float], budget: float) -> list[str]:
    """Layers to keep float, within `budget` bits per weight, for the most fidelity won back.

    Greedy by fidelity won back per extra bit (what keeping the layer float adds to the weights' bits): a
    0/1 knapsack, which greedy does not always solve exactly (one large layer taken early can crowd out
    several smaller ones worth more together) but comes close when single layers are small against the
    budget's slack; a layer that no longer fits is passed over for smaller ones after it.
    """
    total = max(1, sum(layer.parameters for layer in layers))
    room = budget * total - sum(layer.quantized_bits for layer in layers)
    extra = {layer.name: max(1, layer.float_bits - layer.quantized_bits) for layer in layers}
    order = sorted((n for n in gains if gains[n] > 0), key=lambda n: gains[n] / extra[n], reverse=True)
    kept: list[str] = []
    for name in order:
        if extra[name] <= room:
            kept.append(name)
            room -= extra[name]
    return kept


def choose_exclusions(
    scheme: Any,
    probe: Any,
    target: float | None,
    progress: Progress = no_progress,
    *,
    budget: float | None = None,
) -> MixedPrecisionChoice:
    """Layers to keep float so that fidelity reaches `target`, the best value for their size first; with a
    `budget` (bits per weight), the best value per extra bit within it: the target if it can be reached
    within the budget, else (or with no target) the most fidelity the budget allows.

    Every layer is first measured all-but-one (what keeping it float alone wins back); then layers are
    kept float one more at a time, in order of fidelity won back per parameter (a float layer costs size
    and time in proportion to its weights: MiniLM's embedding node wins back a little for 35 MB), until
    the target is met. If even the float model misses the target (an earlier step lost more), that is
    an error the user must resolve.
    """
    if target is None and budget is None:
        raise BadInput("mixed precision needs a fidelity target, a bits-per-weight budget, or both")
    if budget is not None:
        refuse_budget(scheme.layers, budget, "mixed precision")
    names = [layer.name for layer in scheme.layers]
    known = all(layer.quantized_bits > 0 for layer in scheme.layers)

    def choice(excluded: list[str], fidelity: float, full: float, trace: list[tuple[int, float]]) -> Any:
        met = target is None or fidelity >= target
        bits = bits_per_weight(scheme.layers, excluded) if known else None
        return MixedPrecisionChoice(target, excluded, fidelity, full, met, trace, budget, bits)

    full = scheme.fidelity(names, probe)
    progress(0.05, f"everything quantized: fidelity {full:.5f}")
    if target is not None and full >= target:
        return choice([], full, full, [(0, full)])
    none = scheme.fidelity([], probe)
    if target is not None and none < target:
        raise BadInput(
            f"mixed precision: the model before quantization already has fidelity {none:.5f} on the "
            f"calibration examples, below the target {target}; lower the target"
        )
    gains: dict[str, float] = {}
    for i, name in enumerate(names):
        gains[name] = scheme.fidelity([n for n in names if n != name], probe) - full
        progress(0.05 + 0.65 * (i + 1) / len(names), f"all but {name}: +{gains[name]:.5f}")
    if budget is not None:
        order = within_budget(scheme.layers, gains, budget)
        if target is None:  # the whole budget's choice, measured once
            fidelity = scheme.fidelity([n for n in names if n not in set(order)], probe) if order else full
            progress(1.0, f"{len(order)} layer(s) float within {budget:g} bits: fidelity {fidelity:.5f}")
            return choice(order, fidelity, full, [(0, full), (len(order), fidelity)])
    else:
        size = {layer.name: max(1, layer.parameters) for layer in scheme.layers}
        helpful = sorted((n for n in names if gains[n] > 0), key=lambda n: gains[n] / size[n], reverse=True)
        order = helpful + sorted((n for n in names if gains[n] <= 0), key=lambda n: gains[n], reverse=True)
    trace = [(0, full)]
    fidelity = full
    excluded: list[str] = []
    for k in range(1, len(order) + 1):
        excluded = order[:k]
        keep = set(excluded)
        fidelity = scheme.fidelity([n for n in names if n not in keep], probe)
        trace.append((k, fidelity))
        progress(0.7 + 0.3 * k / len(order), f"{k} layer(s) float: fidelity {fidelity:.5f}")
        if target is not None and fidelity >= target:
            break
    return choice(excluded, fidelity, full, trace)


def mixed_precision(
    ctx: Any,
    scheme: TorchScheme | OnnxScheme,
    target: float | None,
    technique: str,
    max_examples: int = 64,
    *,
    budget: float | None = None,
) -> MixedPrecisionChoice:
    """Run `choose_exclusions` inside a pipeline step: calibration examples, the original as reference,
    progress and logs through the step's context."""
    examples = list(ctx.calibration)[:max_examples]
    if not examples:
        raise BadInput(f"{technique}: mixed precision needs calibration examples to measure fidelity on")
    probe = FidelityProbe(ctx.original, examples, ctx.sequence_length)  # the original is the reference
    ctx.progress(0.0, "mixed precision: measuring layer sensitivity")
    try:
        choice = choose_exclusions(
            scheme, probe, target, lambda f, m: ctx.progress(0.8 * f, f"mixed precision: {m}"), budget=budget
        )
    except BadInput as exc:
        raise BadInput(f"{technique}: {exc.message}") from exc
    goal = " and ".join(
        ([f"fidelity >= {target}"] if target is not None else [])
        + ([f"at most {budget:g} bits per weight"] if budget is not None else [])
    )
    bits = "" if choice.bits_per_weight is None else f" ({choice.bits_per_weight:.3f} bits per weight)"
    ctx.log(
        f"{technique}: mixed precision for {goal} on {len(examples)} calibration examples: "
        f"everything quantized {choice.fidelity_all:.5f}; kept float ({len(choice.excluded)}): "
        f"{', '.join(choice.excluded) or 'none'} -> {choice.fidelity:.5f}{bits}"
    )
    extra: dict[str, Any] = {"target": target} if target is not None else {}
    if budget is not None:
        extra["budget"] = budget
    ctx.metric("mixed_precision_fidelity", choice.fidelity, excluded=len(choice.excluded), **extra)
    if choice.bits_per_weight is not None:
        ctx.metric("mixed_precision_bits_per_weight", choice.bits_per_weight)
    return choice
