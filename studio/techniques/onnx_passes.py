"""ONNX -> ONNX passes with ONNX Runtime's own tools: graph fusion, dynamic and static INT8, float16.

Every pass reads the previous step's file and writes a new one in its own step folder (the input is never
changed), carries the graph's studio metadata and the tokenizer files along, and returns a new ONNX state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from studio.errors import BadInput, Unavailable
from studio.techniques.base import Params, RunContext, StageState, Technique, register

if TYPE_CHECKING:
    from studio.checkpoints.base import LoadedModel

# ORT's transformer optimizer by Hugging Face model_type (onnxruntime.transformers.optimizer.MODEL_TYPES).
OPTIMIZER_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "distilbert": "bert",
    "electra": "bert",
    "mpnet": "bert",
    "albert": "bert",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    # decoder-only models with RMSNorm: the GPT-2 optimizer fuses their (Skip)SimplifiedLayerNormalization
    "llama": "gpt2",
    "mistral": "gpt2",
    "qwen2": "gpt2",
    "bart": "bart",
    "marian": "bart",
    "mbart": "bart",
    "t5": "t5",
    "mt5": "t5",
    "vit": "vit",
    "swin": "swin",
    "clip": "clip",
}
# Ops quantize_dynamic can make integer (its IntegerOps registry) and Gemm, which it leaves float.
DYNAMIC_OP_TYPES = (
    "MatMul",
    "Gemm",
    "Attention",
    "Conv",
    "EmbedLayerNormalization",
    "Gather",
    "LSTM",
    "Transpose",
)
# Ops quantize_static can surround with QuantizeLinear/DequantizeLinear (its QDQ registry and more).
STATIC_OP_TYPES = (
    "MatMul",
    "Gemm",
    "Conv",
    "ConvTranspose",
    "Attention",
    "Gather",
    "Add",
    "Mul",
    "Relu",
    "Clip",
    "LayerNormalization",
    "Softmax",
    "AveragePool",
    "MaxPool",
    "GlobalAveragePool",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Concat",
    "Split",
    "Slice",
    "Where",
    "Resize",
    "Pad",
)
QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QLinearMatMul",
    "QLinearConv",
    "ConvInteger",
    "QAttention",
}


def _check_op_types(value: list[str], known: Sequence[str]) -> list[str]:
    unknown = [v for v in value if v not in known]
    if unknown:
        raise ValueError(f"unknown op types {unknown}; known: {', '.join(known)}")
    if not value:
        raise ValueError("name at least one op type to quantize")
    return value


# ---------------------------------------------------------------------------------------------- optimize


class OptimizeParams(Params):
    opt_level: Literal[0, 1, 2, 99] = Field(
        1,
        description="ONNX Runtime graph optimization level run with the fusions: 0 fusions only, 1 basic, "
        "2 extended, 99 all (99 ties the file to this machine's execution provider)",
    )
    use_gpu: bool = Field(False, description="optimize for the CUDA execution provider (needs CUDA)")
    only_onnxruntime: bool = Field(
        False, description="only ONNX Runtime's built-in optimizer, without the Python transformer fusions"
    )
    num_heads: int | None = Field(
        None,
        ge=0,
        description="attention heads for the fusions; empty: from the model config, 0: detected from "
        "the graph (used automatically after head pruning)",
    )
    hidden_size: int | None = Field(
        None, ge=0, description="hidden size for the fusions; empty: from the config, 0: detected"
    )
    gelu_approximation: bool = Field(
        False,
        description="compute GELU with its tanh approximation (FastGelu): about 30% faster than the exact "
        "erf form on CPU; MiniLM's embeddings move by less than 1e-4 of cosine",
    )
    skip_layer_norm: Literal["fused", "split"] = Field(
        "fused",
        description="split: write each fused residual add + layer normalization back as Sum + "
        "LayerNormalization. ONNX Runtime 1.31's CPU SkipLayerNormalization kernel is about 5x slower than "
        "its LayerNormalization (246 vs 50 us for 128 x 384 on an AVX-512 EPYC), and a Sum, unlike an Add, "
        "is not fused back when the session starts. Same results; CPU only (ignored with use_gpu)",
    )


@register
class OnnxOptimize(Technique):
    id = "onnx.optimize"
    title = "ONNX Runtime graph fusion"
    category = "graph"
    input_kind = "onnx"
    output_kind = "onnx"
    description = (
        "Fuses attention, layer normalization and GELU subgraphs into ONNX Runtime's fast kernels "
        "(onnxruntime.transformers optimizer); other graphs get ONNX Runtime's generic graph optimizations."
    )
    Params = OptimizeParams

    def run(self, state: StageState, params: OptimizeParams, ctx: RunContext) -> StageState:  # type: ignore[override]
        import onnxruntime as ort

        src = input_path(state)
        out = ctx.step_dir("optimize") / "model.onnx"
        config = model_config(state.model, src)
        model_type = OPTIMIZER_MODEL_TYPES.get(str(getattr(config, "model_type", "")))
        if (
            params.use_gpu
            and params.opt_level > 0
            and "CUDAExecutionProvider" not in ort.get_available_providers()
        ):
            raise Unavailable("use_gpu needs onnxruntime's CUDA execution provider, which this machine lacks")
        start = time.perf_counter()
        ctx.progress(0.1, "optimizing")
        if model_type is None:
            ctx.log(
                f"no transformer fusions for model type '{getattr(config, 'model_type', None) or 'unknown'}': "
                "applying ONNX Runtime's generic graph optimizations instead"
            )
            ort_graph_optimize(src, out, params.opt_level, params.use_gpu)
        else:
            from onnxruntime.transformers.optimizer import optimize_model

            heads, hidden = attention_shape(config, state, params)
            if heads == 0 or hidden == 0:
                ctx.log("attention heads / hidden size are detected from the graph")
            elif pruned_head_counts(state) and params.num_heads is None:
                ctx.log(f"after prune.heads: fusing with {heads} heads per layer, attention width {hidden}")
            from onnxruntime.transformers.fusion_options import FusionOptions

            options = FusionOptions(model_type)
            options.enable_gelu_approximation = params.gelu_approximation
            try:
                optimized = optimize_model(
                    str(src),
                    model_type=model_type,
                    num_heads=heads,
                    hidden_size=hidden,
                    optimization_options=options,
                    opt_level=params.opt_level,
                    use_gpu=params.use_gpu,
                    only_onnxruntime=params.only_onnxruntime,
                )
            except Exception as exc:
                raise BadInput(f"ONNX Runtime's optimizer failed: {exc}", path=src) from exc
            fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
            if params.skip_layer_norm == "split" and not params.use_gpu:
                split, kept = split_skip_layer_norm(optimized.model)
                ctx.metric("skip_layer_norm_split", split)
                ctx.log(
                    f"{split} SkipLayerNormalization node(s) written as Sum + LayerNormalization"
                    + (
                        f" ({kept} kept: their statistics outputs are used or the opset is below 17)"
                        if kept
                        else ""
                    )
                )
            optimized.save_model_to_file(str(out), use_external_data_format=needs_external_data(src))
            for op, count in fused.items():
                ctx.metric(f"fused_{op}", count)
            ctx.log(
                f"ONNX Runtime {model_type} fusions: "
                + (", ".join(f"{op} x{n}" for op, n in fused.items()) or "none applied")
            )
            missing = missing_fusions(model_type, config, state, fused, heads)
            ctx.metric("fusions_missing", len(missing))
            if missing:
                ctx.log(
                    "fusions that did not happen, so the graph keeps its unfused subgraphs and runs slower "
                    "(MiniLM: 285 nodes instead of 46, b1 about 2.4x slower): " + "; ".join(missing),
                    level="warning",
                )
        seconds = time.perf_counter() - start
        finish_pass(src, out, ctx)
        counts = op_counts(out)
        ctx.log(
            f"optimized in {seconds:.1f} s; graph ops: "
            + ", ".join(f"{k} {v}" for k, v in counts.most_common(8))
        )
        ctx.metric("onnx_nodes", sum(counts.values()))
        ctx.progress(1.0, "optimized")
        return StageState(
            kind="onnx", model=state.model, path=out, info=dict(state.info, onnx_optimized=True)
        )


def split_skip_layer_norm(model: Any) -> tuple[int, int]:
    """Replace each SkipLayerNormalization whose statistics outputs are unused by Sum(input, skip[, bias])
    + LayerNormalization (opset 17+), in place; returns (replaced, kept)."""
    from onnx import helper

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    graph = model.graph
    nodes = []
    split = kept = 0
    for node in graph.node:
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        outputs = list(node.output)
        inputs = list(node.input) + [""] * (5 - len(node.input))
        if opset < 17 or any(outputs[1:3]) or not inputs[2]:
            nodes.append(node)
            kept += 1
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        total = outputs[3] if len(outputs) > 3 and outputs[3] else f"{node.name or 'skip_ln'}_sum{split}"
        nodes.append(
            helper.make_node(
                "Sum", [x for x in (inputs[0], inputs[1], inputs[4]) if x], [total], name=f"{node.name}_Sum"
            )
        )
        nodes.append(
            helper.make_node(
                "LayerNormalization",
                [total, inputs[2]] + ([inputs[3]] if inputs[3] else []),
                [outputs[0]],
                name=f"{node.name}_LayerNorm",
                axis=-1,
                epsilon=epsilon,
            )
        )
        split += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return split, kept


def pruned_head_counts(state: StageState) -> list[int] | None:
    """Heads left in each attention layer after prune.heads (recorded by it in the state's info), or None
    when no head was pruned."""
    if "prune.heads" not in (state.info.get("torch_transforms") or []):
        return None
    counts = state.info.get("attention_heads")
    return [int(v) for v in counts.values()] if isinstance(counts, dict) and counts else []


def attention_shape(config: Any, state: StageState, params: OptimizeParams) -> tuple[int, int]:
    """num_heads and hidden_size for the fusions.

    After prune.heads the config's numbers are wrong. When every layer kept the same number of heads, the
    fusions get that number and the attention width it makes (heads x head size): ONNX Runtime then fuses
    as before. Detection from the graph (0) finds nothing in transformers 5's graphs (their reshapes say
    -1 heads), and with uneven counts no single number fits, so uneven layers are left to detection, which
    `missing_fusions` then reports."""
    config_heads = _first_attr(config, "num_attention_heads", "n_head", "encoder_attention_heads")
    config_hidden = _first_attr(config, "hidden_size", "n_embd", "d_model")
    counts = pruned_head_counts(state)
    even = bool(counts) and len(set(counts)) == 1 and config_heads > 0 and config_hidden % config_heads == 0
    heads = params.num_heads
    if heads is None:
        heads = config_heads if counts is None else (counts[0] if even else 0)
    hidden = params.hidden_size
    if hidden is None:
        if counts is None:
            hidden = config_hidden
        else:
            hidden = counts[0] * (config_hidden // config_heads) if even and counts else 0
    return int(heads or 0), int(hidden or 0)


# The fused ops ONNX Runtime's BERT optimizer makes from a CPU encoder graph: one Attention per layer and
# one EmbedLayerNormalization (the embeddings' sum + layer norm, only fused with the attention after it).
def missing_fusions(
    model_type: str, config: Any, state: StageState, fused: dict[str, int], heads: int
) -> list[str]:
    """What the fusions were expected to make and did not, each with the likely reason; [] when all
    happened or no expectation is known for this optimizer."""
    if model_type != "bert":
        return []
    counts = pruned_head_counts(state)
    layers = len(counts) if counts else _first_attr(config, "num_hidden_layers", "n_layer", "encoder_layers")
    if not layers:
        return []
    if counts and len(set(counts)) > 1:
        why = (
            f"prune.heads left uneven head counts across layers ({', '.join(map(str, counts))}) and ONNX "
            "Runtime's attention fusion takes one head count for the whole graph; prune the same number of "
            "heads in every layer (prune.heads balance: layers, the default) to keep the fusion"
        )
    elif heads == 0:
        why = (
            "the number of heads is unknown (num_heads 0: detection from the graph found none); set num_heads"
        )
    else:
        why = (
            "ONNX Runtime did not recognise the attention subgraph (an SDPA or dynamo-exported graph, or "
            "num_heads / hidden_size that do not match the graph)"
        )
    attention = fused.get("Attention", 0) + fused.get("MultiHeadAttention", 0)
    missing = []
    if attention < layers:
        missing.append(f"Attention: {attention} of {layers} attention layers fused")
    if not fused.get("EmbedLayerNormalization"):
        missing.append("EmbedLayerNormalization: not fused")
    return [f"{m} ({why})" for m in missing]


def _first_attr(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 0


def ort_graph_optimize(src: Path, out: Path, opt_level: int, use_gpu: bool) -> None:
    """ONNX Runtime's generic optimizations (constant folding, Conv+BN/activation fusion...), saved."""
    import onnxruntime as ort

    from studio.evaluation.runners import session_options

    levels = {
        0: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        2: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        99: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts = session_options()
    opts.graph_optimization_level = levels[opt_level]
    opts.optimized_model_filepath = str(out)
    if needs_external_data(src):
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", out.name + ".data"
        )
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_gpu else ["CPUExecutionProvider"]
    try:
        ort.InferenceSession(str(src), sess_options=opts, providers=providers)
    except Exception as exc:
        raise BadInput(f"ONNX Runtime cannot optimize the graph: {exc}", path=src) from exc


