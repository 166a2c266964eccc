"""The Graph tab on MiniLM's exported ONNX graph (made by the studio's own export.onnx): collapsed layers,
overlays through the overlay menu with their legend, search, expanding a block by double-clicking it,
a node's details and weight histogram, the diff against the graph after onnx.optimize, and the exports."""

from __future__ import annotations

import csv
import json

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage

from studio.gui.document import StudioDocument
from studio.gui.graph_scene import MARK_COLORS, PRECISION_COLORS
from studio.gui.graph_view import GraphView
from studio.inspection.graph_layout import box_values
from studio.variants import Workspace

pytestmark = pytest.mark.gui

LAYERS = [f"encoder.layer.{i}" for i in range(6)]
QUERY = "/model/encoder/layer.3/attention/self/query/MatMul"


@pytest.fixture
def document(tmp_path, settings, minilm_onnx):
    document = StudioDocument(workspace=Workspace(tmp_path / "workspace"))
    assert document.open_model(str(minilm_onnx["exported"]))
    return document


@pytest.fixture
def view(qtbot, document):
    view = GraphView(document)
    qtbot.addWidget(view)
    view.resize(1280, 760)
    with qtbot.waitSignal(view.graph_shown, timeout=120000):
        view.show()  # the graph is read when the tab is first shown
    yield view
    view.shutdown()


def double_click(qtbot, view: GraphView, box_id: str, canvas=None) -> None:
    canvas = canvas or view.canvas
    item = canvas.graph_scene().boxes[box_id]
    canvas.centre_on_box(box_id)
    point = canvas.mapFromScene(item.sceneBoundingRect().center())
    with qtbot.waitSignal(view.laid_out, timeout=10000):
        qtbot.mouseDClick(canvas.viewport(), Qt.MouseButton.LeftButton, pos=point)


def test_graph_opens_collapsed_and_a_double_click_expands_and_collapses_a_block(view, qtbot):
    assert set(view.scene.boxes) == {*LAYERS, "embeddings", "model"}
    assert "516 nodes" in view.summary.text() or "nodes in 8 blocks" in view.summary.text()
    double_click(qtbot, view, "encoder.layer.1")
    assert "encoder.layer.1" not in view.scene.boxes and "encoder.layer.1" in view.expanded
    members = view.graph.groups()["encoder.layer.1"]
    assert set(members) <= set(view.scene.boxes)
    double_click(qtbot, view, members[5])  # a node of an expanded block folds it back
    assert "encoder.layer.1" in view.scene.boxes and not view.expanded


def test_overlays_colour_the_boxes_and_explain_the_colours(view, qtbot, tmp_path):
    view.overlay_combo.setCurrentText("precision")
    legend = view.canvas.legend
    assert legend.isVisible() and legend.legend.title == "precision"
    assert [name for name, _ in legend.legend.categories] == ["float32"]
    assert view.scene.boxes["encoder.layer.0"].fill == PRECISION_COLORS["float32"]

    with qtbot.waitSignal(view.overlay_shown, timeout=120000):
        view.overlay_combo.setCurrentText("time share")
        assert view.busy.isVisible()  # the profile runs off the GUI thread
    assert not view.busy.isVisible()
    assert legend.legend.title == "share of run time (%)" and legend.legend.is_ramp
    # every share is on a node of the graph, or said to be in a kernel ONNX Runtime fused on load
    assert sum(view.node_values.values()) + view.unplaced_share == pytest.approx(1.0, abs=1e-6)
    assert set(view.node_values) <= {n.name for n in view.graph.nodes}
    if view.unplaced_share:
        assert "fused on load" in view.summary.text()
    shares = {b: view.scene.boxes[b].fill for b in LAYERS}
    assert all(c != PRECISION_COLORS["float32"] for c in shares.values())
    per_box = box_values(view.layout_, view.node_values, "sum")
    assert legend.legend.high == pytest.approx(100 * max(per_box.values()))  # in percent
    assert sum(per_box.values()) == pytest.approx(sum(view.node_values.values()))

    values = tmp_path / "values.json"
    values.write_text(json.dumps({QUERY: 9.0, "/model/encoder/layer.0/attention/self/query/MatMul": 1.0}))
    view.load_values_file(values)
    assert view.overlay_combo.currentText() == "from JSON file"
    assert legend.legend.title == "values.json (max per box)" and legend.legend.high == 9.0
    assert view.scene.boxes["encoder.layer.3"].fill == legend.legend.color(9.0)
    assert view.scene.boxes["encoder.layer.0"].fill == legend.legend.color(1.0)
    assert view.scene.boxes["encoder.layer.0"].fill != view.scene.boxes["encoder.layer.3"].fill
    view.overlay_combo.setCurrentText("none")
    assert not legend.isVisible()


