"""Screenshots of every main view, rendered offscreen at 1280x800 on the builtin MiniLM (the Search tab
after a small real search; the Graph tab twice: time overlay, and the diff of the ONNX variant against the
original), and the Generate tab on the builtin TinyLM; with the demo, LLM quantization on TinyLM too: a GPTQ
INT4 variant's per-layer error in the Model tab, and KV-cache bits vs quality vs memory in the Compare tab
(`model-studio screenshots DIR`, and the README's pictures).

The window is put in a state a user would reach in a minute: a real layer selected so its histogram
shows, head importance computed and the least important heads switched off, so every tab shows real
content rather than an empty state. Settings and the workspace are temporary unless a workspace is given.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SIZE = (1280, 800)
TENSOR = "encoder.layer.0.attention.self.query.weight"
HEADS_METHOD = "gradient"
HEADS_EXAMPLES = 16
HEADS_SEQUENCE_LENGTH = 32
HEADS_OFF = 12
# The demo runs: small evaluation settings so the screenshots take a minute or two, not ten.
DEMO_SETTINGS = {
    "data": {"calibration_examples": 32, "evaluation_examples": 16},
    "evaluate": {"batch_sizes": [1, 8], "sequence_length": 64},
}
DEMO_PIPELINES = (
    [{"technique": "precision.half", "params": {"dtype": "bfloat16"}}],
    [
        {"technique": "export.onnx"},
        {"technique": "onnx.optimize"},
        {"technique": "onnx.quantize_dynamic", "params": {"per_channel": True}},
    ],
)


# The Generate tab: builtin:tinylm's original (A) against a bfloat16 variant of it (B, made by a small
# pipeline in the demo; the original again without the demo), on a prompt of the kind it was trained on.
GENERATE_MODEL = "builtin:tinylm"
GENERATE_PROMPT = "The function returns"
GENERATE_TOKENS = 48
GENERATE_VARIANT = {
    "model": GENERATE_MODEL,
    "steps": [{"technique": "precision.half", "params": {"dtype": "bfloat16"}}],
    "data": {"calibration_examples": 8, "evaluation_examples": 8},
    # generation metrics too, so the Compare tab's generation plots have the original and this variant
    "evaluate": {
        "batch_sizes": [1],
        "sequence_length": 32,
        "generation": {"prompt_tokens": 16, "new_tokens": 8, "batch_sizes": [1]},
    },
}
GENERATE_TAB = "Generate"
COMPARE_TAB = "Compare"

# The Search tab: a small real search (four trials of MiniLM's ONNX INT8 pipeline with a small evaluation,
# timed at batch 1), so the scatter shows latency against size, a front, and the trials table.
SEARCH_DEMO = {
    "model": "builtin:minilm",
    "data": {"calibration_examples": 16, "evaluation_examples": 16},
    "steps": [
        {"technique": "export.onnx"},
        {"technique": "onnx.optimize"},
        {"technique": "onnx.quantize_dynamic"},
    ],
    "evaluate": {"batch_sizes": [1], "sequence_length": 64},
    "search": {
        "objectives": ["latency_ms.b1.p50", "size_mb"],
        "constraints": {"quality.fidelity_cosine": ">= 0.99"},
        "trials": 4,
        "seed": 0,
        "space": {2: {"optional": True}, 3: {"per_channel": [True, False], "reduce_range": [True, False]}},
    },
}

# LLM quantization (with the demo only): a GPTQ INT4 variant of TinyLM, its per-layer quantization error in
# the Model tab with one layer's float vs dequantized histograms (model-quant-error.png), and two KV-cache
# variants (TurboQuant 4-bit, quanto 2-bit) for the Compare tab's KV bits vs quality plot, which
# grab_generation_plots takes with the other generation plots.
LLM_QUANT_SETTINGS = {
    "model": GENERATE_MODEL,
    "data": {"calibration_examples": 32, "evaluation_examples": 8},
    "evaluate": GENERATE_VARIANT["evaluate"],
}
LLM_QUANT_PIPELINES = (
    [{"technique": "quantize.gptq", "params": {"bits": 4, "group_size": 32}}],
    [{"technique": "kv_cache.quantize", "params": {"method": "turboquant", "bits": 4}}],
    # the demo's context is 24 tokens: groups of 8 and no float window, so the 2-bit codes hold all of it
    [
        {
            "technique": "kv_cache.quantize",
            "params": {"method": "quanto", "bits": 2, "residual_length": 0, "group_size": 8},
        }
    ],
)
QUANT_LAYER = "model.layers.1.mlp.down_proj"
QUANT_ERROR_FILE = "model-quant-error.png"

# The Graph tab (with the demo only, the variants being what it shows): the ONNX INT8 variant coloured by its share of run
# time, its first layer expanded and its slowest node selected; with the demo, also its diff against the
# original torch model coloured by precision (graph-diff.png).
GRAPH_TAB = "Graph"
GRAPH_EXPANDED = "encoder.layer.0"


def _wait(condition: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
    from PySide6.QtCore import QEventLoop, QTimer

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"screenshots: gave up waiting for {what} after {timeout:.0f} s")
        loop = QEventLoop()
        QTimer.singleShot(20, loop.quit)
        loop.exec()


def _settle(ms: int = 150) -> None:
    from PySide6.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def tab_file_name(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") + ".png"


def run_pipeline(window: object, document: object, recipe_data: dict) -> dict:
    """Run one pipeline through the Run panel (a real worker process); its result."""
    from studio.pipeline import Recipe

    panel = window.run_panel  # type: ignore[attr-defined]
    document.pipeline.load(Recipe.model_validate(recipe_data))  # type: ignore[attr-defined]
    outcome: dict[str, object] = {}
    panel.finished.connect(lambda result, o=outcome: o.setdefault("result", result))
    panel.failed.connect(lambda message, o=outcome: o.setdefault("error", message))
    if not panel.run():
        raise RuntimeError("screenshots: the demo pipeline did not start")
    _wait(lambda o=outcome: bool(o), "the demo pipeline", timeout=900)
    if "error" in outcome:
        raise RuntimeError(f"screenshots: the demo pipeline failed: {outcome['error']}")
    return outcome["result"]  # type: ignore[return-value]


def run_demo(window: object, document: object) -> None:
    """Run the demo pipelines through the Run panel (real worker processes), leave the last one on screen,
    and put an A/B comparison of the original and the last variant (the ONNX INT8 graph: its per-layer weight
    overlay shows what quantization did to each layer) in the Compare tab."""
    compare = window.compare_view  # type: ignore[attr-defined]
    results = [
        run_pipeline(window, document, {"model": "builtin:minilm", "steps": steps, **DEMO_SETTINGS})
        for steps in DEMO_PIPELINES
    ]
    last = results[-1]
    compare.refresh()
    compare.set_ab(last["baseline"]["id"], last["variants"][0]["id"])  # type: ignore[index]
    finished: list[object] = []
    compare.compare_finished.connect(lambda *ids: finished.append(ids))
    compare.compare_failed.connect(finished.append)
    compare.compare_ab()
    _wait(lambda: bool(finished), "the A/B comparison", timeout=600)


def run_generation(window: object, document: object, *, demo: bool) -> None:
    """Open builtin:tinylm (after the other tabs are grabbed: they show MiniLM) and let the Generate tab's
    worker stream A and B and measure them at each context length. With `demo`, B is a bfloat16 variant
    (its KV cache holds half the bytes), made by a small pipeline first."""
    from studio.generate_job import Side

    window.open_source(GENERATE_MODEL)  # type: ignore[attr-defined]
    _wait(lambda: not window.opening, f"{GENERATE_MODEL} to open")  # type: ignore[attr-defined]
    if document.model is None:  # type: ignore[attr-defined]
        raise RuntimeError(f"screenshots: {GENERATE_MODEL} did not open: {window.last_error}")  # type: ignore[attr-defined]
    view = window.generate_view  # type: ignore[attr-defined]
    if demo:
        result = run_pipeline(window, document, GENERATE_VARIANT)
        view.set_variant("B", Side("B", row=result["variants"][0]["id"]).key)
    view.prompt_edit.setPlainText(GENERATE_PROMPT)
    view.tokens_spin.setValue(GENERATE_TOKENS)
    outcome: list[object] = []
    view.finished.connect(outcome.append)
    view.failed.connect(outcome.append)
    if not view.generate():
        raise RuntimeError("screenshots: the Generate tab did not start")
    _wait(lambda: bool(outcome), "the Generate tab's worker", timeout=600)
    if isinstance(outcome[0], str):
        raise RuntimeError(f"screenshots: generation failed: {outcome[0]}")


def run_search_demo(window: object, folder: Path) -> None:
    """Run the demo search from the Search tab (the search process, as a person would) and select the
    first trial on its front, so its point is ringed and its row selected."""
    import yaml

    view = window.search_view  # type: ignore[attr-defined]
    path = folder / "search-demo.yaml"
    path.write_text(yaml.safe_dump(SEARCH_DEMO), encoding="utf-8")
    if not view.set_recipe(path) or not view.start():
        raise RuntimeError(f"screenshots: the demo search did not start: {view.status_label.text()}")
    _wait(lambda: not view.running, "the demo search", timeout=1800)
    if view.outcome == "failed":
        raise RuntimeError(f"screenshots: the demo search failed: {view.status_label.text()}")
    if view.progress is not None and view.progress.pareto:
        view.blockSignals(True)  # the Compare tab keeps the A/B pair the demo put there
        view.select_trial(view.progress.pareto[0])
        view.blockSignals(False)


def show_quant_error(window: object, document: object) -> None:
    """Run the LLM quantization demo pipelines, open the GPTQ variant and select QUANT_LAYER, so the Model
    tab shows the error column and the layer's float vs dequantized histograms."""
    results = [
        run_pipeline(window, document, {**LLM_QUANT_SETTINGS, "steps": steps})
        for steps in LLM_QUANT_PIPELINES
    ]
    gptq = results[0]["variants"][0]["id"]  # type: ignore[index]
    view = window.model_view  # type: ignore[attr-defined]
    window.tabs.setCurrentWidget(view)  # type: ignore[attr-defined]
    shown: list[object] = []
    view.quant.errors_shown.connect(shown.append)
    window.open_source(str(document.workspace.variants_dir / gptq))  # type: ignore[attr-defined]
    _wait(lambda: bool(shown) or (not window.opening and document.model is None), "the quantization errors")  # type: ignore[attr-defined]
    if not shown:
        raise RuntimeError(f"screenshots: the GPTQ variant did not open: {window.last_error}")  # type: ignore[attr-defined]
    view.tree.expandToDepth(2)
    if not view.select_path(QUANT_LAYER):
        raise RuntimeError(f"screenshots: no {QUANT_LAYER} in the GPTQ variant")
    _wait(
        lambda: view.quant.current is not None and view.quant.current.layer.name == QUANT_LAYER, QUANT_LAYER
    )