# ---------------------------------------------------------------------------------------------- quantize


class QuantizeDynamicParams(Params):
    per_channel: bool = Field(
        True,
        description="one scale per output channel instead of per tensor (per tensor: MiniLM cosine 0.964 "
        "instead of 0.993)",
    )
    reduce_range: bool = Field(
        False, description="7-bit weights: avoids overflow in the int8 kernels of CPUs without VNNI"
    )
    op_types: list[str] = Field(
        default=["MatMul", "Attention", "EmbedLayerNormalization", "Gather"],
        description=f"operator types to quantize (of: {', '.join(DYNAMIC_OP_TYPES)}); the default covers "
        "the fused attention and the embedding tables too (MiniLM: 25% of the FP32 size instead of 74%). "
        "ONNX Runtime has no integer Gemm, so Gemm nodes stay float",
    )
    exclude_nodes: list[str] = Field(
        default=[], description="names of graph nodes to keep in float (e.g. the last MatMul)"
    )
    weight_type: Literal["int8", "uint8"] = Field("int8", description="integer type of the weights")
    mixed_precision: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="mixed precision: a fidelity target (mean cosine to the original for encoders, 1 - the "
        "output divergence otherwise) measured on up to 64 calibration examples. Every node's sensitivity is "
        "measured (all but one quantized, with ONNX Runtime's own tool) and nodes stay float, most fidelity "
        "won back per parameter first, until the target is met; see `model-studio sensitivity`. Empty: quantize "
        "every node not excluded",
    )

    @field_validator("op_types")
    @classmethod
    def _known_ops(cls, value: list[str]) -> list[str]:
        return _check_op_types(value, DYNAMIC_OP_TYPES)


