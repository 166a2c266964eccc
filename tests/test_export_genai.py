"""export.onnx_genai on builtin:tinylm (a trained Llama with grouped-query attention): onnxruntime-genai's
builder writes the fused graph, the studio verifies it against torch, its greedy output through the
studio's loop is torch's token for token, onnx.quantize_blockwise takes it and carries genai_config.json,
and the INT4 artifact decodes in onnxruntime-genai's own Generator to the studio loop's tokens. A float-only
block refuses a quantized torch model, naming the block before it. No assertion depends on speed."""

from __future__ import annotations

import json

import pytest

from studio.checkpoints import open_checkpoint
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.evaluation.generation import generation_prompts, greedy_tokens
from studio.techniques.base import RunContext, get_technique, initial_state

PROMPT, NEW = 16, 8


def run_step(state, technique_id, workdir, index=0, **params):
    events = []
    ctx = RunContext(
        original=state.model,
        workdir=workdir,
        calibration=load_examples("builtin:sentences", 8),
        sequence_length=32,
        step_index=index,
        emit=events.append,
    )
    cls = get_technique(technique_id)
    return cls().run(state, cls.Params(**params), ctx), events


def metric(events, name):
    return next(e.value for e in reversed(events) if getattr(e, "name", None) == name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """tinylm through export.onnx_genai, then INT4 blockwise: (model, float state, int4 state, events)."""
    model = open_checkpoint("builtin:tinylm")
    work = tmp_path_factory.mktemp("genai")
    exported, events = run_step(initial_state(model), "export.onnx_genai", work)
    int4, _ = run_step(exported, "onnx.quantize_blockwise", work, index=1, bits=4, block_size=32)
    return model, exported, int4, events


def test_the_builder_graph_is_fused_verified_and_decodes_like_torch(built):
    import onnx

    model, exported, _int4, events = built
    graph = onnx.load(str(exported.path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    layers = model.module.config.num_hidden_layers
    assert ops.count("GroupQueryAttention") == layers  # the builder's fused attention, one per layer
    weights = {init.name for init in graph.initializer}
    # tinylm ties its embeddings: the builder's Transpose of the output weight became the table itself
    assert model.module.config.tie_word_embeddings
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights]
    assert any(n.op_type == "Gather" and n.input[0] in weights and "input_ids" in n.input for n in graph.node)
    assert metric(events, "onnx_max_abs_diff") < 1e-4  # the prefill against torch
    assert metric(events, "onnx_decode_max_abs_diff") < 1e-4  # one step through the cache
    head_dim = model.module.config.hidden_size // model.module.config.num_attention_heads
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    assert past and all(i.type.tensor_type.shape.dim[3].dim_value == head_dim for i in past)
    meta = {p.key: p.value for p in onnx.load(str(exported.path), load_external_data=False).metadata_props}
    assert (
        meta["studio.exporter"] == "onnxruntime-genai"
        and json.loads(meta["studio.kv_cache"])["layers"] == layers
    )

    prompts = generation_prompts(model, load_examples("builtin:sentences", 8), 3, PROMPT)
    torch_tokens = greedy_tokens(model.module, "causal-lm", prompts, NEW)
    assert greedy_tokens(exported.path, "causal-lm", prompts, NEW, "onnx").tolist() == torch_tokens.tolist()


def test_the_int4_artifact_runs_in_onnxruntime_genai_like_the_studio_loop(built):
    import onnx

    from studio.evaluation.ortgenai_runner import OrtGenaiLoop

    model, _exported, int4, _events = built
    folder = int4.path.parent
    assert "MatMulNBits" in {
        n.op_type for n in onnx.load(str(int4.path), load_external_data=False).graph.node
    }
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == int4.path.name  # carried by the pass, naming its graph
    prompts = generation_prompts(model, load_examples("builtin:sentences", 8), 8, PROMPT)
    studio_tokens = greedy_tokens(int4.path, "causal-lm", prompts, NEW, "onnx")
    # onnxruntime-genai, asked for exactly NEW tokens, never picks the end-of-text token (its min_length):
    # compared on the prompts whose greedy continuation does not end within NEW tokens
    eos = model.module.config.eos_token_id
    rows = [r for r in range(len(prompts)) if eos not in studio_tokens[r].tolist()]
    assert rows
    loop = OrtGenaiLoop(folder, threads=1, max_new_tokens=NEW)
    for r in rows:
        genai_tokens, _ = loop.generate(prompts[r : r + 1], NEW)
        assert genai_tokens.tolist() == studio_tokens[r : r + 1].tolist()


def test_a_quantized_torch_model_is_refused_naming_the_block(tmp_path):
    model = open_checkpoint("builtin:tinylm")
    state, _ = run_step(initial_state(model), "quantize.weight_only", tmp_path, bits=8)
    with pytest.raises(BadInput, match=r"quantize\.weight_only came before it.*onnx\.quantize_blockwise"):
        run_step(state, "export.onnx_genai", tmp_path, index=1)


def test_an_architecture_the_builder_lacks_is_a_clear_error(gpt2, tmp_path):
    model = open_checkpoint(str(gpt2))
    with pytest.raises(
        BadInput, match=r"export\.onnx_genai: the onnxruntime-genai builder failed.*not .*supported"
    ):
        run_step(initial_state(model), "export.onnx_genai", tmp_path)
    assert not list(tmp_path.rglob("hf-input"))  # the folder saved for the builder is gone
