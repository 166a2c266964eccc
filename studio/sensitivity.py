"""Per-layer quantization sensitivity: the `sensitivity` verb's measurements and report.

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
- `int4`: `quantize.weight_only` with 4 bits (`exclude`): Linear layers (round to nearest).
- `int4-gptq`, `int4-awq`: `quantize.gptq` / `quantize.awq` with 4 bits (`exclude`): the Linear layers of
  the decoder blocks, each quantized alone by that method on calibration windows cut from the examples
  (the same text the fidelity is measured on; studio/techniques/calibrated_layers.py). AWQ needs
  Llama-style blocks.
- `kv-bits`: `kv_cache.quantize` at `bits` (`float_layers`): one decoder layer's KV cache at a time
  quantized, fidelity measured through the cache (studio/techniques/kv_sensitivity.py).

With a budget (`budget_bits`), the report also says which layers to keep float so that the average bits
per weight over the scheme's layers (scales counted) stays within it while the fidelity the measurements
estimate is highest (`choose_within_budget_from_report`).

The schemes and the fidelity probe are the ones the blocks' `mixed_precision` option measures with
(studio/techniques/mixed_precision.py): the torch schemes swap one layer at a time in a private copy of
the module (each quantized layer is built once); the ONNX scheme quantizes the graph once per measurement
with ONNX Runtime's own tool, so what is measured is what the block produces.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from studio.checkpoints.base import LoadedModel
from studio.errors import BadInput
from studio.evaluation.kv_quant import KVCacheSpec
from studio.techniques.kv_sensitivity import KVProbe, KVScheme
from studio.techniques.layer_swap import DEFAULT_INT4_GROUP
from studio.techniques.mixed_precision import (
    FidelityProbe,
    Layer,
    OnnxScheme,
    Progress,
    TorchScheme,
    bits_per_weight,
    no_progress,
    refuse_budget,
    within_budget,
)

SCHEMES = {
    "onnx-int8": "ONNX Runtime dynamic INT8 of the fused graph (onnx.quantize_dynamic)",
    "torch-int8": "PyTorch dynamic INT8 of Linear layers and embedding tables (quantize.dynamic_int8)",
    "int4": "4-bit group-wise weight-only quantization of Linear layers (quantize.weight_only)",
    "int4-gptq": "4-bit GPTQ of the decoder blocks' Linear layers, each layer alone (quantize.gptq)",
    "int4-awq": "4-bit AWQ of the decoder blocks' Linear layers, each layer alone (quantize.awq)",
    "kv-bits": "the KV cache of one decoder layer at a time quantized (kv_cache.quantize)",
}
WEIGHT_SCHEMES = ("torch-int8", "int4", "int4-gptq", "int4-awq")  # the ones a bits budget applies to
SCHEME_BITS = {"onnx-int8": 8, "torch-int8": 8, "int4": 4, "int4-gptq": 4, "int4-awq": 4}
MODES = ("one", "all-but-one", "both")
SCHEME_BLOCK = {
    "onnx-int8": ("onnx.quantize_dynamic", "exclude_nodes"),
    "torch-int8": ("quantize.dynamic_int8", "exclude"),
    "int4": ("quantize.weight_only", "exclude"),
    "int4-gptq": ("quantize.gptq", "exclude"),
    "int4-awq": ("quantize.awq", "exclude"),
    "kv-bits": ("kv_cache.quantize", "float_layers"),
}


# ------------------------------------------------------------------------------------------------ results


@dataclass
class LayerSensitivity:
    layer: str
    module: str
    kind: str
    parameters: int
    bits_per_weight: float | None = None  # this layer's weights quantized, scales counted (weight schemes)
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
    bits_per_weight: float | None = None  # every layer quantized, over the scheme's layers (weight schemes)
    float_bits: dict[str, int] = field(default_factory=dict)  # each layer's weight bits kept float
    quantized_bits: dict[str, int] = field(default_factory=dict)  # ... and quantized

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
            "bits_per_weight": self.bits_per_weight,
            "layers": [asdict(r) for r in self.ranked()],
        }


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
    progress: Progress = no_progress,
    kv: KVCacheSpec | None = None,
) -> TorchScheme | OnnxScheme | KVScheme:
    if scheme not in SCHEMES:
        raise BadInput(f"unknown scheme '{scheme}' (known: {', '.join(SCHEMES)})")
    if scheme == "kv-bits":
        if model.family != "causal-lm" or model.module is None:
            raise BadInput(
                "the kv-bits scheme quantizes a causal LM's KV cache; this model is not a torch causal LM"
            )
        return KVScheme(model.module, kv or KVCacheSpec("turboquant", 4.0, 4.0))
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
    windows: list[Any] = []
    if scheme in ("int4-gptq", "int4-awq"):
        from studio.techniques.layerwise import calibration_windows

        windows = calibration_windows(model, examples, sequence_length, 1, f"the {scheme} scheme")
        progress(0.0, f"calibrating {scheme} on {sum(int(w.shape[1]) for w in windows)} tokens")
    return TorchScheme(
        module, scheme, per_channel=per_channel, group_size=group_size, exclude=exclude, windows=windows
    )


def measure(
    scheme: TorchScheme | OnnxScheme | KVScheme,
    probe: Any,
    mode: str = "both",
    progress: Progress = no_progress,
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
        if layer.quantized_bits > 0:
            r.bits_per_weight = layer.quantized_bits / max(1, layer.parameters)
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
    kv: KVCacheSpec | None = None,
    budget_bits: float | None = None,
) -> SensitivityReport:
    """Quantize each layer alone (and all but each layer) under `scheme`; fidelity per layer.

    `examples` default to 32 builtin sentences. `progress(fraction, message)` is called after every
    measurement. `kv` is the kv-bits scheme's cache (default TurboQuant at 4 bits); `budget_bits` is only
    checked here (before anything is measured), the choice within it is `choose_within_budget_from_report`.
    """
    import tempfile

    from studio.evaluation.data import load_examples

    report = progress or no_progress
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
            kv=kv,
        )
        if budget_bits is not None:
            check_budget(scheme, budget_bits)
            refuse_budget(built.layers, budget_bits, f"--budget-bits with the {scheme} scheme")
        probe: Any
        if isinstance(built, KVScheme):
            probe = KVProbe(model, examples, sequence_length)
        else:
            probe = FidelityProbe(model, examples, sequence_length)
        none, full, layers = measure(
            built, probe, mode, lambda f, m: report(prep_share + f * (1 - prep_share), m)
        )
        built.close()
    settings: dict[str, Any] = {"per_channel": per_channel}
    if scheme in ("int4", "int4-gptq", "int4-awq"):
        settings = {"bits": 4, "group_size": group_size or DEFAULT_INT4_GROUP, "symmetric": True}
    if scheme in ("int4-gptq", "int4-awq"):
        settings["calibration_tokens"] = built.calibration_tokens if isinstance(built, TorchScheme) else 0
    if isinstance(built, KVScheme):
        settings = built.spec.record()
    if isinstance(built, TorchScheme) and built.skipped:
        settings["skipped"] = built.skipped
    if isinstance(built, TorchScheme) and built.outside:
        settings["kept_float_outside_blocks"] = built.outside
    weighed = all(layer.quantized_bits > 0 for layer in built.layers)
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
        bits_per_weight=bits_per_weight(built.layers) if weighed else None,
        float_bits={layer.name: layer.float_bits for layer in built.layers} if weighed else {},
        quantized_bits={layer.name: layer.quantized_bits for layer in built.layers} if weighed else {},
    )


def check_budget(scheme: str, budget: float) -> None:
    """A bits-per-weight budget that no layer choice can meet or that asks for nothing is refused before
    anything is loaded: above 16 bits every layer can stay in half precision, and no scheme stores fewer
    bits than its own codes."""
    if scheme not in WEIGHT_SCHEMES:
        raise BadInput(
            f"--budget-bits applies to the weight schemes ({', '.join(WEIGHT_SCHEMES)}), not {scheme}"
        )
    if not 0 < budget <= 16:
        raise BadInput(
            f"--budget-bits must be at most 16 bits per weight (half precision keeps every layer float), got "
            f"{budget:g}"
        )
    if budget < SCHEME_BITS[scheme]:
        raise BadInput(
            f"--budget-bits {budget:g} is below the {SCHEME_BITS[scheme]} bits per weight the {scheme} "
            "scheme stores for every layer it quantizes"
        )


# ------------------------------------------------------------------------------------------------ estimate


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


def choose_within_budget_from_report(report: SensitivityReport, budget: float) -> dict[str, Any]:
    """Layers to keep float within `budget` bits per weight, estimated from a report without running
    anything more: greedy by fidelity won back per extra bit (`within_budget`), with keeping layers float
    assumed to add up as in `choose_exclusions_from_report`. The blocks' `max_bits_per_weight` measures
    instead of estimating."""
    if not report.quantized_bits:
        raise BadInput(f"the {report.scheme} scheme has no weight storage a bits budget could count")
    layers = [
        Layer(
            r.layer,
            r.module,
            r.kind,
            r.parameters,
            report.quantized_bits[r.layer],
            report.float_bits[r.layer],
        )
        for r in report.layers
    ]
    refuse_budget(layers, budget, "--budget-bits")

    def gain(r: LayerSensitivity) -> float:
        if r.recovered is not None:
            return r.recovered
        return r.fidelity_loss or 0.0

    gains = {r.layer: gain(r) for r in report.layers}
    kept = within_budget(layers, gains, budget)
    return {
        "budget": budget,
        "excluded": kept,
        "bits_per_weight": bits_per_weight(layers, kept),
        "bits_per_weight_all_quantized": bits_per_weight(layers),
        "estimated_fidelity": report.fidelity_all + sum(gains[n] for n in kept),
        "method": "greedy by fidelity won back per extra bit, additive estimate from the "
        + ("all-but-one" if report.mode != "one" else "one-layer")
        + " measurements",
    }
