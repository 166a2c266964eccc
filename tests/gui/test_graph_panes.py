"""The Graph tab's diff across kinds and with more panes: MiniLM's ONNX export against its torch original
(the exporter's glue outlined as plumbing, nothing "added"; each canvas fitted to its own graph; the
canvases linked by matched node), then the fused graph as a third pane, linked through the reference."""

from __future__ import annotations

import math

import pytest

from studio.gui.document import StudioDocument
from studio.gui.graph_view import GraphView
from studio.variants import Workspace

pytestmark = pytest.mark.gui

QUERY = "/model/encoder/layer.3/attention/self/query/MatMul"
TORCH_QUERY = "encoder.layer.3.attention.self.query"


@pytest.fixture
def view(qtbot, tmp_path, settings, minilm_onnx):
    document = StudioDocument(workspace=Workspace(tmp_path / "workspace"))
    assert document.open_model(str(minilm_onnx["exported"]))
    view = GraphView(document)
    qtbot.addWidget(view)
    view.resize(1500, 760)
    with qtbot.waitSignal(view.graph_shown, timeout=120000):
        view.show()
    yield view
    view.shutdown()


def far_counterpart(view, torch_box: str) -> str:
    """A box of the shown ONNX graph whose torch counterpart is the farthest from `torch_box`."""
    boxes = view.other_scene.boxes
    anchor = boxes[torch_box].sceneBoundingRect().center()

    def distance(onnx_box: str) -> float:
        match = view.counterpart_box(1, 0, onnx_box)
        if match is None:
            return -1.0
        centre = boxes[match].sceneBoundingRect().center()
        return math.dist((centre.x(), centre.y()), (anchor.x(), anchor.y()))

    return max(view.scene.boxes, key=distance)


def test_export_against_torch_marks_plumbing_and_links_the_canvases_by_node(view, qtbot, minilm_onnx):
    with qtbot.waitSignal(view.diff_shown, timeout=120000):
        view.set_diff("source:builtin:minilm")
    s = view.structure
    assert view.other.kind == "torch" and s["added"] == [] and s["plumbing_side"] == "B"
    assert len(s["plumbing"]) > 100  # Shape, Gather, Unsqueeze, Constant... of the export
    view.expand("encoder.layer.3")
    plumbing = next(n for n in s["plumbing"] if n in view.scene.boxes)
    assert view.scene.boxes[plumbing].mark == "plumbing"
    assert view.scene.boxes[QUERY].mark == "changed"  # the Linear, exported as MatMul + Add
    assert view.other_scene.boxes[TORCH_QUERY].mark == "changed"
    legend = view.other_canvas.legend.legend
    assert legend.categories[1][0].startswith("removed from A") and "plumbing" in legend.categories[-1][0]

    # each canvas is fitted to its own graph: the torch layer is far smaller than its ONNX lowering
    view.fit()
    assert view.canvas.zoom() == pytest.approx(view.canvas.fit_factor())
    assert view.other_canvas.zoom() == pytest.approx(view.other_canvas.fit_factor())
    ratio = view.other_canvas.fit_factor() / view.canvas.fit_factor()
    assert ratio > 1.25
    view.canvas.set_zoom(1.0)
    assert view.other_canvas.zoom() == pytest.approx(min(8.0, ratio))  # zoom relative to each fit
    # centring the ONNX query MatMul centres the torch query Linear
    # from a node whose counterpart is far from the query Linear, to the query MatMul: the torch pane
    # brings the query Linear into view (centred as far as its scroll range allows)
    far = far_counterpart(view, TORCH_QUERY)
    view.show_box(far)
    view.canvas.centre_on_box(far)
    assert not view.other_canvas.shows(TORCH_QUERY)
    view.show_box(QUERY)  # a click highlights the counterpart in the other pane
    assert view.other_scene.boxes[TORCH_QUERY].highlighted
    view.canvas.centre_on_box(QUERY)
    assert view.canvas.shows(QUERY) and view.other_canvas.shows(TORCH_QUERY)


def test_a_third_pane_is_diffed_against_the_reference_and_follows_by_node(view, qtbot, minilm_onnx):
    with qtbot.waitSignal(view.diff_shown, timeout=120000):
        view.set_diff("source:builtin:minilm")
    optimized = f"source:{minilm_onnx['optimized']}"
    view._add_choice(optimized)
    index = view.pane_combo.findData(optimized)
    assert index > 0 and view.pane_combo.itemText(0) == "add a pane…"
    with qtbot.waitSignal(view.pane_added, timeout=120000):
        view.pane_combo.activated.emit(index)  # what choosing it in the menu does
    assert view.pane_combo.currentIndex() == 0 and len(view.extra) == 1
    pane = view.extra[0]
    assert pane.canvas.isVisible() and pane.canvas.width() > 100
    assert [g.kind for g, _ in view.panes()] == ["torch", "onnx", "onnx"]  # the reference first
    assert pane.structure["plumbing_side"] == "B" and pane.structure["added"] == []
    assert pane.canvas.legend.isVisible() and "plumbing" in pane.canvas.legend.legend.categories[-1][0]
    view.expand("encoder.layer.3")
    # the export's query MatMul -> the torch Linear -> the fused graph's Attention of that layer
    fused = view._links.of(1, 2, QUERY)
    assert fused and pane.graph.node(fused[0]).op == "Attention"
    view.show_box(QUERY)
    view.canvas.centre_on_box(QUERY)
    assert pane.canvas.shows(pane.layout.item_of[fused[0]]) and view.other_canvas.shows(TORCH_QUERY)
    svg = view.export_image(view.document.workspace.root / "panes.svg").read_text(encoding="utf-8")
    assert svg.count(">encoder.layer.5<") >= 2  # the panes side by side (the torch pane's layer 5 too)
    view.clear_panes()
    assert view.extra == [] and [g.kind for g, _ in view.panes()] == ["torch", "onnx"]
    for _ in range(3):
        view.add_pane(optimized)
        qtbot.waitUntil(lambda: not view.busy_now(), timeout=120000)
    assert len(view.extra) == 2  # four graphs at most