def grab_generation_plots(window: object, grab: Callable[[str], None]) -> None:
    """The Compare tab once per generation plot (`grab("compare-<plot>.png")`), on TinyLM's variants, when
    the workspace has variants with generation metrics (the demo's); nothing otherwise."""
    compare = window.compare_view  # type: ignore[attr-defined]
    compare.refresh()
    compare.set_model_filter(GENERATE_MODEL)
    _settle()
    if not compare.generation.has_rows():
        return
    for plot, title in compare.generation.tabs():
        compare.tabs.setCurrentWidget(plot)
        grab(f"compare-{tab_file_name(title)}")


def show_graph(window: object, document: object, *, diff: bool) -> str | None:
    """Put the Graph tab in its screenshot state (see GRAPH_TAB); with `diff`, the diff against the original
    is shown instead. Returns the key of the graph shown."""
    view = window.graph_view  # type: ignore[attr-defined]
    window.tabs.setCurrentWidget(view)  # type: ignore[attr-defined]
    _wait(lambda: view.key is not None and not view.busy_now(), "the graph of the open model")
    rows = [r for r in document.workspace.list() if r["kind"] == "onnx" and not r.get("missing")]  # type: ignore[attr-defined]
    if rows:
        key = f"row:{rows[-1]['id']}"
        if view.key != key:
            view.set_variant(key)
            _wait(lambda: view.key == key and not view.busy_now(), "the graph of the ONNX variant")
    if diff:
        view.set_overlay("precision")
        view.set_diff(f"source:{document.source}")  # type: ignore[attr-defined]
        _wait(lambda: view.structure is not None and not view.busy_now(), "the graph diff")
    else:
        view.set_overlay("time share")
        _wait(lambda: bool(view.node_values) and not view.busy_now(), "the time share per node")
    view.expand(GRAPH_EXPANDED)
    view.fit()
    if not diff and view.node_values:
        members = [n for n in view.graph.groups().get(GRAPH_EXPANDED, []) if n in view.node_values]
        if members:
            slowest = max(members, key=lambda n: view.node_values[n])
            view.show_box(slowest)
            view.canvas.centre_on_box(slowest)
            _wait(lambda: not view.busy_now(), "the weight histogram")
    return view.key