@register
class OnnxQuantizeDynamic(Technique):
    id = "onnx.quantize_dynamic"
    title = "ONNX dynamic INT8"
    category = "quantization"
    input_kind = "onnx"
    output_kind = "onnx"
    description = (
        "INT8 weights with activations quantized on the fly (onnxruntime.quantization.quantize_dynamic); "
        "no calibration data needed. Best for transformer MatMuls on CPU."
    )
    Params = QuantizeDynamicParams

    def run(self, state: StageState, params: QuantizeDynamicParams, ctx: RunContext) -> StageState:  # type: ignore[override]
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        src = input_path(state)
        refuse_unless_float32(src, self.id)
        check_nodes(src, params.exclude_nodes)
        exclude = list(params.exclude_nodes)
        if params.mixed_precision is not None:
            exclude += self._mixed_precision(src, params, ctx)
        out = ctx.step_dir("quantize_dynamic") / "model.onnx"
        start = time.perf_counter()
        ctx.progress(0.1 if params.mixed_precision is None else 0.85, "quantizing")
        gemms = op_counts(src).get("Gemm", 0)
        if "Gemm" in params.op_types and gemms:
            ctx.log(f"ONNX Runtime has no dynamic integer Gemm: {gemms} Gemm node(s) stay float")
        with ort_warnings(ctx):
            try:
                quantize_dynamic(
                    str(src),
                    str(out),
                    op_types_to_quantize=list(params.op_types),
                    per_channel=params.per_channel,
                    reduce_range=params.reduce_range,
                    weight_type=QuantType.QInt8 if params.weight_type == "int8" else QuantType.QUInt8,
                    nodes_to_exclude=exclude or None,
                    use_external_data_format=needs_external_data(src),
                    # fused graphs (Attention, SkipLayerNormalization) lack type information for some tensors
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
            except Exception as exc:
                raise BadInput(f"ONNX Runtime's dynamic quantization failed: {exc}", path=src) from exc
        finish_pass(src, out, ctx)
        counts = op_counts(out)
        quantized = sum(
            counts.get(op, 0)
            for op in ("MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger", "QAttention")
        )
        ctx.metric("quantized_nodes", quantized)
        ctx.log(
            f"{quantized} integer node(s) ({params.weight_type} weights, "
            f"{'per channel' if params.per_channel else 'per tensor'}) in {time.perf_counter() - start:.1f} s"
        )
        ctx.progress(1.0, "quantized")
        return StageState(
            kind="onnx", model=state.model, path=out, info=dict(state.info, quantization="dynamic-int8")
        )

    def _mixed_precision(self, src: Path, params: QuantizeDynamicParams, ctx: RunContext) -> list[str]:
        """The nodes mixed precision keeps float (see studio.sensitivity)."""
        from studio.techniques.mixed_precision import OnnxScheme, mixed_precision

        assert params.mixed_precision is not None  # only called when set
        scheme = OnnxScheme(
            src,
            ctx.step_dir("mixed_precision"),
            per_channel=params.per_channel,
            reduce_range=params.reduce_range,
            weight_type=params.weight_type,
            op_types=[op for op in params.op_types if op != "Gemm"],
            exclude=params.exclude_nodes,
        )
        choice = mixed_precision(ctx, scheme, params.mixed_precision, self.id)
        if not choice.met:
            ctx.log(
                f"{self.id}: fidelity {choice.fidelity:.5f} stays below the target {params.mixed_precision} "
                f"even with {len(choice.excluded)} nodes float",
                level="warning",
            )
        return choice.excluded


class QuantizeStaticParams(Params):
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how activation ranges are chosen from the calibration outputs"
    )
    samples: int = Field(
        64, ge=1, le=10000, description="calibration examples (clipped to those available), one at a time"
    )
    per_channel: bool = Field(False, description="one weight scale per output channel")
    activation_type: Literal["int8", "uint8"] = Field(
        "int8", description="integer type of activations (int8: ONNX Runtime's default S8S8 QDQ)"
    )
    weight_type: Literal["int8", "uint8"] = Field("int8", description="integer type of the weights")
    op_types: list[str] = Field(
        default=["MatMul", "Gemm", "Conv"],
        description=f"operator types to quantize (of: {', '.join(STATIC_OP_TYPES)})",
    )
    exclude_nodes: list[str] = Field(default=[], description="names of graph nodes to keep in float")

    @field_validator("op_types")
    @classmethod
    def _known_ops(cls, value: list[str]) -> list[str]:
        return _check_op_types(value, STATIC_OP_TYPES)


