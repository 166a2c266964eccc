"""The graph view's layout in the core: MiniLM's exported ONNX graph collapses to its six layers plus the
embeddings and the attention-mask arithmetic, edges join boxes and run downwards, a block expands into its
nodes; a synthetic 32-layer graph stays a column of 32 boxes; per-box values and categories; the node and
diff tables written by `graph --csv` / `diff --csv` and read back as an overlay."""

from __future__ import annotations

import csv
import json

import pytest

from studio.cli import main
from studio.errors import BadInput
from studio.inspection.graph import Graph, GraphNode, block_of, onnx_graph
from studio.inspection.graph_diff import graph_diff
from studio.inspection.graph_export import (
    DIFF_COLUMNS,
    NODE_COLUMNS,
    diff_marks,
    diff_rows,
    node_rows,
    onto_graph,
    read_node_values,
    write_table,
)
from studio.inspection.graph_layout import (
    blocks_of,
    box_labels,
    box_values,
    layout_graph,
    module_block,
    node_label,
)

LAYERS = [f"encoder.layer.{i}" for i in range(6)]


def assert_edges_join_boxes_downwards(layout):
    boxes = {b.id: b for b in layout.boxes}
    assert layout.edges
    for e in layout.edges:
        a, b = boxes[e.source], boxes[e.target]
        assert e.points[0] == pytest.approx((a.x + a.w / 2, a.y + a.h))  # leaves the source's bottom
        assert e.points[-1] == pytest.approx((b.x + b.w / 2, b.y))  # enters the target's top
        assert b.y > a.y + a.h, (e.source, e.target)  # top to bottom


def test_module_block_names_the_module_a_node_sits_under():
    assert module_block("/model/embeddings/LayerNorm/LayerNormalization") == "embeddings"
    assert module_block("/model/Cast") == "model"
    assert module_block("pooler.dense") == "pooler"
    # torch.export's graph: a functional op by the module it ran in; the root module's ops are `model`'s;
    # a decoder's final norm is below a `model` root, as in ONNX names
    assert module_block("embeddings/add") == "embeddings" and module_block("/to") == "model"
    assert module_block("model.norm") == "norm" and module_block("model.embed_tokens") == "embed_tokens"
    assert module_block("model/arange") == "model" and module_block("lm_head") == "lm_head"
    assert module_block("Constant_12") is None and module_block("Attention_0") is None
    assert node_label("/model/encoder/layer.0/attention/self/Softmax", "Softmax") == "Softmax"
    assert node_label("/model/encoder/layer.0/attention/self/query/MatMul", "MatMul") == "MatMul"
    assert node_label("bert.encoder.layer.0.attention.self.query", "Linear") == "self.query: Linear"


def test_minilm_collapses_to_its_six_layers_the_embeddings_and_the_mask(minilm_onnx):
    graph = onnx_graph(minilm_onnx["exported"])
    layout = layout_graph(graph)
    ids = [b.id for b in layout.boxes]
    assert [i for i in ids if i.startswith("encoder.layer.")] == LAYERS
    assert set(ids) == {*LAYERS, "embeddings", "model"}  # every loose node found its block
    assert all(b.collapsed for b in layout.boxes)
    assert sum(b.members for b in layout.boxes) == len(graph.nodes)
    layer = layout.box("encoder.layer.3")
    assert (
        layer.op == "MatMul"
        and layer.ops["MatMul"] >= 6
        and layer.members == len(graph.groups()["encoder.layer.3"])
    )
    assert_edges_join_boxes_downwards(layout)
    # the layers form one column in order: each below the one before it
    ys = [layout.box(i).y for i in LAYERS]
    assert ys == sorted(ys) and len(set(ys)) == 6
    assert layout.box("embeddings").y < ys[0]
    assert layout.width > 0 and layout.height >= ys[-1]


