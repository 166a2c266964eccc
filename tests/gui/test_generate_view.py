"""The Generate tab on builtin:tinylm with a real worker process: both variants' text streams in token by
token, the live numbers and the plots fill from the worker's events, and Stop ends the worker."""

from __future__ import annotations

import shutil

import pytest
from PySide6.QtCore import Qt

from studio.events import Token
from studio.generate_job import Side
from studio.gui.document import StudioDocument
from studio.gui.generate_view import GenerateView
from studio.resources import resources_dir
from studio.variants import Workspace

RUN_TIMEOUT = 240_000  # ms: a worker imports torch and opens the model before its first token


@pytest.fixture
def view(qtbot, tmp_path, settings):
    """The view on builtin:tinylm, in a workspace holding one torch variant of it (its folder, copied)."""
    workspace = Workspace(tmp_path / "workspace")
    staged = tmp_path / "workspace" / "staged"
    shutil.copytree(resources_dir() / "models" / "tinylm", staged)
    row = workspace.commit_variant(
        staged, kind="torch", parent=None, model="builtin:tinylm", recipe={"steps": []}, metrics={}
    )
    document = StudioDocument(workspace=workspace)
    widget = GenerateView(document)
    qtbot.addWidget(widget)
    widget.resize(1280, 760)
    widget.show()
    assert not widget.generate_button.isEnabled()  # no model open yet
    assert document.open_model("builtin:tinylm")
    widget.variant_id = row["id"]
    yield widget
    widget.shutdown()


def collect_tokens(widget: GenerateView) -> list[Token]:
    tokens: list[Token] = []
    assert widget.worker is not None
    widget.worker.event_received.connect(lambda e: tokens.append(e) if isinstance(e, Token) else None)
    return tokens


def test_a_and_b_stream_from_the_worker_with_live_numbers_and_plots(view, qtbot):
    assert [view.combos["A"].itemText(i) for i in range(view.combos["A"].count())] == [
        "original tinylm",
        f"{view.variant_id[-6:]} torch",
    ]
    assert view.combos["B"].currentData() == Side("", row=view.variant_id).key  # B: the newest variant
    assert view.generate_button.isEnabled() and not view.stop_button.isEnabled()
    view.tokens_spin.setValue(4)
    view.profile_lengths = [8, 16]
    with qtbot.waitSignal(view.started, timeout=5000):
        assert view.generate()
    tokens = collect_tokens(view)
    assert view.stop_button.isEnabled() and not view.generate_button.isEnabled()
    with qtbot.waitSignal(view.finished, timeout=RUN_TIMEOUT) as done:
        pass
    result = done.args[0]
    assert [(t.variant, t.tokens) for t in tokens] == [(side, n) for n in range(1, 5) for side in "AB"]
    for side in "AB":
        final = result["variants"][side]
        pane = view.panes[side]
        assert final["tokens"] == 4 and final["text"].strip()
        assert pane.text_view.toPlainText() == final["text"]
        assert pane.ttft_label.text() == f"TTFT {final['ttft_ms']:.1f} ms"
        assert pane.speed_label.text() == f"decode {final['decode_tokens_per_s']:.0f} tokens/s"
        assert pane.count_label.text() == "4 tokens"
        xs, ys = view.points("kv_cache_bytes", side)
        assert xs == [8.0, 16.0] and ys[1] == 2 * ys[0] > 0  # the cache grows with the context
        xs, ys = view.points("decode_tokens_per_s", side)
        assert xs == [8.0, 16.0] and all(y > 0 for y in ys)
    assert view.panes["A"].title() == "A · original tinylm"
    legend = [label.text for _sample, label in view.speed_plot.getPlotItem().legend.items]
    assert legend == ["A · original tinylm", f"B · {view.variant_id[-6:]} torch"]
    assert view.kv_plot.getPlotItem().getAxis("left").labelUnits == "B"
    assert view.speed_plot.getPlotItem().getAxis("bottom").labelUnits == "tokens"
    assert view.status_label.text() == "Done." and view.generate_button.isEnabled()


def test_stop_ends_the_worker_and_keeps_the_text_so_far(view, qtbot):
    view.tokens_spin.setValue(400)
    assert view.generate()
    tokens = collect_tokens(view)
    qtbot.waitUntil(lambda: len(tokens) >= 2, timeout=RUN_TIMEOUT)
    with qtbot.waitSignal(view.stopped, timeout=10_000):
        qtbot.mouseClick(view.stop_button, Qt.MouseButton.LeftButton)
    end = view.last_end
    assert end is not None and end.cancelled and end.code != 0 and end.outcome is None
    assert view.worker is None and view.result is None
    shown = view.panes["A"].text_view.toPlainText()
    last_a = [t for t in tokens if t.variant == "A"][-1]
    assert shown == last_a.text and last_a.tokens < 400
    assert view.status_label.text() == "Stopped." and view.generate_button.isEnabled()


def test_an_encoder_is_not_offered(view, qtbot):
    assert view.document.open_model("builtin:minilm")
    assert view.combos["A"].count() == 0 and not view.generate_button.isEnabled()
    assert "does not generate text" in view.notice.text()
