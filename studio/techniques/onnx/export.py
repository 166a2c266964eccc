"""export.onnx: the torch model as an ONNX graph, verified against torch on real inputs.

The graph has one output, the tensor the family compares through `from_primary` (the last hidden state
of encoders, logits otherwise), so every later stage (ONNX passes, TensorRT, evaluation) is fed and judged
like the torch model. The graph's studio metadata (family, pooling, config, the torch name of each weight)
lets a reopened graph be fed and compared like its original.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from studio.checkpoints.onnx_graph import (
    TWO_GB,
    content_digest,
    graph_opset,
    initializer_array,
    load_onnx_graph,
    onnx_size,
    save_onnx,
    set_metadata,
)
from studio.errors import BadInput
from studio.evaluation.onnx_cache import LAYOUT_KEY, SEQ2SEQ_LAYOUT_KEY
from studio.techniques.base import Params, RunContext, StageState, Technique, register

if TYPE_CHECKING:
    from studio.checkpoints.base import LoadedModel
    from studio.families import Batch, Family

TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx's TorchScript exporter stops at opset 20
FAIL_FACTOR = 100.0  # a difference this many times the tolerance is a wrong graph, not rounding
HALF_RTOL = 1e-2  # half graphs: about 3 significant digits survive a deep network
SEQ2SEQ_INPUT = "decoder_input_ids"


class ExportOnnxParams(Params):
    opset: int = Field(
        17,
        ge=14,
        le=23,
        description="ONNX opset version (14-20 with the TorchScript exporter, 18-23 advised with dynamo)",
    )
    exporter: Literal["torchscript", "dynamo"] = Field(
        "torchscript",
        description="torchscript: torch.onnx.export(dynamo=False), the graphs ONNX Runtime's fusions know "
        "best; dynamo: the torch.export-based exporter (onnxscript)",
    )
    dynamic_axes: bool = Field(
        True, description="dynamic batch and sequence axes (off: the graph only takes the traced shapes)"
    )
    with_cache: bool = Field(
        False,
        description="causal LMs: also take past_key_values.{i}.key/value inputs and return present.{i}.key/"
        "value outputs; seq2seq models: also write decoder_with_past.onnx beside model.onnx; so ONNX Runtime "
        "generates with a KV cache (needed for generation metrics)",
    )
    verify: bool = Field(
        True, description="run torch and ONNX Runtime on calibration examples and compare the outputs"
    )
    atol: float = Field(
        1e-3,
        gt=0,
        description="largest acceptable absolute difference of the compared outputs (half graphs: at "
        "least 1% of the output's magnitude); above it a warning, far above it (100x, or >10% of the "
        "magnitude) the step fails",
    )

    @model_validator(mode="after")
    def _opset_fits_exporter(self) -> ExportOnnxParams:
        if self.exporter == "torchscript" and self.opset > TORCHSCRIPT_MAX_OPSET:
            raise ValueError(
                f"the TorchScript exporter supports opset {TORCHSCRIPT_MAX_OPSET} at most "
                f"(got {self.opset}); use exporter 'dynamo' for newer opsets"
            )
        return self


@register
class ExportOnnx(Technique[ExportOnnxParams]):
    id = "export.onnx"
    title = "Export to ONNX"
    category = "export"
    input_kind = "torch"
    output_kind = "onnx"
    description = (
        "Exports the model to an ONNX graph whose output is what the studio compares (last hidden state "
        "or logits; with_cache adds a causal LM's or seq2seq model's KV cache), with dynamic batch and sequence axes, and "
        "checks it against torch."
    )
    Params = ExportOnnxParams

    def check(self, params: ExportOnnxParams, model: LoadedModel) -> None:
        from studio.techniques.onnx.export_cache import CACHE_FAMILIES

        if params.with_cache and model.family not in CACHE_FAMILIES:
            raise BadInput(
                f"field 'with_cache': a KV-cache export is written for causal-lm models, not {model.family}"
            )

    def run(self, state: StageState, params: ExportOnnxParams, ctx: RunContext) -> StageState:
        import torch

        from studio.families import family_for

        model = state.model
        family = family_for(model)
        module = state.module
        if module is None:
            raise BadInput("export.onnx needs a torch model")
        out_dir = ctx.step_dir("export")
        path = out_dir / "model.onnx"

        dtype = module_dtype(module) or state.info.get("dtype", "float32")
        info = dict(state.info)
        if dtype == "bfloat16":
            # ONNX Runtime's CPU provider has almost no bfloat16 kernels; float16 runs everywhere.
            import copy

            module = copy.deepcopy(module).to(torch.float16)
            dtype = "float16"
            ctx.log("the model is bfloat16: exported as float16, which ONNX Runtime can run on CPU")
        if dtype in ("float16", "bfloat16", "float32"):
            info["dtype"] = dtype

        ctx.progress(0.05, "preparing inputs")
        # One batch serves tracing and verification (seq2seq models generate their targets: once is enough).
        batch = family.batch(model, export_examples(ctx), ctx.sequence_length)
        trace_batch = sub_batch(batch, [0, 1])
        names = input_names(family, trace_batch)
        trace_args = tuple(example_feeds(trace_batch, names, model))
        layout = seq2seq_layout = None
        if params.with_cache and family.name == "seq2seq":  # two graphs (export_seq2seq.py)
            from studio.techniques.onnx import export_seq2seq

            seq2seq_layout = export_seq2seq.cache_layout(module)
        elif params.with_cache:
            from studio.techniques.onnx import export_cache

            self.check(params, model)
            layout = export_cache.cache_layout(module)
            names = export_cache.input_names(layout)
            trace_args = export_cache.trace_args(trace_batch, layout, next(module.parameters()).dtype)

        # Eager attention: ONNX Runtime's fusions recognise its pattern (not SDPA's), and the TorchScript
        # exporter's SDPA translation computes half-precision attention in float32, giving an invalid graph.
        optimize_later = "onnx.optimize" in ctx.later_steps
        eager = optimize_later or params.exporter == "torchscript"
        start = time.perf_counter()
        with attention_implementation(module, "eager" if eager else None) as switched:
            if switched:
                ctx.log(
                    "exported with eager attention"
                    + (
                        ", whose pattern the later onnx.optimize step can fuse (SDPA's it cannot)"
                        if optimize_later
                        else " (the TorchScript exporter's SDPA translation breaks half-precision graphs)"
                    )
                )
            ctx.progress(0.15, f"exporting with the {params.exporter} exporter")
            if seq2seq_layout is not None:
                export_seq2seq.export_graphs(
                    module, seq2seq_layout, names, trace_args, trace_batch, family, params, out_dir, path, ctx
                )
            elif layout is None:
                export_graph(
                    primary_wrapper(module, family, names), trace_args, names, family, params, out_dir, path
                )
            else:
                dims = export_cache.dynamic_dims(layout)
                outputs = export_cache.output_names(layout)
                wrapper = export_cache.cache_wrapper(module, layout)
                export_graph(wrapper, trace_args, names, family, params, out_dir, path, outputs, dims)
        seconds = time.perf_counter() - start
        ctx.metric("export_seconds", seconds)
        if params.exporter == "dynamo" and "onnx.optimize" in ctx.later_steps:
            ctx.log(
                "ONNX Runtime's transformer fusions are written for TorchScript-exported graphs: "
                "with the dynamo exporter fewer of them may apply",
                level="warning",
            )

        props = metadata_for(model, info, params.exporter)
        props["studio.weight_names"] = json.dumps(weight_names(module, path), sort_keys=True)
        if layout is not None:
            props[LAYOUT_KEY] = layout.to_metadata()
        if seq2seq_layout is not None:
            props[SEQ2SEQ_LAYOUT_KEY] = seq2seq_layout.to_metadata()
        set_metadata(path, props)
        copy_model_side_files(model, out_dir)
        size = onnx_size(path)
        ctx.metric("onnx_size_bytes", size)
        opset = graph_opset(path)
        ctx.log(f"wrote {path.name} ({size / 1e6:.1f} MB, opset {opset}, {dtype}) in {seconds:.1f} s")
        if opset != params.opset:
            ctx.log(
                f"the {params.exporter} exporter wrote opset {opset} (asked: {params.opset})", level="warning"
            )

        if params.verify:
            ctx.progress(0.7, "verifying against torch")
            diff = verify_export(module, path, model, family, batch, dtype, params.atol, ctx)
            if layout is not None:  # the prefill is checked above (a zero-length past); now one decode step
                tolerance = max(params.atol, diff)
                export_cache.verify_decode_step(
                    module, path, sub_batch(batch, [0, 1]), layout, tolerance, ctx
                )
            if seq2seq_layout is not None:  # teacher forcing is checked above; now greedy through the caches
                export_seq2seq.verify_greedy(module, path, batch, max(params.atol, diff), ctx)
        ctx.progress(1.0, "exported")
        info["onnx_exporter"] = params.exporter
        info["torch_transforms"] = [r.get("technique") for r in state.transforms]
        return StageState(kind="onnx", model=model, path=path, info=info)


# ---------------------------------------------------------------------------------------------- the graph


def module_dtype(module: Any) -> str | None:
    """The dtype of the module's floating-point weights ("float32", "float16", ...), None if it has none."""
    for p in [*module.parameters(), *module.buffers()] if hasattr(module, "parameters") else []:
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return None


