"""export.executorch: the torch model as an ExecuTorch program (`.pte`) for phones and edge boards.

`torch.export` captures the model's graph (the same one-output wrapper export.onnx uses: the last hidden
state of encoders, logits otherwise), XNNPACK takes the operators it has kernels for, and the rest run on
ExecuTorch's portable kernels; which went where is reported, because a fallen-back operator is where an
edge deployment loses its speed. INT8 is PT2E quantization with the XNNPACK quantizer: per-channel
symmetric weights and per-tensor activations whose ranges are observed on calibration batches.

The program has static shapes (mobile runtimes plan their memory ahead): batch and sequence length are
fixed here and recorded in `program.json` beside `model.pte`, which the runner
(studio/evaluation/executorch_runner.py) fits batches to and refuses shapes it cannot serve with.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from studio.errors import BadInput
from studio.evaluation.executorch_runner import PROGRAM_FILE, executorch_availability, require_runtime
from studio.techniques.base import Params, RunContext, StageState, Technique, register

if TYPE_CHECKING:
    from studio.families import Batch

FAIL_FACTOR = 100.0  # float32: a difference this many times the tolerance is a wrong program, not rounding
INT8_MIN_COSINE = 0.9  # int8: below this the log warns that quantization cost much of the function
DELEGATE_CALL = "executorch_call_delegate"
BOOKKEEPING_OPS = ("getitem",)  # tuple indexing of a delegate's outputs: no computation, not reported


class ExportExecuTorchParams(Params):
    quantize: Literal["none", "int8"] = Field(
        "none",
        description="none: float32 program; int8: PT2E quantization with the XNNPACK quantizer "
        "(per-channel symmetric INT8 weights, INT8 activations as `activations` says)",
    )
    activations: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="int8: dynamic: each Linear's input quantized per call from its own range (XNNPACK's "
        "dynamically quantized linear; MiniLM cosine 0.999); static: one range per tensor observed on the "
        "calibration data, which also quantizes convolutions and the ops between (MiniLM cosine ~0.87)",
    )
    batch_size: int = Field(
        1,
        ge=1,
        le=256,
        description="rows per call, fixed in the program (static shapes); larger "
        "batches are run this many rows at a time",
    )
    sequence_length: int | None = Field(
        None,
        ge=2,
        le=8192,
        description="text models: tokens per row, fixed in the program (shorter inputs are padded and "
        "masked, longer ones refused); null: the recipe's evaluate.sequence_length",
    )
    calibration_batches: int = Field(
        16, ge=1, le=1024, description="int8: calibration batches the activation ranges are observed on"
    )
    verify: bool = Field(
        True, description="run the program with ExecuTorch's runtime and compare it with torch"
    )
    atol: float = Field(
        1e-3,
        gt=0,
        description="float32: largest acceptable absolute difference from torch (above: a warning; 100x "
        f"above: the step fails); int8 is judged by cosine (a warning below {INT8_MIN_COSINE})",
    )


@register
class ExportExecuTorch(Technique[ExportExecuTorchParams]):
    id = "export.executorch"
    title = "ExecuTorch program"
    category = "export"
    input_kind = "torch"
    output_kind = "executorch"
    description = (
        "Exports the model with torch.export to an ExecuTorch program (.pte) delegated to XNNPACK, in "
        "float32 or INT8 (PT2E, calibrated), with static batch and sequence length; reports which "
        "operators XNNPACK took and which fell back."
    )
    families = ("feature-extraction", "text-classification", "causal-lm", "image-classification")
    Params = ExportExecuTorchParams

    def availability(self) -> tuple[bool, str | None]:
        return executorch_availability()

    def run(self, state: StageState, params: ExportExecuTorchParams, ctx: RunContext) -> StageState:
        import copy

        import torch

        from studio.families import family_for
        from studio.techniques.onnx.export import (
            export_examples,
            input_names,
            module_dtype,
            primary_wrapper,
        )

        require_runtime()
        module = state.module
        if module is None:
            raise BadInput("export.executorch needs a torch model")
        model = state.model
        family = family_for(model)
        module, carried = float_int8_layers(module)
        if carried and params.quantize != "int8":
            raise BadInput(
                f"export.executorch: the model holds {len(carried)} INT8 layers from an earlier step "
                f"({', '.join(carried[:3])}{', ...' if len(carried) > 3 else ''}), which torch.export cannot "
                "capture; set quantize: int8 (XNNPACK re-quantizes them on their own grid), or drop the "
                "quantization step for a float32 program"
            )
        if carried:
            ctx.log(
                f"{len(carried)} INT8 layers of earlier steps carried over: their dequantized weights go to "
                "the XNNPACK quantizer, whose per-channel absmax scales put them back on their INT8 grid"
            )
        if module_dtype(module) not in (None, "float32"):
            # XNNPACK's float kernels and the INT8 quantizer both start from float32 weights.
            module = copy.deepcopy(module).float()
            ctx.log(f"the model is {module_dtype(state.module)}: exported from a float32 copy")
        seq = params.sequence_length or ctx.sequence_length
        rows = params.batch_size

        ctx.progress(0.05, "preparing inputs")
        examples = export_examples(ctx, max(8, rows))
        example = fixed_batch(family.batch(model, examples[:rows], seq), rows, seq, family.takes_text)
        names = input_names(family, example)
        args = tuple(example.inputs[n] for n in names)
        wrapper = primary_wrapper(module, family, names)

        started = time.perf_counter()
        ctx.progress(0.1, "capturing the graph with torch.export")
        program = capture(wrapper, args)
        if params.quantize == "int8":
            ctx.progress(0.3, "INT8: calibrating activation ranges")
            calibration = [
                tuple(b.inputs[n] for n in names)
                for b in calibration_batches(ctx, model, family, rows, seq, params.calibration_batches)
            ]
            program = quantize_int8(program, args, calibration, dynamic=params.activations == "dynamic")
            ctx.log(
                f"INT8 (XNNPACK quantizer, per-channel weights, {params.activations} activations): "
                f"calibrated on {len(calibration)} batches"
            )
        ctx.progress(0.5, "lowering to XNNPACK")
        buffer, delegation = lower(program)
        out_dir = ctx.step_dir("executorch")
        path = out_dir / "model.pte"
        write_atomically(path, buffer)
        seconds = time.perf_counter() - started
        ctx.metric("export_seconds", seconds)
        ctx.metric("pte_size_bytes", path.stat().st_size)
        report_delegation(delegation, ctx)

        facts = {
            "inputs": [
                {"name": n, "shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch.")}
                for n, a in zip(names, args, strict=True)
            ],
            "batch_size": rows,
            "sequence_length": seq if family.takes_text else None,
            "quantize": params.quantize,
            "activations": params.activations if params.quantize == "int8" else None,
            "carried_int8_layers": carried,
            "family": model.family,
            "pad_token_id": model.tokenizer.pad_token_id if family.takes_text else None,
            "delegation": delegation,
            "executorch_version": _version("executorch"),
        }
        (out_dir / PROGRAM_FILE).write_text(json.dumps(facts, indent=2))
        shape = " x ".join(str(s) for s in args[0].shape)
        ctx.log(
            f"wrote {path.name} ({path.stat().st_size / 1e6:.1f} MB, {params.quantize}, inputs {shape}) "
            f"in {seconds:.1f} s"
        )

        if params.verify:
            ctx.progress(0.85, "verifying with the ExecuTorch runtime")
            with torch.no_grad():
                reference = wrapper(*args).float()
            verify(path, args, reference, params, ctx)
        ctx.progress(1.0, "exported")
        info = dict(state.info)
        info["executorch"] = {"program": str(out_dir / PROGRAM_FILE), "quantize": params.quantize}
        info["torch_transforms"] = [r.get("technique") for r in state.transforms]
        return StageState(kind="executorch", model=model, path=path, info=info)


def float_int8_layers(module: Any) -> tuple[Any, list[str]]:
    """A copy of `module` whose dynamic INT8 Linear layers (quantize.dynamic_int8, quantize.qat) are float
    Linear layers holding their dequantized weights, and those layers' names; `module` itself when it has
    none. FBGEMM's packed weights are opaque to torch.export, while codes x scale are exact floats: the
    XNNPACK quantizer's symmetric per-channel scale (absmax / 127) then gives the same codes again, but for
    rows whose extreme code was -128, which are re-rounded by at most one step in 128.
    """
    import copy

    import torch

    from studio.techniques.layer_swap import set_submodule
    from studio.techniques.quantized_layers import DynamicInt8Linear

    names = [name for name, layer in module.named_modules() if isinstance(layer, DynamicInt8Linear)]
    if not names:
        return module, []
    module = copy.deepcopy(module)
    for name in names:
        layer = module.get_submodule(name)
        codes, scales, bias = layer.unpacked()
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(codes.to(torch.float32) * scales.reshape(-1, 1))
            if bias is not None:
                linear.bias.copy_(bias)
        set_submodule(module, name, linear)
    return module, names


# ------------------------------------------------------------------------------------------- the inputs


def fixed_batch(batch: Batch, rows: int, seq: int, text: bool) -> Batch:
    """The batch at exactly the program's shapes: `rows` rows (repeating the last when short) and, for
    text, `seq` tokens (padded on the right with masked positions, or cut)."""
    import torch

    from studio.families import Batch

    inputs = {}
    for name, tensor in batch.inputs.items():
        t = tensor[:rows]
        if len(t) < rows:
            t = torch.cat([t, t[-1:].expand(rows - len(t), *t.shape[1:])])
        if text and t.dim() == 2:
            t = t[:, :seq]
            if t.shape[1] < seq:
                t = torch.cat([t, torch.zeros(rows, seq - t.shape[1], dtype=t.dtype)], dim=1)
        inputs[name] = t.contiguous()
    return Batch(inputs=inputs, labels=None)


def calibration_batches(
    ctx: RunContext, model: Any, family: Any, rows: int, seq: int, limit: int
) -> list[Batch]:
    from studio.techniques.onnx.export import export_examples

    examples = list(ctx.calibration) or export_examples(ctx, rows * limit)
    if not ctx.calibration:
        ctx.log("no calibration data given: INT8 ranges observed on built-in sentences", level="warning")
    count = max(1, min(limit, len(examples) // rows))
    return [
        fixed_batch(
            family.batch(model, examples[i * rows : (i + 1) * rows], seq), rows, seq, family.takes_text
        )
        for i in range(count)
    ]


# -------------------------------------------------------------------------------------------- the program


def capture(wrapper: Any, args: tuple[Any, ...]) -> Any:
    """torch.export of the wrapper; a graph it cannot capture is a BadInput naming the failing line."""
    import torch

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return torch.export.export(wrapper, args, strict=False)
    except Exception as exc:  # torch.export raises many types (guard errors, Unsupported, UserError)
        raise BadInput(capture_failure(exc)) from exc


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)(?:, code: (.*))?\n(?:\s+(\S.*))?')


def capture_failure(exc: BaseException) -> str:
    """One readable paragraph out of torch.export's error: what failed and the model's line doing it."""
    text = str(exc)
    summary = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    frames = [m for m in _FRAME.finditer(text) if "/torch/" not in m.group(1)]
    where = ""
    if frames:
        f = frames[-1]
        code = (f.group(4) or f.group(5) or "").strip()
        where = f" at {Path(f.group(1)).name}:{f.group(2)} in {f.group(3)}" + (f": `{code}`" if code else "")
    data_dependent = "data-dependent" in text.lower()
    hint = (
        "the model branches on a tensor's value (dynamic control flow), which a static graph cannot hold: "
        "make it branchless (torch.where) or use torch.cond"
        if data_dependent
        else "the model does something torch.export cannot trace"
    )
    return f"torch.export cannot capture the model{where}: {summary[:300]} ({hint})"


def quantize_int8(
    program: Any, args: tuple[Any, ...], calibration: list[tuple[Any, ...]], *, dynamic: bool = False
) -> Any:
    """PT2E: annotate with the XNNPACK quantizer, observe the calibration batches, convert, re-export.
    `dynamic`: activations quantized per call (the observers then only settle the weights' scales)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    quantizer = XNNPACKQuantizer().set_global(config)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(keep_integer_arithmetic(program.module()), quantizer)
        with torch.no_grad():
            for batch in calibration:
                prepared(*batch)
        converted = convert_pt2e(prepared)
        return capture(converted, args)


def keep_integer_arithmetic(graph_module: Any) -> Any:
    """Protect integer index arithmetic from prepare_pt2e, which turns every Python-number operand of
    add/sub/mul into a float tensor constant: transformers' mask code does `arange(n) + 0` and indexes
    with it, and a float index fails ("tensors used as indices must be long"). Identities (x + 0, x * 1)
    are dropped and other integer-tensor-with-number operations use the .Scalar overload, which
    prepare leaves alone."""
    import torch

    aten = torch.ops.aten
    identity = {aten.add.Tensor: 0, aten.sub.Tensor: 0, aten.mul.Tensor: 1}
    scalar = {
        aten.add.Tensor: aten.add.Scalar,
        aten.sub.Tensor: aten.sub.Scalar,
        aten.mul.Tensor: aten.mul.Scalar,
    }
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in identity or len(node.args) != 2:
            continue
        tensor, number = node.args
        val = getattr(tensor, "meta", {}).get("val")
        if not isinstance(number, (int, float)) or val is None or val.dtype.is_floating_point or node.kwargs:
            continue
        if number == identity[node.target]:
            node.replace_all_uses_with(tensor)
            graph.erase_node(node)
        else:
            node.target = scalar[node.target]
    graph.lint()
    graph_module.recompile()
    return graph_module


def lower(program: Any) -> tuple[bytes, dict[str, Any]]:
    """Lower to the edge dialect with the XNNPACK partitioner; the program's bytes and the delegation."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        except Exception as exc:  # exir raises its own types for operators the edge dialect lacks
            raise BadInput(f"ExecuTorch cannot lower the model: {str(exc).splitlines()[0][:300]}") from exc
        delegation = delegation_report(edge.exported_program().graph_module)
        return bytes(edge.to_executorch().buffer), delegation


def delegation_report(graph_module: Any) -> dict[str, Any]:
    """Which operators XNNPACK took (inside delegate calls) and which fell back to the portable kernels,
    counted per operator, with executorch.devtools' breakdown."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    delegated: Counter[str] = Counter()
    fallback: Counter[str] = Counter()
    for op, row in info.delegation_by_operator.items():
        if op in BOOKKEEPING_OPS:
            continue
        if row.delegated:
            delegated[op] += int(row.delegated)
        if row.non_delegated:
            fallback[op] += int(row.non_delegated)
    calls = sum(
        1
        for node in graph_module.graph.nodes
        if node.op == "call_function" and DELEGATE_CALL in str(node.target)
    )
    return {
        "delegate_calls": calls,
        "delegated": dict(delegated.most_common()),
        "fallback": dict(fallback.most_common()),
        "delegated_ops": sum(delegated.values()),
        "fallback_ops": sum(fallback.values()),
    }


def report_delegation(delegation: dict[str, Any], ctx: RunContext) -> None:
    took, fell = delegation["delegated_ops"], delegation["fallback_ops"]
    ctx.metric("delegated_ops", took)
    ctx.metric("fallback_ops", fell)
    ctx.metric("delegated_fraction", took / max(1, took + fell))

    def listed(ops: dict[str, int]) -> str:
        return ", ".join(f"{_short(op)} x{n}" for op, n in ops.items()) or "none"

    ctx.log(
        f"XNNPACK took {took} operators in {delegation['delegate_calls']} delegate calls: "
        f"{listed(delegation['delegated'])}"
    )
    ctx.log(
        f"{fell} operators fell back to ExecuTorch's portable kernels: {listed(delegation['fallback'])}",
        level="warning" if fell else "info",
    )


def _short(op: str) -> str:
    """aten_linear_default -> linear, quantized_decomposed_quantize_per_tensor_default -> quantize_per_tensor"""
    name = op.removeprefix("aten_").removeprefix("quantized_decomposed_").removeprefix("dim_order_ops_")
    return name.removesuffix("_default").strip("_")


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify(
    path: Path, args: tuple[Any, ...], reference: Any, params: ExportExecuTorchParams, ctx: RunContext
) -> None:
    import torch

    runtime = require_runtime()
    method = runtime.get().load_program(str(path)).load_method("forward")
    output = method.execute(list(args))[0].float()
    diff = float((output - reference).abs().max())
    cosine = float(
        torch.nn.functional.cosine_similarity(output.flatten(1), reference.flatten(1), dim=-1).mean()
    )
    ctx.metric("executorch_max_abs_diff", diff)
    ctx.metric("executorch_cosine", cosine)
    ctx.log(f"ExecuTorch vs torch: max |diff| {diff:.2e}, cosine {cosine:.5f}")
    if params.quantize == "int8":
        # Static per-tensor INT8 activations cost transformers real fidelity; the evaluation measures it,
        # so a low cosine is reported here rather than refused.
        if cosine < INT8_MIN_COSINE:
            ctx.log(
                f"the INT8 program's outputs are far from torch's (cosine {cosine:.3f} < {INT8_MIN_COSINE}): "
                "try more calibration_batches, or quantize: none",
                level="warning",
            )
        return
    if diff > FAIL_FACTOR * params.atol:
        raise BadInput(
            f"the ExecuTorch program's outputs differ from torch by {diff:.3g} (atol {params.atol}): "
            "the lowered program is wrong"
        )
    if diff > params.atol:
        ctx.log(f"outputs differ from torch by {diff:.3g}, above atol {params.atol}", level="warning")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