@register
class OnnxQuantizeStatic(Technique):
    id = "onnx.quantize_static"
    title = "ONNX static INT8 (QDQ)"
    category = "quantization"
    input_kind = "onnx"
    output_kind = "onnx"
    description = (
        "INT8 weights and activations in QDQ format, activation ranges calibrated on the calibration data "
        "(onnxruntime.quantization.quantize_static)."
    )
    Params = QuantizeStaticParams

    def run(self, state: StageState, params: QuantizeStaticParams, ctx: RunContext) -> StageState:  # type: ignore[override]
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        src = input_path(state)
        refuse_unless_float32(src, self.id)
        check_nodes(src, params.exclude_nodes)
        examples = list(ctx.calibration)
        if not examples:
            raise BadInput("onnx.quantize_static needs calibration data (recipe data.calibration)")
        n = min(params.samples, len(examples))
        if n < params.samples:
            ctx.log(f"calibrating on {n} examples (the calibration data has {len(examples)})")
        out_dir = ctx.step_dir("quantize_static")
        out = out_dir / "model.onnx"
        # Symbolic shape inference types every tensor (fused ops included), else their activations stay float.
        prepared = out_dir / "_prepared.onnx"
        ctx.progress(0.05, "shape inference")
        inference = preprocess(src, prepared)
        if inference != "symbolic":
            ctx.log("symbolic shape inference failed on this graph; ONNX shape inference typed it instead")
        reader = calibration_reader(state.model, src, examples[:n], ctx)
        qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[params.calibration_method]
        start = time.perf_counter()
        ctx.progress(0.1, f"calibrating ({params.calibration_method}, {n} examples)")
        try:
            with ort_warnings(ctx):
                quantize_static(
                    str(prepared),
                    str(out),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(params.op_types),
                    per_channel=params.per_channel,
                    activation_type=qtype[params.activation_type],
                    weight_type=qtype[params.weight_type],
                    nodes_to_exclude=list(params.exclude_nodes) or None,
                    calibrate_method=method,
                    use_external_data_format=needs_external_data(src),
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
        except Exception as exc:
            raise BadInput(f"ONNX Runtime's static quantization failed: {exc}", path=src) from exc
        finally:
            for scratch in (prepared, prepared.with_name(prepared.name + ".data")):
                scratch.unlink(missing_ok=True)
        finish_pass(src, out, ctx)
        counts = op_counts(out)
        ctx.metric("quantize_linear_nodes", counts.get("QuantizeLinear", 0))
        ctx.log(
            f"QDQ: {counts.get('QuantizeLinear', 0)} QuantizeLinear / {counts.get('DequantizeLinear', 0)} "
            f"DequantizeLinear nodes, calibrated on {n} examples in {time.perf_counter() - start:.1f} s"
        )
        ctx.progress(1.0, "quantized")
        return StageState(
            kind="onnx", model=state.model, path=out, info=dict(state.info, quantization="static-qdq-int8")
        )


def preprocess(src: Path, out: Path) -> str:
    """ONNX Runtime's quantization pre-processing without its graph optimization (the graph stays
    portable; onnx.optimize is its own step): symbolic and ONNX shape inference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    external = needs_external_data(src)
    options = {
        "skip_optimization": True,
        "save_as_external_data": external,
        "all_tensors_to_one_file": True,
        "external_data_location": out.name + ".data" if external else None,
    }
    # A failed symbolic inference dumps its partial model into the working directory: keep that in a
    # scratch folder next to the output.
    scratch = out.parent / "_shape_inference"
    scratch.mkdir(exist_ok=True)
    try:
        with contextlib.chdir(scratch):
            try:
                quant_pre_process(str(src), str(out), auto_merge=True, **options)
                return "symbolic"
            except Exception:
                pass  # it gives up on some exported subgraphs; ONNX's own inference still types most
            try:
                quant_pre_process(str(src), str(out), skip_symbolic_shape=True, **options)
                return "onnx"
            except Exception as exc:
                raise BadInput(f"shape inference before quantization failed: {exc}", path=src) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def calibration_reader(model: LoadedModel, src: Path, examples: Sequence[Any], ctx: RunContext) -> Any:
    """One example per feed, made as the runners make them. The examples are tokenized together so every
    feed has the same shape (entropy and percentile calibration stack their histograms); padded
    positions are masked, as they are in any padded batch."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    from studio.checkpoints.onnx_file import load_onnx_graph
    from studio.evaluation.runners import graph_config, graph_feeds
    from studio.families import Batch, family_for

    graph = load_onnx_graph(src)
    inputs = [
        (i.name, str(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)))
        for i in graph.graph.input
    ]
    family = family_for(model)
    config = graph_config(model, {p.key: p.value for p in graph.metadata_props})
    full = family.batch(model, examples, ctx.sequence_length)
    rows = [
        Batch(
            inputs={k: v[i : i + 1] for k, v in full.inputs.items()},
            labels=None if full.labels is None else full.labels[i : i + 1],
        )
        for i in range(len(examples))
    ]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.index = 0

        def get_next(self) -> dict[str, Any] | None:
            if self.index >= len(rows):
                return None
            self.index += 1
            ctx.progress(0.1 + 0.6 * self.index / len(rows), "calibrating")
            return graph_feeds(rows[self.index - 1], inputs, family, config)

        def rewind(self) -> None:
            self.index = 0

    return Reader()