def test_expanding_a_block_shows_its_nodes_in_order(minilm_onnx):
    graph = onnx_graph(minilm_onnx["exported"])
    layout = layout_graph(graph, expanded=["encoder.layer.1"])
    members = graph.groups()["encoder.layer.1"]
    shown = {b.id: b for b in layout.boxes}
    assert "encoder.layer.1" not in shown
    assert set(members) <= set(shown) and all(not shown[m].collapsed for m in members)
    assert all(shown[m].block == "encoder.layer.1" for m in members)
    assert len(layout.boxes) == 8 - 1 + len(members)
    query = "/model/encoder/layer.1/attention/self/query/MatMul"
    softmax = "/model/encoder/layer.1/attention/self/Softmax"
    assert shown[query].y < shown[softmax].y  # the product feeds the softmax: drawn above it
    assert layout.box("encoder.layer.0").y < shown[query].y < layout.box("encoder.layer.2").y
    assert_edges_join_boxes_downwards(layout)
    assert (
        layout.item_of[query] == query
        and layout.members("encoder.layer.2") == graph.groups()["encoder.layer.2"]
    )


def synthetic_graph(layers: int, ops_per_layer: int = 24) -> Graph:
    """A decoder-like chain: an embedding, `layers` layers of `ops_per_layer` nodes (with a residual
    edge over each layer), a mask every layer reads, and a head."""
    nodes = [GraphNode("/model/embed_tokens/Gather", "Gather", ["input_ids"], ["h0"])]
    nodes.append(GraphNode("/model/mask/Where", "Where", ["attention_mask"], ["mask"]))
    previous = "h0"
    for i in range(layers):
        entry = previous
        for j in range(ops_per_layer):
            op = "MatMul" if j % 4 == 0 else "Add"
            inputs = [previous] + (["mask"] if j == 1 else []) + ([entry] if j == ops_per_layer - 1 else [])
            out = f"l{i}_{j}"
            nodes.append(GraphNode(f"/model/layers.{i}/op_{j}/{op}", op, inputs, [out]))
            previous = out
    nodes.append(GraphNode("/lm_head/MatMul", "MatMul", [previous], ["logits"]))
    for n in nodes:
        n.group = block_of(n.name)
    return Graph(kind="onnx", nodes=nodes, inputs=["input_ids", "attention_mask"], outputs=["logits"])


def test_a_32_layer_graph_collapses_to_a_column_of_32_boxes():
    graph = synthetic_graph(32)
    layout = layout_graph(graph)
    layer_ids = [f"model.layers.{i}" for i in range(32)]
    ids = {b.id for b in layout.boxes}
    assert set(layer_ids) <= ids and len(ids) == 32 + 3  # + embedding, mask, head
    assert_edges_join_boxes_downwards(layout)
    ys = [layout.box(i).y for i in layer_ids]
    assert ys == sorted(ys) and len(set(ys)) == 32
    # the mask read by every layer does not drag the layers sideways: they stay one column
    centres = [layout.box(i).centre()[0] for i in layer_ids]
    assert max(centres) - min(centres) < layout.box(layer_ids[0]).w / 2
    expanded = layout_graph(graph, expanded=["model.layers.5"])
    assert len(expanded.boxes) == len(layout.boxes) - 1 + 24


def test_box_values_sum_shares_and_take_the_largest_error_and_categories_mix():
    graph = synthetic_graph(2, ops_per_layer=4)
    layout = layout_graph(graph)
    names = graph.groups()["model.layers.0"]
    shares = {names[0]: 0.25, names[1]: 0.5, "/lm_head/MatMul": 0.25}
    assert box_values(layout, shares, "sum") == {"model.layers.0": 0.75, "/lm_head/MatMul": 0.25}
    assert box_values(layout, shares, "max")["model.layers.0"] == 0.5
    precisions = {names[0]: "int8", names[1]: "float32", graph.groups()["model.layers.1"][0]: "int8"}
    assert box_labels(layout, precisions) == {"model.layers.0": "mixed", "model.layers.1": "int8"}


def test_blocks_of_keeps_one_node_blocks_as_nodes():
    graph = synthetic_graph(1, ops_per_layer=2)
    blocks = blocks_of(graph)
    assert blocks["/model/embed_tokens/Gather"] is None  # alone in `embed_tokens`
    assert blocks["/model/layers.0/op_0/MatMul"] == "model.layers.0"


