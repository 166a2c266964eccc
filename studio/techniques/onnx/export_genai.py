"""export.onnx_genai: a causal LM's decoder as onnxruntime-genai's model builder writes it.

The builder (`python -m onnxruntime_genai.models.builder`, run as a subprocess on the model saved as a
Hugging Face folder) writes the decoder with ONNX Runtime's fused kernels: one GroupQueryAttention per
layer (rotary embedding inside), SkipSimplifiedLayerNormalization for every residual add + RMSNorm, and its
KV cache as past/present inputs and outputs with the names export.onnx `with_cache` uses. The torch export
of the same model keeps the decomposed attention, masks and rotary arithmetic: on a Qwen2.5-0.5B-shaped
Llama it is about 5,600 nodes against the builder's 280, and at 2 CPU threads its INT4 decode is 0.66x the
builder's graph's (see docs/bench.md). The builder is the well-kept tool for this graph, so the studio
calls it rather than re-implementing its fusions; what it writes is then an ordinary studio ONNX stage:
onnx.quantize_blockwise, the evaluation and the greedy loop take it, and its genai_config.json goes along
with every later ONNX step, so the artifact also loads in onnxruntime-genai's own Generator.

Only float models are taken (the builder re-reads the weights from the saved folder; a torch block's
quantized layers would not survive that): quantize the graph afterwards with onnx.quantize_blockwise. The
builder reads the folder without running any of its code (`hf_remote` stays off).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from studio.checkpoints.onnx_graph import graph_opset, onnx_size, save_onnx, set_metadata
from studio.errors import BadInput
from studio.evaluation.onnx_cache import LAYOUT_KEY, PAST_PREFIX, PRESENT_PREFIX, CacheLayout
from studio.evaluation.openvino_runner import installed
from studio.techniques.base import Params, RunContext, StageState, Technique, register
from studio.techniques.onnx.graph_pass import GENAI_CONFIG

if TYPE_CHECKING:
    from studio.families import Batch

NO_GENAI = "onnxruntime-genai is not installed (pip install onnxruntime-genai==0.18.0): its builder writes this graph"
GRAPH = "model.onnx"
# torch blocks whose output is no longer plain float Linear weights a saved folder can carry
QUANTIZING_PREFIXES = ("quantize.", "kv_cache.")
BUILDER_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "fp16"}


class ExportGenaiParams(Params):
    precision: Literal["auto", "fp32", "fp16"] = Field(
        "auto",
        description="the graph's float type: auto keeps the model's (bfloat16 becomes fp16, which ONNX "
        "Runtime's CPU kernels run); fp32 is the fast one on CPUs",
    )
    verify: bool = Field(
        True, description="compare the graph with torch on calibration examples (prefill and one decode step)"
    )
    atol: float = Field(
        1e-3, gt=0, description="largest absolute logit difference to torch that counts as verified"
    )


@register
class ExportOnnxGenai(Technique[ExportGenaiParams]):
    id = "export.onnx_genai"
    title = "ONNX (onnxruntime-genai builder)"
    category = "export"
    input_kind = "torch"
    output_kind = "onnx"
    families = ("causal-lm",)
    description = (
        "Exports a causal LM with onnxruntime-genai's model builder: fused GroupQueryAttention, rotary and "
        "RMSNorm kernels and a KV cache (far fewer nodes than export.onnx, faster decoding); the graph takes "
        "the studio's ONNX passes and also loads in onnxruntime-genai (genai_config.json beside it)."
    )
    Params = ExportGenaiParams

    def availability(self) -> tuple[bool, str | None]:
        return (True, None) if installed("onnxruntime_genai") else (False, NO_GENAI)

    def run(self, state: StageState, params: ExportGenaiParams, ctx: RunContext) -> StageState:
        from studio.evaluation.ortgenai_runner import BuilderFailed, build_model
        from studio.families import family_for
        from studio.techniques.onnx.export import (
            copy_model_side_files,
            export_examples,
            metadata_for,
            module_dtype,
            sub_batch,
            verify_export,
            weight_names,
        )
        from studio.techniques.onnx.export_cache import cache_layout, verify_decode_step

        model, module = state.model, state.module
        if module is None or not hasattr(module, "save_pretrained"):
            raise BadInput("export.onnx_genai needs a transformers causal LM (a torch model with a config)")
        quantized = [
            str(r.get("technique"))
            for r in state.transforms
            if str(r.get("technique", "")).startswith(QUANTIZING_PREFIXES)
        ]
        if quantized:
            raise BadInput(
                f"export.onnx_genai takes a float model, and {quantized[0]} came before it: put "
                "onnx.quantize_blockwise after the export instead"
            )
        dtype = module_dtype(module) or "float32"
        precision = BUILDER_PRECISION.get(dtype, "fp32") if params.precision == "auto" else params.precision
        layout = cache_layout(module)
        out_dir = ctx.step_dir("export")
        built = out_dir / "builder"  # what the builder wrote; the finished graph goes to `folder`
        folder = out_dir / "genai"
        source = out_dir / "hf-input"  # the model as the builder reads it; removed once the graph is written
        started = time.perf_counter()
        ctx.progress(0.05, "saving the model for onnxruntime-genai's builder")
        try:
            module.save_pretrained(str(source))
            copy_model_side_files(model, source)
            ctx.progress(0.2, f"building the {precision} graph with onnxruntime-genai's builder")
            try:
                build_model(source, built, precision=precision)
            except BuilderFailed as exc:
                raise BadInput(f"export.onnx_genai: {exc}") from exc
            ctx.progress(0.6, "finishing the graph")
            path = finish_graph(built, folder, layout)
        finally:
            for leftover in (source, built, out_dir / f"{built.name}-builder-cache"):
                shutil.rmtree(leftover, ignore_errors=True)
        seconds = time.perf_counter() - started
        info = dict(state.info)
        info["dtype"] = "float16" if precision == "fp16" else "float32"
        props = metadata_for(model, info, "onnxruntime-genai")
        props[LAYOUT_KEY] = layout.to_metadata()
        props["studio.weight_names"] = json.dumps(weight_names(module, path), sort_keys=True)
        set_metadata(path, props)
        size = onnx_size(path)
        ctx.metric("export_seconds", seconds)
        ctx.metric("onnx_size_bytes", size)
        ctx.log(
            f"wrote {path.name} ({size / 1e6:.1f} MB, opset {graph_opset(path)}, {precision}) and "
            f"{GENAI_CONFIG} with onnxruntime-genai's builder in {seconds:.1f} s"
        )
        if params.verify:
            ctx.progress(0.75, "verifying against torch")
            family = family_for(model)
            batch = family.batch(model, export_examples(ctx), ctx.sequence_length)
            diff = verify_export(module, path, model, family, batch, info["dtype"], params.atol, ctx)
            verify_decode_step(
                module, path, unpadded(sub_batch(batch, [0, 1])), layout, max(params.atol, diff), ctx
            )
        ctx.progress(1.0, "exported")
        info["onnx_exporter"] = "onnxruntime-genai"
        info["torch_transforms"] = [r.get("technique") for r in state.transforms]
        return StageState(kind="onnx", model=model, path=path, info=info)


def unpadded(batch: Batch) -> Batch:
    """The batch cut to its shortest sequence, so no row has padding. GroupQueryAttention continues each
    sequence after its last real token (the position the attention mask counts), while torch continues it
    after the padding, so a decode step after a right-padded prompt differs by design; the studio's greedy
    loops feed unpadded prompts, which is what the check then covers."""
    from studio.families import Batch

    mask = batch.inputs.get("attention_mask")
    if mask is None:
        return batch
    shortest = max(int(mask.sum(1).min()), 1)
    inputs = {k: v[:, :shortest].contiguous() if v.dim() == 2 else v for k, v in batch.inputs.items()}
    return Batch(inputs=inputs)


def finish_graph(built: Path, folder: Path, layout: CacheLayout) -> Path:
    """The builder's graph, with two changes, written to `folder` with its genai_config.json and tokenizer:

    - a Transpose of a weight (the builder gathers a tied embedding from Transpose(output layer's weight))
      becomes the transposed weight itself: ONNX Runtime does not fold it when the session starts, so every
      decode step transposed the whole table (the 0.5B model's 115 MB: its INT4 decode 26.9 ms a token
      with it, 24.5 without, where onnxruntime-genai's own INT4 graph takes 24.3);
    - the cache's head dimension, which the builder leaves symbolic (`kv_cache_dim`), is declared: the
      studio's loops size an empty past from the declared shape."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(built / GRAPH))
    graph = proto.graph
    weights = {init.name: init for init in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in weights:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(weights[node.input[0]])
            folded = np.ascontiguousarray(array.transpose(perm) if perm else array.T)
            graph.initializer.append(numpy_helper.from_array(folded, node.output[0]))
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.name.startswith((PAST_PREFIX, PRESENT_PREFIX)) and len(dims) == 4:
            dims[1].dim_value = layout.kv_heads
            dims[3].dim_value = layout.head_dim
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / GRAPH
    save_onnx(proto, path)
    for item in built.iterdir():
        if item.is_file() and item.suffix not in (".onnx", ".data"):  # genai_config.json, tokenizer files
            shutil.copy2(item, folder / item.name)
    return path