def test_search_expands_centres_and_highlights_the_node_and_shows_its_details(view, qtbot):
    qtbot.keyClicks(view.search_edit, "layer.3/attention/self/query/matmul")
    with qtbot.waitSignal(view.histogram_shown, timeout=60000) as shown:
        qtbot.keyClick(view.search_edit, Qt.Key.Key_Return)
    assert shown.args == ["encoder.layer.3.attention.self.query.weight"]
    item = view.scene.boxes[QUERY]
    assert item.highlighted and view.selected == QUERY and "encoder.layer.3" in view.expanded
    centre = view.canvas.mapToScene(view.canvas.viewport().rect().center())
    assert item.sceneBoundingRect().adjusted(-5, -5, 5, 5).contains(centre)
    text = view.details.toPlainText()
    assert (
        "op MatMul" in text and "[384, 384]" in text and "encoder.layer.3.attention.self.query.weight" in text
    )
    assert view.hist.isVisible()
    assert view.search("no such node anywhere") is None and "no node" in view.summary.text()


def test_diff_against_the_fused_graph_marks_removed_and_changed_nodes(view, qtbot, minilm_onnx, tmp_path):
    # B (shown): after onnx.optimize; A (the diff, on the left): the exported graph
    with qtbot.waitSignal(view.graph_shown, timeout=120000):
        view.set_variant(f"source:{minilm_onnx['optimized']}")
    with qtbot.waitSignal(view.diff_shown, timeout=120000):
        view.set_diff(f"source:{minilm_onnx['exported']}")
    assert view.other_canvas.isVisible() and view.other_canvas.width() > 100
    # collapsed, every layer changed on both sides
    assert view.scene.boxes["encoder.layer.0"].mark == "changed"
    assert view.other_scene.boxes["encoder.layer.0"].mark == "changed"
    view.expand("encoder.layer.0")
    assert view.scene.boxes["Attention_0"].mark == "changed"
    assert view.other_scene.boxes["/model/encoder/layer.0/attention/self/Softmax"].mark == "removed"
    assert view.other_scene.boxes["/model/encoder/layer.0/attention/self/query/MatMul"].mark == "changed"
    assert (
        view.other_scene.boxes["/model/encoder/layer.0/attention/self/Softmax"].pen().color()
        == MARK_COLORS["removed"]
    )
    diff_legend = view.other_canvas.legend
    assert diff_legend.isVisible() and diff_legend.legend.categories[1][0].startswith("removed from A")
    # the two canvases move together
    view.canvas.set_zoom(0.5)
    assert view.other_canvas.zoom() == pytest.approx(0.5)
    view.other_canvas.verticalScrollBar().setValue(view.other_canvas.verticalScrollBar().maximum())
    assert view.canvas.verticalScrollBar().value() == view.canvas.verticalScrollBar().maximum()

    table = view.export_table(tmp_path / "diff.csv")
    with table.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {"removed", "changed"} <= {r["mark"] for r in rows}
    assert any(r["name"] == "Attention_0" and r["change"] == "fused" for r in rows)

    view.set_overlay("precision")
    svg = view.export_image(tmp_path / "diff.svg").read_text(encoding="utf-8")
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert ">precision<" in svg and "removed from A" in svg  # both legends: the overlay's and the diff's
    png = view.export_image(tmp_path / "diff.png")
    image = QImage(str(png))
    assert not image.isNull() and image.width() > image.height() / 4
    view.set_diff(None)
    assert not view.other_canvas.isVisible() and view.structure is None
    assert view.scene.boxes["Attention_0"].mark is None


def test_export_png_and_svg_of_the_view_with_its_legend(view, tmp_path):
    view.set_overlay("precision")
    png = view.export_image(tmp_path / "graph.png")
    image = QImage(str(png))
    assert not image.isNull() and image.height() > image.width()  # a column of layers
    svg = view.export_image(tmp_path / "graph.svg").read_text(encoding="utf-8")
    assert ">precision<" in svg and ">float32<" in svg and ">encoder.layer.5<" in svg  # legend and boxes
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    nodes = view.export_table(tmp_path / "nodes.json")
    assert {r["name"] for r in json.loads(nodes.read_text())} == {n.name for n in view.graph.nodes}


def test_error_overlay_compares_each_layer_with_the_diff_variant(view, qtbot):
    # A: the torch original the graph was exported from; the overlay's error is B's against it
    with qtbot.waitSignal(view.diff_shown, timeout=120000):
        view.set_diff("source:builtin:minilm")
    assert view.other.kind == "torch" and view.graph.kind == "onnx"
    with qtbot.waitSignal(view.overlay_shown, timeout=120000):
        view.set_overlay("error")
    legend = view.canvas.legend.legend
    assert legend.title == "relative error vs reference (max per box)"
    assert QUERY in view.node_values
    assert all(0 <= v < 1e-3 for v in view.node_values.values())  # the export computes what torch did
    assert legend.high == max(box_values(view.layout_, view.node_values, "max").values())
    rows, _ = view.table_rows()
    assert {r["mark"] for r in rows} >= {"changed"}  # with a diff shown, its table is what is exported
