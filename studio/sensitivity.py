"""Per-layer quantization sensitivity, and the mixed-precision choice built on it.

For a quantization scheme, every quantizable layer is measured twice (as AIMET's quant analyzer does
per layer):
- "one": only this layer quantized, everything else float. `fidelity_loss` is what this layer alone
  costs; the ranking by it shows where a scheme hurts.
- "all-but-one": every layer quantized except this one. `recovered` is the fidelity won back by keeping
  it float, exactly the step a mixed-precision choice takes (layers interact, so the two rankings can
  differ; the choice uses this one).

Fidelity is measured the way variants are judged: against the original's outputs on the same batches,
as 1 - the family's divergence, which for encoders is the mean cosine of pooled embeddings (for
classifiers and LMs: 1 - the KL divergence of the output distributions).

Schemes, each with the block whose exclusion list takes the layer names it reports:
- `onnx-int8`: ONNX Runtime dynamic INT8 (`onnx.quantize_dynamic`, `exclude_nodes`) of the graph; a torch
  model is first exported and fused (`export.onnx` + `onnx.optimize`), as the usual recipe does. Layers are
  graph nodes (fused Attention, MatMul, the embedding node).
- `torch-int8`: `quantize.dynamic_int8` (`exclude`): Linear layers and embedding tables.
- `int4`: `quantize.weight_only` with 4 bits (`exclude`): Linear layers.

The torch schemes swap one layer at a time in a private copy of the module (each quantized layer is built
once); the ONNX scheme quantizes the graph once per measurement with ONNX Runtime's own tool, so what is
measured is what the block produces.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from studio.checkpoints.base import LoadedModel
from studio.checkpoints.stage import stage_of
from studio.errors import BadInput

SCHEMES = {
    "onnx-int8": "ONNX Runtime dynamic INT8 of the fused graph (onnx.quantize_dynamic)",
    "torch-int8": "PyTorch dynamic INT8 of Linear layers and embedding tables (quantize.dynamic_int8)",
    "int4": "4-bit group-wise weight-only quantization of Linear layers (quantize.weight_only)",
}
MODES = ("one", "all-but-one", "both")
SCHEME_BLOCK = {
    "onnx-int8": ("onnx.quantize_dynamic", "exclude_nodes"),
    "torch-int8": ("quantize.dynamic_int8", "exclude"),
    "int4": ("quantize.weight_only", "exclude"),
}
# Ops whose constant weight onnx.quantize_dynamic turns into integers (input index of that weight).
ONNX_WEIGHT_INPUT = {"MatMul": 1, "Attention": 1, "EmbedLayerNormalization": 2, "Gather": 0, "Conv": 1}

Progress = Callable[[float, str], None]


def _no_progress(_fraction: float, _message: str = "") -> None:
    return None


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Layer:
    """One quantizable unit: `name` is what the scheme's block takes in its exclusion list."""

    name: str
    module: str  # the torch module it comes from ("" when the graph does not say)
    kind: str  # linear, embedding, attention (fused), ...
    parameters: int


@dataclass
class LayerSensitivity:
    layer: str
    module: str
    kind: str
    parameters: int
    fidelity_alone: float | None = None  # only this layer quantized
    fidelity_without: float | None = None  # every layer but this one quantized
    fidelity_loss: float | None = None  # fidelity of the float model - fidelity_alone
    recovered: float | None = None  # fidelity_without - fidelity with every layer quantized