# ---------------------------------------------------------------------------------------------- half


class HalfParams(Params):
    keep_io_types: bool = Field(
        True, description="keep float32 graph inputs and outputs (casts inside the graph)"
    )
    op_block_list: list[str] | None = Field(
        None,
        description="operator types kept in float32; empty: ONNX Runtime's default list of "
        "numerically fragile ops",
    )


@register
class OnnxHalf(Technique):
    id = "onnx.half"
    title = "ONNX float16"
    category = "precision"
    input_kind = "onnx"
    output_kind = "onnx"
    description = (
        "Converts weights and compute to float16 (onnxruntime.transformers float16 conversion, with "
        "symbolic shape inference for fused graphs). Halves the file; fast on GPUs, slow on most CPUs."
    )
    Params = HalfParams

    def run(self, state: StageState, params: HalfParams, ctx: RunContext) -> StageState:  # type: ignore[override]
        import onnx
        from onnxruntime.transformers.onnx_model import OnnxModel

        src = input_path(state)
        ops = op_counts(src)
        if QUANT_OPS & set(ops):
            raise BadInput("the graph is already quantized to integers: apply onnx.half before quantization")
        if float_initializer_types(src) == {"float16"}:
            raise BadInput("the graph is already float16", path=src)
        out = ctx.step_dir("half") / "model.onnx"
        start = time.perf_counter()
        ctx.progress(0.1, "converting to float16")
        wrapped = OnnxModel(onnx.load(str(src)))
        kwargs: dict[str, Any] = {"keep_io_types": params.keep_io_types}
        if params.op_block_list is not None:
            kwargs["op_block_list"] = list(params.op_block_list)
        try:
            wrapped.convert_float_to_float16(use_symbolic_shape_infer=True, **kwargs)
        except Exception as exc:
            raise BadInput(f"float16 conversion failed: {exc}", path=src) from exc
        from studio.techniques.onnx_export import save_onnx

        save_onnx(wrapped.model, out)
        finish_pass(src, out, ctx, {"studio.dtype": "float16"})
        ctx.log(f"float16 graph in {time.perf_counter() - start:.1f} s")
        ctx.progress(1.0, "converted")
        return StageState(kind="onnx", model=state.model, path=out, info=dict(state.info, dtype="float16"))