def export_examples(ctx: RunContext, n: int = 8) -> list[Any]:
    examples = list(ctx.calibration)[:n]
    if len(examples) < 4:
        from studio.evaluation.data import load_examples

        examples += load_examples("builtin:sentences", n - len(examples))
    return examples


def sub_batch(batch: Batch, rows: Sequence[int]) -> Batch:
    """Some rows of a batch, without the padding columns none of them needs (a smaller batch and a
    shorter sequence: a second shape for the dynamic axes, without tokenizing or generating again).

    Every tensor is made contiguous: a column slice is a strided view, and models flatten their inputs
    with `.view` (Marian's loss does `labels.view(-1)`), which fails on one ("view size is not compatible
    with input tensor's size and stride") whenever references leave padding columns to trim."""
    import torch

    from studio.families import Batch

    index = torch.tensor(list(rows))
    inputs = {k: v[index] for k, v in batch.inputs.items()}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.any():
        used = mask.bool().any(0).nonzero().squeeze(1)  # padding may be on either side
        start, stop = int(used.min()), max(int(used.max()) + 1, int(used.min()) + 2)
        inputs = {k: v[:, start:stop].contiguous() if v.dim() == 2 else v for k, v in inputs.items()}
    labels = None if batch.labels is None else batch.labels[index]
    if labels is not None and labels.dim() == 2:
        used = (labels != -100).any(0).nonzero()
        labels = labels[:, : max(int(used.max()) + 1 if len(used) else 1, 2)].contiguous()
    return Batch(inputs=inputs, labels=labels)


