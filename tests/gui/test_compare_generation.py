"""The Compare tab on real variants of builtin:tinylm with generation metrics (the original and a 4-bit
quanto KV-cache variant, built once by the worker with a tiny generation: prompt 8, new tokens 4): the
generation columns of the table, the decode-speed and KV-cache bar charts, and the tokens/s against
generation quality scatter; a workspace without generation metrics hides those tabs."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QThreadPool

from studio.events import Done
from studio.gui.compare.view import CompareView
from studio.gui.document import StudioDocument
from studio.gui.widgets import plot_colors, work_pool
from studio.variants import Workspace
from studio.worker import WorkerClient

pytestmark = pytest.mark.gui

RECIPE = {
    "version": 1,
    "model": "builtin:tinylm",
    "data": {"evaluation_examples": 4, "calibration_examples": 4},
    "steps": [
        {
            "technique": "kv_cache.quantize",
            "params": {"method": "quanto", "bits": 4, "residual_length": 0, "group_size": 4},
        }
    ],
    "evaluate": {
        "batch_sizes": [1],
        "sequence_length": 16,
        "latency": False,
        "generation": {"prompt_tokens": 8, "new_tokens": 4, "batch_sizes": [1]},
    },
}


@pytest.fixture(scope="module")
def generating(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinylm-compare")
    events = list(WorkerClient(RECIPE, root).events())
    assert isinstance(events[-1], Done), events[-1]
    (variant,) = events[-1].result["variants"]
    return root, events[-1].result["baseline"]["id"], variant["id"]


def make_view(qtbot, root):
    view = CompareView(StudioDocument(workspace=Workspace(root)))
    qtbot.addWidget(view)
    view.resize(1280, 800)
    view.show()
    return view


@pytest.fixture
def view(qtbot, generating, settings):
    view = make_view(qtbot, generating[0])
    yield view
    view.shutdown()
    for pool in (work_pool(), QThreadPool.globalInstance()):
        assert pool.waitForDone(120000), "a background task never ended"


def by_id(view):
    return {r["id"]: r for r in view.rows}


def test_the_table_has_the_generation_columns(view, generating):
    titles = [" ".join(c.title.split()) for c in view.table_model.columns]
    for title in (
        "TTFT b1 p50 (ms)",
        "TPOT b1 p50 (ms)",
        "Decode b1 (tokens/s)",
        "KV cache (bytes)",
        "KV bits",
    ):
        assert title in titles, titles
    assert "Perplexity" in titles and "Generation match" in titles
    _root, baseline, variant = generating
    model = view.table_model
    row = {r["id"]: i for i, r in enumerate(model.rows)}
    bits = titles.index("KV bits")
    assert model.index(row[variant], bits).data() == "4"
    assert model.index(row[baseline], bits).data() == "—"
    match = titles.index("Generation match")
    assert model.index(row[baseline], match).data() == "1"  # the original's, measured in the variant's run


def test_the_generation_bar_charts_draw_each_variant(view, generating, qtbot):
    _root, baseline, variant = generating
    gen = view.generation
    tabs = {view.tabs.tabText(i): i for i in range(view.tabs.count())}
    for title in ("Decode speed", "KV cache", "Tokens/s vs quality"):
        assert view.tabs.isTabVisible(tabs[title])
    rows = by_id(view)
    drawn = [r["id"] for r in gen.rows]
    assert sorted(drawn) == sorted([baseline, variant])
    speeds = [rows[i]["metrics"]["generation"]["1"]["decode_tokens_per_s"] for i in drawn]
    assert list(gen.speed_bars.opts["height"]) == pytest.approx(speeds)
    assert gen.kv_unit == "kB"  # a cache of 12 positions of a small model: kilobytes, not 0.02 MB
    kv = [rows[i]["metrics"]["generation"]["kv_cache_bytes"] / 1e3 for i in drawn]
    assert list(gen.kv_bars.opts["height"]) == pytest.approx(kv)
    assert kv[drawn.index(variant)] < kv[drawn.index(baseline)]  # 4-bit codes hold less than float32
    ticks = [t for _x, t in gen.kv_plot.getPlotItem().getAxis("bottom")._tickLevels[0]]
    assert any(t.endswith("KV 4-bit") for t in ticks) and sum("KV" in t for t in ticks) == 1
    for plot, unit in ((gen.speed_plot, "(tokens/s)"), (gen.kv_plot, "(kB, 10³ bytes)")):
        assert unit in plot.getPlotItem().getAxis("left").labelText
    # the bars are on screen: the bar colour fills pixels of the decode-speed chart
    view.tabs.setCurrentIndex(tabs["Decode speed"])
    qtbot.waitExposed(gen.speed_plot)
    image = gen.speed_plot.grab().toImage()
    fill = plot_colors()["bars_fill"]
    filled = sum(
        1
        for x in range(0, image.width(), 4)
        for y in range(0, image.height(), 4)
        if image.pixelColor(x, y).rgb() == fill.rgb()
    )
    assert filled > 50


def test_tokens_per_s_against_generation_quality_has_a_front(view, generating):
    _root, baseline, variant = generating
    gen = view.generation
    assert gen.quality_key == "generation_match"
    xs, ys = gen.gen_scatter.getData()
    points = dict(zip(gen.gen_scatter.data["data"], zip(xs, ys, strict=True), strict=True))
    rows = by_id(view)
    assert points[baseline][1] == 1.0
    assert points[variant][1] == rows[variant]["metrics"]["quality"]["generation_match"]
    assert points[variant][0] == rows[variant]["metrics"]["generation"]["1"]["decode_tokens_per_s"]
    item = gen.gen_pareto_plot.getPlotItem()
    assert "(tokens/s)" in item.getAxis("bottom").labelText
    assert "generation match" in item.getAxis("left").labelText
    (front,) = gen.fronts.values()
    assert baseline in front  # the original has the best quality: never dominated
    legend = [label.text for _sample, label in gen.gen_legend.items]
    assert "Pareto front" in legend


def test_without_generation_metrics_the_generation_tabs_are_hidden(qtbot, tmp_path, settings):
    view = make_view(qtbot, tmp_path / "empty")
    tabs = {view.tabs.tabText(i): i for i in range(view.tabs.count())}
    assert not any(
        view.tabs.isTabVisible(tabs[t]) for t in ("Decode speed", "KV cache", "Tokens/s vs quality")
    )
    assert view.tabs.isTabVisible(tabs["Latency"])
    view.shutdown()


def test_the_ab_histogram_legend_sits_outside_the_data(view, generating, qtbot):
    """The A/B pane is narrow and the variants' names long: the legend goes under the plot, so it never
    covers the histograms (inside, it hid their peaks)."""
    _root, baseline, variant = generating
    view.examples_spin.setValue(0)
    view.set_ab(baseline, variant)
    view.tabs.setCurrentWidget(view.ab_panel)
    with qtbot.waitSignal(view.histogram_shown, timeout=180000):
        view.compare_ab()
    qtbot.waitUntil(lambda: view.hist_plot.isVisible(), timeout=10000)
    names = [label.text for _sample, label in view.hist_legend.items]
    assert names[0] == "A: original tinylm" and names[1].startswith("B: ")
    box = view.hist_plot.getPlotItem().getViewBox().sceneBoundingRect()
    legend = view.hist_legend.sceneBoundingRect()
    assert legend.width() > 0 and legend.height() > 0
    assert not legend.intersects(box) and legend.top() >= box.bottom()
    assert legend.right() <= view.hist_plot.width() + 1  # and it is not cut off at the side