def render_all(out_dir: Path, workspace_root: Path | None = None, *, demo: bool = True) -> list[Path]:
    """Render each tab of the main window to `<out_dir>/<tab>.png`; returns the files written. With `demo`,
    small real pipelines run first (into the workspace: a temporary one unless given), so the Run and
    Compare tabs show results."""
    from studio.gui.app import ensure_platform

    ensure_platform()
    from PySide6.QtCore import QCoreApplication, QSettings
    from PySide6.QtWidgets import QApplication

    from studio.gui.app import build_main_window, create_app
    from studio.gui.document import StudioDocument
    from studio.variants import Workspace

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="model-studio-shots-")
    if QApplication.instance() is None:
        # A fresh process: keep the user's settings (window layout, recent files) out of it.
        QSettings.setDefaultFormat(QSettings.Format.IniFormat)
        QSettings.setPath(
            QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(Path(scratch.name) / "settings")
        )
        QCoreApplication.setOrganizationName("model-studio-screenshots")
    app = create_app()
    workspace = Workspace(Path(workspace_root) if workspace_root else Path(scratch.name) / "workspace")
    document = StudioDocument(workspace=workspace)
    window = build_main_window(document)
    written: list[Path] = []
    try:
        window.resize(*SIZE)
        window.show()
        window.tabs.setCurrentIndex(0)
        window.open_source("builtin:minilm")
        _wait(lambda: not window.opening, "builtin:minilm to open")
        if document.model is None:
            raise RuntimeError(f"screenshots: builtin:minilm did not open: {window.last_error}")

        view = window.model_view
        view.select_tensor(TENSOR)
        _wait(
            lambda: view.current is not None and view.current.stats.name == TENSOR,
            f"the histogram of {TENSOR}",
        )

        heads = window.heads_view
        heads.method_combo.setCurrentText(HEADS_METHOD)
        heads.examples_spin.setValue(HEADS_EXAMPLES)
        heads.seq_spin.setValue(HEADS_SEQUENCE_LENGTH)
        failures: list[str] = []
        heads.compute_failed.connect(failures.append)
        heads.compute()
        _wait(lambda: heads.importance is not None or bool(failures), "head importance")
        if failures:
            raise RuntimeError(f"screenshots: head importance failed: {failures[0]}")
        heads.mask_least_important(HEADS_OFF)
        _wait(lambda: heads.fidelity is not None and heads.fidelity < 1.0, "the fidelity of the masked model")
        if demo:
            run_demo(window, document)
            run_search_demo(window, Path(scratch.name))

        def grab(index: int, name: str | None = None) -> None:
            window.tabs.setCurrentIndex(index)
            _settle()
            app.processEvents()
            path = out_dir / (name or tab_file_name(window.tabs.tabText(index)))
            if not window.grab().save(str(path)):
                raise RuntimeError(f"screenshots: could not write {path}")
            written.append(path)

        titles = [window.tabs.tabText(i) for i in range(window.tabs.count())]
        later = (GENERATE_TAB, GRAPH_TAB)  # MiniLM does not generate: that tab is shown on TinyLM below
        for index, title in enumerate(titles):
            if title not in later:
                grab(index)
        if demo and GRAPH_TAB in titles:
            show_graph(window, document, diff=False)
            grab(titles.index(GRAPH_TAB))
            show_graph(window, document, diff=True)
            grab(titles.index(GRAPH_TAB), "graph-diff.png")
        if GENERATE_TAB in titles:
            run_generation(window, document, demo=demo)
            grab(titles.index(GENERATE_TAB))
        if demo:
            show_quant_error(window, document)
            grab(window.tabs.indexOf(window.model_view), QUANT_ERROR_FILE)
        if COMPARE_TAB in titles:
            grab_generation_plots(window, lambda name: grab(titles.index(COMPARE_TAB), name))
        window.tabs.setCurrentIndex(0)
    finally:
        window.close()
        window.deleteLater()
        _settle(50)
        scratch.cleanup()
    return written


if __name__ == "__main__":
    import sys

    for p in render_all(Path(sys.argv[1] if len(sys.argv) > 1 else "screenshots")):
        print(p)