# ---------------------------------------------------------------------------------------------- shared


@contextlib.contextmanager
def ort_warnings(ctx: RunContext, limit: int = 5) -> Iterator[None]:
    """ONNX Runtime's quantization tools warn through the root logger (stderr); pass their warnings to
    the step's log instead, once each and at most `limit`."""
    seen: dict[str, int] = {}

    def capture(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            message = record.getMessage().strip()
            # the pre-processing hint: DefaultTensorType (dynamic) or preprocess() (static) stands in for it
            if "pre-processing" not in message and "pre-process" not in message:
                seen[message] = seen.get(message, 0) + 1
            return False
        return True

    root = logging.getLogger()
    root.addFilter(capture)
    try:
        yield
    finally:
        root.removeFilter(capture)
        for message, count in list(seen.items())[:limit]:
            ctx.log(f"onnxruntime: {message}" + (f" (x{count})" if count > 1 else ""), level="warning")
        if len(seen) > limit:
            ctx.log(f"onnxruntime: {len(seen) - limit} more warning(s)", level="warning")


def input_path(state: StageState) -> Path:
    if state.kind != "onnx" or state.path is None or not Path(state.path).is_file():
        raise BadInput("this step needs an ONNX graph: put export.onnx before it")
    return Path(state.path)


def model_config(model: LoadedModel, path: Path) -> Any:
    from studio.evaluation.runners import graph_config
    from studio.techniques.onnx_export import read_metadata

    return graph_config(model, read_metadata(path))


def needs_external_data(path: Path) -> bool:
    """Keep weights outside the graph when the input did, or when they approach protobuf's 2 GB."""
    from studio.techniques.onnx_export import TWO_GB, onnx_size, uses_external_data

    return uses_external_data(path) or onnx_size(path) > TWO_GB // 2


def op_counts(path: Path) -> Counter[str]:
    from studio.checkpoints.onnx_file import load_onnx_graph

    return Counter(node.op_type for node in load_onnx_graph(path).graph.node)


def float_initializer_types(path: Path) -> set[str]:
    import onnx

    from studio.checkpoints.onnx_file import load_onnx_graph

    floats = {
        onnx.TensorProto.FLOAT: "float32",
        onnx.TensorProto.FLOAT16: "float16",
        onnx.TensorProto.BFLOAT16: "bfloat16",
    }
    return {floats[t.data_type] for t in load_onnx_graph(path).graph.initializer if t.data_type in floats}


def refuse_unless_float32(path: Path, technique: str) -> None:
    if QUANT_OPS & set(op_counts(path)):
        raise BadInput(f"{technique}: the graph is already quantized", path=path)
    if "float32" not in float_initializer_types(path):
        raise BadInput(f"{technique} quantizes float32 graphs: put it before onnx.half", path=path)


def check_nodes(path: Path, names: Sequence[str]) -> None:
    if not names:
        return
    from studio.checkpoints.onnx_file import load_onnx_graph

    present = {n.name for n in load_onnx_graph(path).graph.node}
    missing = [n for n in names if n not in present]
    if missing:
        raise BadInput(f"no node named {', '.join(map(json.dumps, missing))} in the graph", path=path)


def follow_weight_names(src: Path, out: Path, names: dict[str, Any]) -> dict[str, Any]:
    """The input graph's torch weight names (see export.onnx's `weight_names`), extended to the initializers
    the pass made from named ones: a renamed copy, or a concatenation of equal parts (the Q, K and V weights
    a fusion joins into one Attention weight), found by content."""
    import numpy as np

    from studio.checkpoints.onnx_file import initializer_array, load_onnx_graph
    from studio.techniques.onnx_export import content_digest

    src_inits = load_onnx_graph(src).graph.initializer
    known = {
        content_digest(initializer_array(i, src.parent)): names[i.name]
        for i in src_inits
        if isinstance(names.get(i.name), list)
    }
    src_names = {i.name for i in src_inits}
    out_names = dict(names)
    for init in load_onnx_graph(out).graph.initializer:
        if init.name in src_names or init.name in names:
            continue
        array = initializer_array(init, out.parent)
        whole = known.get(content_digest(array))
        if whole:
            out_names[init.name] = whole
        elif array.ndim in (1, 2) and array.shape[-1] % 3 == 0 and array.shape[-1] > 3:
            parts = [known.get(content_digest(part)) for part in np.split(array, 3, axis=-1)]
            if all(parts):
                out_names[init.name] = {"parts": parts, "axis": array.ndim - 1}
    return out_names


def finish_pass(src: Path, out: Path, ctx: RunContext, extra: dict[str, str] | None = None) -> None:
    """Carry the input graph's studio metadata and side files to the output; report the size change."""
    from studio.techniques.onnx_export import onnx_size, read_metadata, set_metadata
    from studio.techniques.torch_io import copy_side_files

    if not out.is_file():
        raise BadInput("the pass wrote no graph", path=out)
    props = {k: v for k, v in read_metadata(src).items() if k.startswith("studio.")}
    if "studio.weight_names" in props:
        names = follow_weight_names(src, out, json.loads(props["studio.weight_names"]))
        props["studio.weight_names"] = json.dumps(names, sort_keys=True)
    set_metadata(out, {**props, **(extra or {})})
    copy_side_files(src.parent, out.parent)
    before, after = onnx_size(src), onnx_size(out)
    ctx.metric("onnx_size_bytes", after)
    ctx.log(f"{out.name}: {after / 1e6:.1f} MB ({after / before:.0%} of the input's {before / 1e6:.1f} MB)")