def test_tables_are_written_as_csv_or_json_and_nothing_else_is_left(tmp_path):
    graph = synthetic_graph(1, ops_per_layer=2)
    rows = node_rows(graph, {"/lm_head/MatMul": 1.0}, {"layers.0.op_0": 0.5})
    assert rows[-1]["time_share"] == 1.0 and rows[0]["time_share"] == 0.0
    csv_path = write_table(tmp_path / "out" / "nodes.csv", rows, NODE_COLUMNS)
    with csv_path.open(encoding="utf-8") as fh:
        table = list(csv.reader(fh))
    assert table[0] == list(NODE_COLUMNS) and len(table) == len(graph.nodes) + 1
    assert table[-1][:2] == ["/lm_head/MatMul", "MatMul"] and float(table[-1][4]) == 1.0
    json_path = write_table(tmp_path / "nodes.json", rows, NODE_COLUMNS)
    assert json.loads(json_path.read_text())[0]["name"] == graph.nodes[0].name
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["nodes.csv", "nodes.json"]
    with pytest.raises(BadInput, match="folder"):
        write_table(csv_path / "below-a-file.csv", rows, NODE_COLUMNS)


def test_profiled_names_of_fused_kernels_land_on_the_node_they_came_from():
    graph = synthetic_graph(1, ops_per_layer=2)
    shares = {
        "/model/layers.0/op_0/MatMul/MatMulScaleFusion/": 0.5,  # ONNX Runtime's name for a fused kernel
        "/model/layers.0/op_0/MatMul": 0.25,
        "BiasGelu_token_7": 0.25,  # made on load from several nodes: no node of the graph names it
    }
    placed, unplaced = onto_graph(shares, graph)
    assert placed == {"/model/layers.0/op_0/MatMul": 0.75} and unplaced == 0.25


def test_node_values_file_is_read_and_bad_values_are_refused(tmp_path):
    good = tmp_path / "values.json"
    good.write_text(json.dumps({"a": 1, "b": 2.5}))
    assert read_node_values(good) == {"a": 1.0, "b": 2.5}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": "fast"}))
    with pytest.raises(BadInput, match="'a' is not a finite number"):
        read_node_values(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(BadInput, match="one JSON object"):
        read_node_values(bad)


def test_diff_marks_and_rows_of_export_against_fusion(minilm_onnx):
    structure = graph_diff(onnx_graph(minilm_onnx["exported"]), onnx_graph(minilm_onnx["optimized"]))
    marks_a, marks_b = diff_marks(structure)
    assert marks_b["Attention_0"] == "changed"
    assert marks_a["/model/encoder/layer.0/attention/self/Softmax"] == "removed"
    assert marks_a["/model/encoder/layer.0/attention/self/query/MatMul"] == "changed"
    rows = diff_rows(structure, [{"name": "encoder.layer.0", "cosine": 1.0, "relative_error": 0.0}])
    assert rows[0] == {"kind": "layer", "name": "encoder.layer.0", "cosine": 1.0, "relative_error": 0.0}
    kinds = {r.get("mark") for r in rows if r["kind"] == "node"}
    assert kinds == {"removed", "changed"} | ({"added"} if structure["added"] else set())
    assert set(rows[-1]) <= set(DIFF_COLUMNS)


def test_graph_and_diff_verbs_write_their_tables(minilm_onnx, tmp_path, capsys):
    nodes_json = tmp_path / "nodes.json"
    assert main(["graph", str(minilm_onnx["optimized"]), "--no-profile", "--json-file", str(nodes_json)]) == 0
    rows = json.loads(nodes_json.read_text())
    assert {"Attention_0", "EmbedLayerNormalization_0"} <= {r["name"] for r in rows}
    assert all(r["time_share"] is None for r in rows)  # not profiled
    diff_csv = tmp_path / "diff.csv"
    args = ["diff", "builtin:minilm", str(minilm_onnx["exported"]), "--examples", "2"]
    assert main([*args, "--sequence-length", "16", "--csv", str(diff_csv)]) == 0
    capsys.readouterr()
    with diff_csv.open(encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    layers = {r["name"]: r for r in table if r["kind"] == "layer"}
    assert "encoder.layer.0.attention.self.query" in layers
    assert all(float(r["cosine"]) > 0.99 for r in layers.values())  # the export computes the same