@dataclass
class SensitivityReport:
    model: str
    family: str
    scheme: str
    mode: str
    objective: str
    examples: int
    sequence_length: int
    fidelity_all: float  # every layer quantized
    fidelity_none: float  # nothing quantized (the float model against the reference; 1 for the original)
    layers: list[LayerSensitivity]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def ranked(self) -> list[LayerSensitivity]:
        """Most sensitive first: by the loss of quantizing the layer alone, else by what keeping it float
        recovers."""

        def key(r: LayerSensitivity) -> tuple[float, float]:
            loss = r.fidelity_loss if r.fidelity_loss is not None else float("-inf")
            rec = r.recovered if r.recovered is not None else float("-inf")
            return (loss, rec) if self.mode != "all-but-one" else (rec, loss)

        return sorted(self.layers, key=key, reverse=True)

    def exclusion_block(self) -> tuple[str, str]:
        """(technique id, parameter) that takes these layer names as an exclusion list."""
        return SCHEME_BLOCK[self.scheme]

    def to_dict(self) -> dict[str, Any]:
        block, param = self.exclusion_block()
        return {
            "model": self.model,
            "family": self.family,
            "scheme": self.scheme,
            "scheme_title": SCHEMES[self.scheme],
            "mode": self.mode,
            "objective": self.objective,
            "examples": self.examples,
            "sequence_length": self.sequence_length,
            "fidelity_all": self.fidelity_all,
            "fidelity_none": self.fidelity_none,
            "seconds": round(self.seconds, 2),
            "settings": self.settings,
            "exclusion_parameter": {"technique": block, "param": param},
            "layers": [asdict(r) for r in self.ranked()],
        }


@dataclass
class MixedPrecisionChoice:
    """Layers kept float so that the quantized model reaches a fidelity target."""

    target: float
    excluded: list[str]
    fidelity: float  # with those layers float, everything else quantized
    fidelity_all: float  # everything quantized
    met: bool
    trace: list[tuple[int, float]]  # (layers kept float, fidelity) for each count tried


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


