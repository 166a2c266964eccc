"""export.onnx_genai on builtin:tinylm (a trained Llama with grouped-query attention): onnxruntime-genai's
builder writes the fused graph, the studio verifies it against torch, its greedy output through the
studio's loop is torch's token for token, onnx.quantize_blockwise takes it and carries genai_config.json,
and the INT4 artifact decodes in onnxruntime-genai's own Generator to the studio loop's tokens; after
runtime.onnxruntime_genai the studio's generation metrics run it there. A float-only block refuses a
quantized torch model, naming the block before it. No assertion depends on speed."""

from __future__ import annotations

import json

import pytest

from studio.checkpoints import open_checkpoint
from studio.errors import BadInput
from studio.evaluation.data import load_examples
from studio.evaluation.generation import generation_prompts, greedy_tokens
from studio.evaluation.latency import TimingPolicy
from studio.techniques.base import RunContext, get_technique, initial_state

PROMPT, NEW = 16, 8
FAST = TimingPolicy(warmup_runs=1, warmup_seconds=0.0, min_runs=2, min_seconds=0.0, max_runs=2)


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


def test_runtime_onnxruntime_genai_decodes_the_graph_in_the_generator(built, tmp_path):
    import onnx

    from studio.evaluation.generation import greedy_loop, measure_generation
    from studio.evaluation.onnx_generation import OnnxGreedyLoop
    from studio.evaluation.ortgenai_runner import RUNTIME_KEY, OrtGenaiLoop
    from studio.pipeline import GenerationSpec

    model, _exported, int4, _events = built
    marked, _ = run_step(int4, "runtime.onnxruntime_genai", tmp_path, index=2, intra_op_threads=1)
    meta = {p.key: p.value for p in onnx.load(str(marked.path), load_external_data=False).metadata_props}
    assert json.loads(meta[RUNTIME_KEY]) == {"intra_op_threads": 1}
    config_file = marked.path.with_name("genai_config.json")
    config_text = config_file.read_text()
    assert json.loads(config_text)["model"]["decoder"]["filename"] == marked.path.name
    # the unmarked graph keeps the studio's loop; the marked one gets the Generator, sized for NEW tokens
    assert isinstance(greedy_loop("onnx", int4.path, "causal-lm"), OnnxGreedyLoop)
    loop = greedy_loop("onnx", marked.path, "causal-lm", max_new_tokens=NEW)
    assert isinstance(loop, OrtGenaiLoop) and loop.max_new_tokens == NEW
    assert config_file.read_text() == config_text  # its threads went in as an overlay, not into the file

    prompts = generation_prompts(model, load_examples("builtin:sentences", 8), 8, PROMPT)
    studio_tokens = greedy_tokens(int4.path, "causal-lm", prompts, NEW, "onnx")
    eos = model.module.config.eos_token_id
    row = next(r for r in range(len(prompts)) if eos not in studio_tokens[r].tolist())
    tokens, state = loop.generate(prompts[row : row + 1], NEW)
    assert tokens.tolist() == studio_tokens[row : row + 1].tolist()
    _, studio_state = OnnxGreedyLoop(int4.path, threads=1).generate(prompts[row : row + 1], NEW)
    assert loop.cache_bytes(state) == sum(a.nbytes for a in studio_state["cache"])  # the same float cache

    spec = GenerationSpec(prompt_tokens=PROMPT, new_tokens=4, batch_sizes=[1])
    metrics = measure_generation(
        "onnx", marked.path, model, load_examples("builtin:sentences", 4), spec, policy=FAST
    )
    assert "unavailable" not in metrics, metrics
    assert metrics["1"]["decode_tokens_per_s"] > 0
    assert metrics["kv_cache_bytes"] == loop.cache_bytes({**state, "length": PROMPT + 4})
    # tokens compared with the original's come from the studio's loop on the same graph (the Generator
    # never picks the end token before its length), so generation_match is the variant's, not the runtime's
    assert greedy_tokens(marked.path, "causal-lm", prompts, NEW, "onnx").tolist() == studio_tokens.tolist()


def test_runtime_onnxruntime_genai_refuses_a_graph_the_generator_cannot_load(built, tmp_path):
    import shutil

    from studio.evaluation.generation import measure_generation
    from studio.pipeline import GenerationSpec
    from studio.techniques.base import StageState

    model, _exported, int4, _events = built
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (int4.path.name, int4.path.name + ".data"):
        if int4.path.with_name(name).is_file():
            shutil.copy2(int4.path.with_name(name), bare / name)
    state = StageState(kind="onnx", model=model, path=bare / int4.path.name, info=dict(int4.info))
    with pytest.raises(BadInput, match=r"genai_config\.json beside it.*export\.onnx_genai"):
        run_step(state, "runtime.onnxruntime_genai", tmp_path, index=2)

    # a marked graph whose genai_config.json is lost later: the metrics say why instead of failing the run
    marked, _ = run_step(int4, "runtime.onnxruntime_genai", tmp_path / "m", index=2)
    marked.path.with_name("genai_config.json").unlink()
    spec = GenerationSpec(prompt_tokens=PROMPT, new_tokens=4, batch_sizes=[1])
    metrics = measure_generation(
        "onnx", marked.path, model, load_examples("builtin:sentences", 4), spec, policy=FAST
    )
    assert (
        "runtime.onnxruntime_genai" in metrics["unavailable"]
        and "genai_config.json" in metrics["unavailable"]
    )
