"""The structural diff across kinds and of several graphs: MiniLM's torch original against its ONNX export
(matched through the weight-name map and the module paths in ONNX node names; the exporter's glue is
"plumbing"), and the N-way diff of the original, the export and the fused graph with counterparts found
through the reference, and the `diff` verb with three models."""

from __future__ import annotations

import json

import pytest

from studio.checkpoints import open_checkpoint
from studio.cli import main
from studio.inspection.graph import onnx_graph, torch_graph
from studio.inspection.graph_diff import counterpart_in, counterparts, graph_diff, graph_diff_many
from studio.inspection.graph_export import diff_marks, diff_rows

QUERY = "encoder.layer.0.attention.self.query"
QUERY_MATMUL = "/model/encoder/layer.0/attention/self/query/MatMul"


@pytest.fixture(scope="module")
def minilm_torch():
    return torch_graph(open_checkpoint("builtin:minilm"))


def test_torch_against_its_onnx_export_matches_the_linear_layers_and_calls_the_rest_plumbing(
    minilm_torch, minilm_onnx
):
    exported = onnx_graph(minilm_onnx["exported"])
    diff = graph_diff(minilm_torch, exported)
    a_to_b, b_to_a = counterparts(diff)
    linears = [n.name for n in minilm_torch.nodes if n.op == "Linear"]
    matched = [n for n in linears if a_to_b.get(n)]
    # all but the pooler, which the sentence encoder's export leaves out
    assert minilm_torch.source == "torch.export"
    assert len(linears) == 37 and len(matched) >= 36 and "pooler.dense" in diff["removed"]
    assert set(a_to_b[QUERY]) == {QUERY_MATMUL, "/model/encoder/layer.0/attention/self/query/Add"}
    assert b_to_a[QUERY_MATMUL] == [QUERY]
    # the GELU module is the Erf and its arithmetic, matched by the module path in their names
    assert (
        "/model/encoder/layer.0/intermediate/intermediate_act_fn/Erf"
        in a_to_b["encoder.layer.0.intermediate.intermediate_act_fn"]
    )
    # the functional ops between modules match the export's ops of the same module and kind
    assert a_to_b["encoder.layer.0.attention.output/add"] == ["/model/encoder/layer.0/attention/output/Add"]
    sdpa = "encoder.layer.0.attention.self/scaled_dot_product_attention"
    assert a_to_b[sdpa] == ["/model/encoder/layer.0/attention/self/Softmax"]
    assert a_to_b["/to"] == ["/model/Cast"]  # the mask arithmetic of the model's root module
    assert "forward/div" in diff["removed"]  # the family's pooling runs after the exported graph
    # nothing is "added": the export's shape arithmetic has no torch module, it is plumbing
    assert diff["added"] == [] and diff["plumbing_side"] == "B"
    plumbing_ops = {exported.node(n).op for n in diff["plumbing"]}
    assert {"Shape", "Unsqueeze", "Constant"} <= plumbing_ops
    assert not {"LayerNormalization", "Erf"} & plumbing_ops
    assert not any(exported.node(n).weights and exported.node(n).op == "MatMul" for n in diff["plumbing"])
    changes = {c["b"]: c["change"] for c in diff["changed"]}
    assert changes[QUERY_MATMUL] == "exported"  # the same Linear written as ONNX ops, not "pruned"
    marks_a, marks_b = diff_marks(diff)
    assert {marks_b[n] for n in diff["plumbing"]} == {"plumbing"} and marks_a["pooler.dense"] == "removed"
    assert "plumbing" in {r.get("mark") for r in diff_rows(diff)}


def test_onnx_against_torch_puts_the_plumbing_on_the_reference_side(minilm_torch, minilm_onnx):
    diff = graph_diff(onnx_graph(minilm_onnx["exported"]), minilm_torch)
    assert diff["plumbing_side"] == "A" and diff["removed"] == []
    assert set(diff["matches"][QUERY]) >= {QUERY_MATMUL}
    assert {c["change"] for c in diff["changed"] if c["b"] == QUERY} == {"exported"}


def test_n_way_diff_links_every_graph_through_the_reference(minilm_torch, minilm_onnx):
    graphs = [
        onnx_graph(minilm_onnx["exported"]),
        onnx_graph(minilm_onnx["optimized"]),
        minilm_torch,
    ]
    many = graph_diff_many(graphs)
    assert many["reference"] == 0 and len(many["diffs"]) == 2
    assert many["diffs"][0] == graph_diff(graphs[0], graphs[1])
    diffs = many["diffs"]
    # the exported query MatMul is fused into the optimized graph's Attention, and is the torch Linear
    assert counterpart_in(diffs, 0, 1, QUERY_MATMUL) == ["Attention_0"]
    assert counterpart_in(diffs, 0, 2, QUERY_MATMUL) == [QUERY]
    # the fused Attention against torch: through the reference, the layer's query, key and value Linears
    through = counterpart_in(diffs, 1, 2, "Attention_0")
    assert {QUERY, QUERY.replace("query", "key"), QUERY.replace("query", "value")} <= set(through)
    assert counterpart_in(diffs, 2, 0, QUERY) == diffs[1]["matches"][QUERY]
    assert counterpart_in(diffs, 1, 1, "Attention_0") == ["Attention_0"]
    with pytest.raises(ValueError, match="two or more"):
        graph_diff_many(graphs[:1])


def test_diff_verb_with_three_models_diffs_each_against_the_first(minilm_onnx, tmp_path, capsys):
    import shutil

    exported = str(minilm_onnx["exported"])
    copy = tmp_path / "copy" / "model.onnx"  # the same graph under another name: all unchanged against A
    shutil.copytree(minilm_onnx["exported"].parent, copy.parent)
    small = ["--examples", "2", "--sequence-length", "16", "--json"]
    assert main(["diff", exported, "builtin:minilm", *small]) == 0
    pair = json.loads(capsys.readouterr().out)
    assert pair["a"] == exported and pair["b"] == "builtin:minilm" and "structure" in pair  # as it was
    table = tmp_path / "rows.csv"
    assert main(["diff", exported, "builtin:minilm", str(copy), *small, "--csv", str(table)]) == 0
    many = json.loads(capsys.readouterr().out)
    assert many["reference"] == exported and [d["b"] for d in many["diffs"]] == ["builtin:minilm", str(copy)]
    assert many["diffs"][0]["structure"] == pair["structure"] and many["diffs"][0]["layers"] == pair["layers"]
    assert many["diffs"][0]["structure"]["plumbing_side"] == "A"
    same = many["diffs"][1]  # against A, the ONNX export, not against B, the torch model
    assert same["a"] == exported and same["structure"]["plumbing_side"] is None
    assert same["structure"]["added"] == same["structure"]["removed"] == same["structure"]["changed"] == []
    assert same["structure"]["unchanged"] == len(onnx_graph(minilm_onnx["exported"]).nodes)
    assert all(x["cosine"] > 0.9999 for x in same["layers"])
    header, *rows = table.read_text().splitlines()
    assert header.startswith("b,kind,name") and {r.split(",")[0] for r in rows} == {
        "builtin:minilm",
        str(copy),
    }
    assert (
        main(["diff", exported, "builtin:minilm", "no-such-variant", "--workspace", str(tmp_path / "w")]) == 2
    )
    assert "no-such-variant" in capsys.readouterr().err
