"""The torch graph from torch.export: MiniLM's data flow joins its inputs to its output through every
layer (the attention output's residual add feeds the LayerNorm), a Llama's residual adds read the layer's
input and its o_proj, repeated layers collapse, and a model torch.export cannot capture falls back to
module hooks, saying so."""

from __future__ import annotations

import pytest

from studio.checkpoints import open_checkpoint
from studio.inspection.graph import torch_graph
from studio.inspection.graph_layout import layout_graph


def reachable(edges: list[tuple[str, str]], starts: set[str]) -> set[str]:
    after: dict[str, list[str]] = {}
    for a, b in edges:
        after.setdefault(a, []).append(b)
    seen, todo = set(starts), list(starts)
    while todo:
        for b in after.get(todo.pop(), []):
            if b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


@pytest.fixture(scope="module")
def minilm_graph():
    return torch_graph(open_checkpoint("builtin:minilm"))


def test_minilm_torch_graph_is_connected_from_its_inputs_to_its_output(minilm_graph):
    graph = minilm_graph
    assert graph.source == "torch.export" and graph.notes == []
    assert graph.inputs == ["input_ids", "token_type_ids", "attention_mask"] and len(graph.outputs) == 1
    readers_of_inputs = {n.name for n in graph.nodes if set(n.inputs) & set(graph.inputs)}
    assert "embeddings.word_embeddings" in readers_of_inputs
    edges = graph.edges()
    seen = reachable(edges, readers_of_inputs)
    last = graph.producers()[graph.outputs[0]]
    assert last in seen and last.startswith("forward/")  # the family's pooling, after the last layer
    linears = [n.name for n in graph.nodes if n.op == "Linear"]
    assert len(linears) == 37 and set(linears) <= seen
    pairs = set(edges)
    for i in range(6):
        out = f"encoder.layer.{i}.attention.output"
        assert (f"{out}.dense", f"{out}.dropout") in pairs and (f"{out}.dropout", f"{out}/add") in pairs
        assert (f"{out}/add", f"{out}.LayerNorm") in pairs
        # the residual: the add also reads the layer's input, the previous layer's output LayerNorm
        before = "embeddings.dropout" if i == 0 else f"encoder.layer.{i - 1}.output.LayerNorm"
        assert (before, f"{out}/add") in pairs
        sdpa = graph.node(f"encoder.layer.{i}.attention.self/scaled_dot_product_attention")
        assert sdpa.op == "scaled_dot_product_attention" and sdpa.group == f"encoder.layer.{i}"
    # far more data flow than the hooks saw (50 edges), and still six layer boxes when collapsed
    assert len(edges) > 3 * len(linears)
    assert list(graph.groups()) == [f"encoder.layer.{i}" for i in range(6)]
    boxes = {b.id for b in layout_graph(graph).boxes}
    assert {f"encoder.layer.{i}" for i in range(6)} <= boxes and len(boxes) <= 12
    query = graph.node("encoder.layer.0.attention.self.query")
    assert query.torch_weights() == [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.attention.self.query.bias",
    ]
    assert query.precision == "float32" and graph.shapes[query.outputs[0]] == [2, 16, 384]


def test_llama_residual_adds_read_the_layer_input_and_the_attention_output(llama):
    graph = torch_graph(open_checkpoint(llama))
    assert graph.source == "torch.export"
    assert list(graph.groups()) == ["model.layers.0", "model.layers.1"]
    pairs = set(graph.edges())
    assert ("model.embed_tokens", "model.layers.0/add") in pairs
    assert ("model.layers.0.self_attn.o_proj", "model.layers.0/add") in pairs
    assert ("model.layers.0/add", "model.layers.0.post_attention_layernorm") in pairs
    assert ("model.layers.1/add_1", "model.norm") in pairs and ("model.norm", "lm_head") in pairs
    assert graph.producers()[graph.outputs[0]] == "lm_head"
    boxes = [b.id for b in layout_graph(graph).boxes]
    assert "model.layers.0" in boxes and "model.layers.1" in boxes
    assert "norm" in boxes or "model.norm" in boxes  # the final norm is not boxed with the embeddings


def test_a_model_torch_export_cannot_capture_falls_back_to_module_hooks(bert_classifier):
    model = open_checkpoint(bert_classifier)

    def data_dependent(_module, args):  # Python control flow on a tensor's value: export cannot trace it
        if float(args[0].float().sum()) == float("inf"):
            raise AssertionError("never")

    handle = model.module.bert.encoder.layer[0].register_forward_pre_hook(data_dependent)
    try:
        graph = torch_graph(model)
    finally:
        handle.remove()
    assert graph.source == "module hooks"
    assert len(graph.notes) == 1 and graph.notes[0].startswith("torch.export could not capture the model (")
    assert graph.node("bert.encoder.layer.1.attention.self.query").op == "Linear"
    assert not any("/" in n.name for n in graph.nodes)  # no functional ops: only the leaf calls
    assert torch_graph(model).source == "torch.export"  # without the hook it exports again


def test_a_dynamic_int8_model_falls_back_and_shows_its_quantized_linears(bert_classifier):
    import torch

    model = open_checkpoint(bert_classifier)
    model.module = torch.ao.quantization.quantize_dynamic(model.module, {torch.nn.Linear}, dtype=torch.qint8)
    graph = torch_graph(model)  # FBGEMM's packed weights are opaque to torch.export
    assert graph.source == "module hooks" and "torch.export could not capture" in graph.notes[0]
    query = graph.node("bert.encoder.layer.0.attention.self.query")  # the Linear, not its _packed_params
    assert query.op == "Linear" and query.precision == "int8"
    assert not any(n.name.endswith("_packed_params") for n in graph.nodes)
