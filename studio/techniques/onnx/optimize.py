"""onnx.optimize: ONNX Runtime's transformer fusions (attention, layer normalization, GELU into its fast
kernels), or its generic graph optimizations for graphs it has no fusions for."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from studio.checkpoints.onnx_graph import needs_external_data
from studio.errors import BadInput, Unavailable
from studio.techniques.base import Params, RunContext, StageState, Technique, register
from studio.techniques.onnx.graph_pass import GraphPass, model_config

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
class OnnxOptimize(Technique[OptimizeParams]):
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

    def run(self, state: StageState, params: OptimizeParams, ctx: RunContext) -> StageState:
        import onnxruntime as ort

        frame = GraphPass.open(state, ctx, "optimize", technique=self.id)
        src, out = frame.src, frame.out
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
            with frame.tool("ONNX Runtime's optimizer"):
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
        frame.finish()
        counts = frame.counts
        ctx.log(
            f"optimized in {seconds:.1f} s; graph ops: "
            + ", ".join(f"{k} {v}" for k, v in counts.most_common(8))
        )
        ctx.metric("onnx_nodes", sum(counts.values()))
        return frame.result("optimized", onnx_optimized=True)


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
    even = (
        counts is not None
        and len(set(counts)) == 1
        and config_heads > 0
        and config_hidden % config_heads == 0
    )
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