def input_names(family: Family, batch: Batch) -> list[str]:
    names = list(batch.inputs)
    if family.name == "seq2seq":
        names.append(SEQ2SEQ_INPUT)
    return names


def example_feeds(batch: Batch, names: Sequence[str], model: LoadedModel) -> list[Any]:
    from studio.families import Seq2Seq

    return [
        Seq2Seq.decoder_input_ids(batch, model.config) if n == SEQ2SEQ_INPUT else batch.inputs[n]
        for n in names
    ]


@contextlib.contextmanager
def attention_implementation(module: Any, implementation: str | None) -> Any:
    """Switch a transformers model's attention implementation for the export, and back afterwards
    (the pipeline's torch module is left as it was). Yields whether it switched."""
    config = getattr(module, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if (
        implementation is None
        or current in (None, implementation)
        or not hasattr(module, "set_attn_implementation")
    ):
        yield False
        return
    module.set_attn_implementation(implementation)
    try:
        yield True
    finally:
        module.set_attn_implementation(current)


def primary_wrapper(module: Any, family: Family, names: Sequence[str]) -> Any:
    """A module taking the inputs positionally (in `names` order) and returning only the compared
    tensor: the last hidden state for encoders, logits otherwise; no cache, no extra outputs."""
    import inspect

    import torch

    try:
        accepted: set[str] = set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        accepted = set()
    extra: dict[str, Any] = {}
    if "use_cache" in accepted:
        extra["use_cache"] = False
    if "return_dict" in accepted:
        extra["return_dict"] = True
    plain = family.name == "image-classification" and not hasattr(module, "config")
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    encoder = family.name == "feature-extraction"

    class Primary(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            # Float inputs (images) stay float32 in the graph and are cast inside it, as the runner feeds them.
            args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
            if plain:
                out = self.model(*args)
            elif encoder:
                out = self.model(**dict(zip(names, args, strict=True)), output_hidden_states=True, **extra)
                return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]
            else:
                out = self.model(**dict(zip(names, args, strict=True)), **extra)
            if isinstance(out, torch.Tensor):
                return out
            if getattr(out, "logits", None) is not None:
                return out.logits
            if hasattr(out, "last_hidden_state"):
                return out.last_hidden_state
            return out[0]

    return Primary().eval()


def output_name(family: Family) -> str:
    return "last_hidden_state" if family.name == "feature-extraction" else "logits"


def dynamic_dims(family: Family, names: Sequence[str]) -> tuple[dict[str, dict[int, str]], dict[int, str]]:
    """Named dynamic axes of each input and of the output."""
    text = family.takes_text
    inputs = {
        n: (
            {0: "batch", 1: "decoder_sequence" if n == SEQ2SEQ_INPUT else "sequence"}
            if text
            else {0: "batch"}
        )
        for n in names
    }
    if family.name in ("feature-extraction", "causal-lm"):
        output = {0: "batch", 1: "sequence"}
    elif family.name == "seq2seq":
        output = {0: "batch", 1: "decoder_sequence"}
    else:
        output = {0: "batch"}
    return inputs, output


def export_graph(
    wrapper: Any,
    args: tuple[Any, ...],
    names: list[str],
    family: Family,
    params: ExportOnnxParams,
    out_dir: Path,
    path: Path,
    outputs: list[str] | None = None,
    dims: dict[str, dict[int, str]] | None = None,
) -> None:
    """Export into a scratch folder, then keep one `model.onnx` (+ one `model.onnx.data` over 2 GB).

    `outputs` and `dims` (named dynamic axes of every input and output) replace the family's one output
    and its axes: the KV-cache graph has many of each."""
    import torch

    scratch = out_dir / "_export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    target = scratch / "model.onnx"
    if outputs is None or dims is None:
        out = output_name(family)
        in_dims, out_dims = dynamic_dims(family, names)
        outputs, dims = [out], {**in_dims, out: out_dims}
    weight_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    captured = io.StringIO()
    try:
        # The exporters print progress and warn about tracing; the worker's stdout is its event stream.
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), torch.inference_mode(False):
            warnings.simplefilter("ignore")
            if params.exporter == "torchscript":
                torch.onnx.export(
                    wrapper,
                    args,
                    str(target),
                    dynamo=False,
                    input_names=names,
                    output_names=outputs,
                    opset_version=params.opset,
                    dynamic_axes=dims if params.dynamic_axes else None,
                    do_constant_folding=True,
                )
            else:
                shapes = None
                if params.dynamic_axes:
                    from torch.export import Dim

                    # one entry: the wrapper's *args parameter, a tuple of per-input dims
                    shapes = (tuple({i: Dim.DYNAMIC for i in dims[n]} for n in names),)
                program = torch.onnx.export(
                    wrapper,
                    args,
                    None,
                    dynamo=True,
                    input_names=names,
                    output_names=outputs,
                    opset_version=params.opset,
                    dynamic_shapes=shapes,
                    verbose=False,
                )
                if program is None:
                    raise BadInput("the dynamo ONNX exporter returned no program")
                program.save(str(target), external_data=weight_bytes > TWO_GB // 2)
    except BadInput:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"the {params.exporter} ONNX exporter failed: {first}") from exc
    files = [p for p in scratch.iterdir() if p.is_file()]
    if files == [target]:
        target.replace(path)
    else:  # the exporter wrote weights beside the graph: gather them into one data file
        import onnx

        save_onnx(onnx.load(str(target)), path)
    shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- verify