class TorchScheme:
    """Quantize layers of a private copy of a torch module, one swap at a time.

    `scheme` is "torch-int8" (quantize.dynamic_int8's layers) or "weight-only" (quantize.weight_only's,
    with `bits`, `group_size`, `symmetric`); "int4" is weight-only with 4 bits. Layers are chosen as the
    block chooses them (tied weights and `exclude` left out).
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
    ) -> None:
        import torch

        from studio.techniques import quantize as q

        if scheme == "int4":
            scheme, bits = "weight-only", 4
        if scheme not in ("torch-int8", "weight-only"):
            raise BadInput(f"unknown torch scheme '{scheme}'")
        if embeddings is None:
            embeddings = scheme == "torch-int8"
        self.scheme = scheme
        self.per_channel = per_channel
        self.wo = q.WeightOnlyParams.model_validate(
            {"bits": bits, "group_size": group_size, "symmetric": symmetric}
        )
        self.root = copy.deepcopy(module)
        technique = "quantize.dynamic_int8" if scheme == "torch-int8" else "quantize.weight_only"

        def candidate(m: Any) -> bool:
            return q._is_linear(m) or (embeddings and type(m) is torch.nn.Embedding)

        what = "Linear layer or embedding" if embeddings else "Linear layer"
        sel = q._select(self.root, candidate, list(exclude), technique, what)
        self.layers: list[Layer] = []
        self.skipped: list[str] = []
        for name in sel.chosen:
            m = self.root.get_submodule(name)
            if q._is_linear(m):
                width, out_features = q._shape(m)
                params, kind = width * out_features, "linear"
            else:
                width, params, kind = m.embedding_dim, int(m.weight.numel()), "embedding"
            if scheme == "weight-only" and (
                width % self.wo.group_for(width) or (self.wo.bits == 4 and width % 2)
            ):
                self.skipped.append(name)  # the block refuses these: they must be excluded
                continue
            self.layers.append(Layer(name, name, kind, params))
        if not self.layers:
            raise BadInput(f"{technique}: no layer of this model can be quantized by the {scheme} scheme")
        self._float = {layer.name: self.root.get_submodule(layer.name) for layer in self.layers}
        self._quantized: dict[str, Any] = {}

    def _make(self, name: str) -> Any:
        import torch

        from studio.techniques import quantize as q
        from studio.techniques.quantized_layers import (
            DynamicInt8Linear,
            Int8Embedding,
            WeightOnlyEmbedding,
            WeightOnlyLinear,
        )

        if name not in self._quantized:
            old = self._float[name]
            wo = self.wo
            new: Any
            with torch.no_grad():
                if self.scheme == "torch-int8":
                    if q._is_linear(old):
                        new = DynamicInt8Linear.from_float(q._float_weight(old), old.bias, self.per_channel)
                    else:
                        new = Int8Embedding.from_float(old.weight)
                elif q._is_linear(old):
                    width, _ = q._shape(old)
                    new = WeightOnlyLinear.from_float(
                        q._float_weight(old), old.bias, wo.bits, wo.group_for(width), wo.symmetric
                    )
                else:
                    width = old.embedding_dim
                    new = WeightOnlyEmbedding.from_float(
                        old.weight, None, wo.bits, wo.group_for(width), wo.symmetric
                    )
            self._quantized[name] = new
        return self._quantized[name]

    @contextlib.contextmanager
    def quantized(self, names: Collection[str]) -> Iterator[Any]:
        """The module with exactly `names` quantized (put back to float afterwards)."""
        from studio.techniques.quantize import set_submodule

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
        from studio.checkpoints.onnx_file import load_onnx_graph

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
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from studio.techniques.onnx_passes import needs_external_data

        with _quiet_root_logger():
            quantize_dynamic(
                str(self.graph),
                str(out),
                op_types_to_quantize=self.op_types,
                per_channel=self.per_channel,
                reduce_range=self.reduce_range,
                weight_type=QuantType.QInt8 if self.weight_type == "int8" else QuantType.QUInt8,
                nodes_to_quantize=sorted(names),
                use_external_data_format=needs_external_data(self.graph),
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
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


# ------------------------------------------------------------------------------------------------ running


def prepare_graph(
    model: LoadedModel, examples: Sequence[Any], sequence_length: int, workdir: Path, progress: Progress
) -> Path:
    """The graph the usual ONNX recipe quantizes: export.onnx + onnx.optimize (an ONNX model as it is)."""
    if model.format == "onnx":
        return Path(model.path)
    from studio.pipeline import Recipe, execute_steps, plan

    recipe = Recipe.model_validate(
        {
            "model": str(model.source),
            "steps": [{"technique": "export.onnx"}, {"technique": "onnx.optimize"}],
            "evaluate": {"sequence_length": sequence_length},
        }
    )
    planned = plan(recipe, model)

    def sink(event: Any) -> None:
        step = getattr(event, "step", -1)
        fraction = getattr(event, "fraction", None)
        if fraction is not None and step >= 0:
            progress(
                (step + fraction) / 2, f"exporting and fusing the graph ({getattr(event, 'message', '')})"
            )

    state, _ = execute_steps(planned, workdir / "graph", list(examples), sink)
    return Path(state.path)


def make_scheme(
    model: LoadedModel,
    scheme: str,
    *,
    examples: Sequence[Any] = (),
    sequence_length: int = 128,
    workdir: Path,
    module: Any = None,
    graph: Path | None = None,
    per_channel: bool = True,
    group_size: int | None = None,
    exclude: Sequence[str] = (),
    progress: Progress = _no_progress,
) -> TorchScheme | OnnxScheme:
    if scheme not in SCHEMES:
        raise BadInput(f"unknown scheme '{scheme}' (known: {', '.join(SCHEMES)})")
    if scheme == "onnx-int8":
        if graph is None:
            graph = prepare_graph(model, examples, sequence_length, workdir, progress)
        return OnnxScheme(graph, workdir / "trials", per_channel=per_channel, exclude=exclude)
    if module is None:
        if model.format == "onnx":
            raise BadInput(
                f"the {scheme} scheme quantizes a torch model; for an ONNX graph use --scheme onnx-int8",
                path=model.path,
            )
        if model.format in ("torchscript", "exported-program"):
            raise BadInput(
                f"the {scheme} scheme swaps layers of a Python torch module; a {model.format} model has none",
                path=model.path,
            )
        module = model.module
    return TorchScheme(module, scheme, per_channel=per_channel, group_size=group_size, exclude=exclude)


def measure(
    scheme: TorchScheme | OnnxScheme,
    probe: FidelityProbe,
    mode: str = "both",
    progress: Progress = _no_progress,
) -> tuple[float, float, list[LayerSensitivity]]:
    """(fidelity with nothing quantized, with everything quantized, per-layer results)."""
    if mode not in MODES:
        raise BadInput(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    names = [layer.name for layer in scheme.layers]
    runs = 2 + len(names) * (2 if mode == "both" else 1)
    done = 0

    def tick(message: str) -> None:
        nonlocal done
        done += 1
        progress(done / runs, message)

    none = scheme.fidelity([], probe)
    tick("float model")
    full = scheme.fidelity(names, probe)
    tick(f"all {len(names)} layers quantized: {full:.5f}")
    results = []
    for layer in scheme.layers:
        r = LayerSensitivity(layer.name, layer.module, layer.kind, layer.parameters)
        if mode in ("one", "both"):
            r.fidelity_alone = scheme.fidelity([layer.name], probe)
            r.fidelity_loss = none - r.fidelity_alone
            tick(f"{layer.name} alone: {r.fidelity_alone:.5f}")
        if mode in ("all-but-one", "both"):
            r.fidelity_without = scheme.fidelity([n for n in names if n != layer.name], probe)
            r.recovered = r.fidelity_without - full
            tick(f"all but {layer.name}: {r.fidelity_without:.5f}")
        results.append(r)
    return none, full, results


def layer_sensitivity(
    model: LoadedModel,
    scheme: str = "onnx-int8",
    examples: Sequence[Any] | None = None,
    sequence_length: int = 128,
    mode: str = "both",
    progress: Progress | None = None,
    *,
    per_channel: bool = True,
    group_size: int | None = None,
    workdir: Path | None = None,
) -> SensitivityReport:
    """Quantize each layer alone (and all but each layer) under `scheme`; fidelity per layer.

    `examples` default to 32 builtin sentences. `progress(fraction, message)` is called after every
    measurement.
    """
    import tempfile

    from studio.evaluation.data import load_examples

    report = progress or _no_progress
    if mode not in MODES:
        raise BadInput(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    if scheme not in SCHEMES:
        raise BadInput(f"unknown scheme '{scheme}' (known: {', '.join(SCHEMES)})")
    examples = list(examples) if examples is not None else load_examples("builtin:sentences", 32)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="studio-sensitivity-")))
        prep_share = 0.15 if scheme == "onnx-int8" and model.format != "onnx" else 0.02
        report(0.0, "preparing")
        built = make_scheme(
            model,
            scheme,
            examples=examples,
            sequence_length=sequence_length,
            workdir=workdir,
            per_channel=per_channel,
            group_size=group_size,
            progress=lambda f, m: report(f * prep_share, m),
        )
        probe = FidelityProbe(model, examples, sequence_length)
        none, full, layers = measure(
            built, probe, mode, lambda f, m: report(prep_share + f * (1 - prep_share), m)
        )
        built.close()
    settings: dict[str, Any] = {"per_channel": per_channel} if scheme != "int4" else {}
    if scheme == "int4":
        settings = {"bits": 4, "group_size": group_size or _default_group(), "symmetric": True}
    if isinstance(built, TorchScheme) and built.skipped:
        settings["skipped"] = built.skipped
    return SensitivityReport(
        model=str(model.source),
        family=model.family,
        scheme=scheme,
        mode=mode,
        objective=probe.objective,
        examples=probe.examples,
        sequence_length=sequence_length,
        fidelity_all=full,
        fidelity_none=none,
        layers=layers,
        seconds=time.perf_counter() - started,
        settings=settings,
    )


def _default_group() -> int:
    from studio.techniques.quantize import DEFAULT_INT4_GROUP

    return DEFAULT_INT4_GROUP


# ------------------------------------------------------------------------------------------------ mixed precision


def choose_exclusions(
    scheme: TorchScheme | OnnxScheme,
    probe: FidelityProbe,
    target: float,
    progress: Progress = _no_progress,
) -> MixedPrecisionChoice:
    """Layers to keep float so that fidelity reaches `target`, the best value for their size first.

    Every layer is first measured all-but-one (what keeping it float alone wins back); then layers are
    kept float one more at a time, in order of fidelity won back per parameter (a float layer costs size
    and time in proportion to its weights: MiniLM's embedding node wins back a little for 35 MB), until
    the target is met. If even the float model misses the target (an earlier step lost more), that is
    an error the user must resolve.
    """
    names = [layer.name for layer in scheme.layers]
    full = scheme.fidelity(names, probe)
    progress(0.05, f"everything quantized: fidelity {full:.5f}")
    if full >= target:
        return MixedPrecisionChoice(target, [], full, full, True, [(0, full)])
    none = scheme.fidelity([], probe)
    if none < target:
        raise BadInput(
            f"mixed precision: the model before quantization already has fidelity {none:.5f} on the "
            f"calibration examples, below the target {target}; lower the target"
        )
    gains: dict[str, float] = {}
    for i, name in enumerate(names):
        gains[name] = scheme.fidelity([n for n in names if n != name], probe) - full
        progress(0.05 + 0.65 * (i + 1) / len(names), f"all but {name}: +{gains[name]:.5f}")
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
        if fidelity >= target:
            return MixedPrecisionChoice(target, excluded, fidelity, full, True, trace)
    return MixedPrecisionChoice(target, excluded, fidelity, full, fidelity >= target, trace)


def choose_exclusions_from_report(report: SensitivityReport, target: float) -> dict[str, Any]:
    """Layers to keep float for `target`, estimated from a report without running anything more.

    Layers are taken as `choose_exclusions` takes them (fidelity won back per parameter); keeping layers
    float is assumed to add up: the estimate is the all-quantized fidelity plus the
    `recovered` of each kept layer (the loss alone when only "one" was measured). The quantization
    blocks' `mixed_precision` option measures instead of estimating.
    """

    def gain(r: LayerSensitivity) -> float:
        if r.recovered is not None:
            return r.recovered
        return r.fidelity_loss or 0.0

    order = sorted(report.layers, key=lambda r: gain(r) / max(1, r.parameters), reverse=True)
    estimate = report.fidelity_all
    excluded: list[str] = []
    for r in order:
        if estimate >= target:
            break
        if gain(r) <= 0:
            break
        excluded.append(r.layer)
        estimate += gain(r)
    return {
        "target": target,
        "excluded": excluded,
        "estimated_fidelity": estimate,
        "met": estimate >= target,
        "method": "additive estimate from the "
        + ("all-but-one" if report.mode != "one" else "one-layer")
        + " measurements",
    }


def mixed_precision(
    ctx: Any,
    scheme: TorchScheme | OnnxScheme,
    target: float,
    technique: str,
    max_examples: int = 64,
) -> MixedPrecisionChoice:
    """Run `choose_exclusions` inside a pipeline step: calibration examples, the original as reference,
    progress and logs through the step's context."""
    from studio.evaluation.measure import runner_for

    examples = list(ctx.calibration)[:max_examples]
    if not examples:
        raise BadInput(f"{technique}: mixed precision needs calibration examples to measure fidelity on")
    original = ctx.original
    kind = stage_of(original)
    reference = runner_for(kind, original.path if kind == "onnx" else original.module, original)
    probe = FidelityProbe(original, examples, ctx.sequence_length, reference)
    ctx.progress(0.0, "mixed precision: measuring layer sensitivity")
    choice = choose_exclusions(
        scheme, probe, target, lambda f, m: ctx.progress(0.8 * f, f"mixed precision: {m}")
    )
    ctx.log(
        f"{technique}: mixed precision for fidelity >= {target} on {len(examples)} calibration examples: "
        f"everything quantized {choice.fidelity_all:.5f}; kept float ({len(choice.excluded)}): "
        f"{', '.join(choice.excluded) or 'none'} -> {choice.fidelity:.5f}"
    )
    ctx.metric("mixed_precision_fidelity", choice.fidelity, target=target, excluded=len(choice.excluded))
    return choice