def verify_export(
    module: Any,
    path: Path,
    model: LoadedModel,
    family: Family,
    batch: Batch,
    dtype: str,
    atol: float,
    ctx: RunContext,
) -> float:
    """Compare torch and ONNX Runtime on the batch and on its shorter half (other batch and sequence
    sizes: the dynamic axes); report the largest absolute difference and fail when the graph is wrong."""
    import torch

    from studio.evaluation.runners import OnnxRunner, TorchRunner

    torch_run = TorchRunner(module, model)
    onnx_run = OnnxRunner(path, model, device="cpu")
    n = len(next(iter(batch.inputs.values())))
    mask = batch.inputs.get("attention_mask")
    order = torch.argsort(mask.sum(1)).tolist() if mask is not None and mask.dim() == 2 else list(range(n))
    diff, scale = 0.0, 0.0
    for chunk in (batch, sub_batch(batch, sorted(order[: max(1, n // 2)]))):
        ref, out = torch_run(chunk), onnx_run(chunk)
        if ref.shape != out.shape:
            raise BadInput(f"the ONNX graph returns shape {tuple(out.shape)}, torch {tuple(ref.shape)}")
        if not torch.isfinite(out).all() and torch.isfinite(ref).all():
            raise BadInput("the ONNX graph returns NaN or infinite values where torch does not", path=path)
        diff = max(diff, float((ref - out).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    half = dtype in ("float16", "bfloat16")
    tolerance = max(atol, HALF_RTOL * scale) if half else atol
    ctx.metric("onnx_max_abs_diff", diff)
    summary = f"largest difference to torch {diff:.2e} (outputs up to {scale:.3g}, tolerance {tolerance:.1e})"
    if diff <= tolerance:
        ctx.log(f"verified: {summary}")
    elif diff > FAIL_FACTOR * tolerance or diff > 0.1 * scale:
        raise BadInput(
            f"the exported graph does not reproduce the torch model: {summary}; try the other exporter "
            "or opset, or raise atol if this difference is expected",
            path=path,
        )
    else:
        ctx.log(f"verification: {summary}, above the tolerance", level="warning")
    return diff


# ---------------------------------------------------------------------------------------------- shared


def metadata_for(model: LoadedModel, info: dict[str, Any], exporter: str) -> dict[str, str]:
    """What a reopened graph needs to be fed and judged like the original (read by the ONNX loader)."""
    props = {
        "studio.family": model.family,
        "studio.architecture": model.architecture or "",
        "studio.pooling": model.pooling or "",
        "studio.normalize": "true" if model.normalize else "false",
        "studio.dtype": str(info.get("dtype", "float32")),
        "studio.exporter": exporter,
    }
    if model.config is not None and hasattr(model.config, "to_dict"):
        props["studio.config"] = json.dumps(model.config.to_dict(), default=str, sort_keys=True)
    return props


def weight_names(module: Any, path: Path) -> dict[str, list[Any]]:
    """Which torch weight each initializer of the exported graph holds: {initializer: [torch name, transposed]}.

    The exporter renames weights (a wrapper prefix; `onnx::MatMul_N` for Linear weights it stores transposed),
    so comparing a graph with its torch original by name would match nothing. Matched by content: equal bytes,
    as stored or transposed; where equal tensors have several names, only a name the initializer ends with
    counts. Stored in the graph's metadata, which later ONNX steps carry along."""
    import torch

    by_digest: dict[tuple[str, tuple[int, ...], str], list[tuple[str, bool]]] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if tensor.numel() < 2 or tensor.dtype == torch.bfloat16:
            continue
        array = tensor.detach().cpu().numpy()
        by_digest.setdefault(content_digest(array), []).append((name, False))
        if array.ndim == 2:
            by_digest.setdefault(content_digest(array.T.copy()), []).append((name, True))
    out: dict[str, list[Any]] = {}
    for init in load_onnx_graph(path).graph.initializer:
        candidates = by_digest.get(content_digest(initializer_array(init, path.parent)), [])
        by_suffix = [c for c in candidates if init.name.endswith(c[0])]
        chosen = by_suffix or (candidates if len(candidates) == 1 else [])
        if chosen and (chosen[0][0] != init.name or chosen[0][1]):
            out[init.name] = [chosen[0][0], chosen[0][1]]
    return out


def copy_model_side_files(model: LoadedModel, folder: Path) -> None:
    from studio.techniques.torch_io import copy_side_files

    sources = [model.path if model.path.is_dir() else None, model.tokenizer_dir]
    for source in dict.fromkeys(s for s in sources if s is not None):
        if source != folder:
            copy_side_files(source, folder)
