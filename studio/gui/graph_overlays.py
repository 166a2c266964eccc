"""The Graph tab's overlays: the menu of what colours the boxes (run time share per node, layer-wise error
against a reference, precision, per-node numbers from a JSON file), the work that computes those numbers,
and the colours and legend drawn from them.

`OverlayMixin` is one part of `GraphView`: it reads the view's shown graph, layout and models and leaves
the numbers in `node_values` and the legend in `legend`; the view calls `_paint` when boxes change.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtGui import QColor
from PySide6.QtWidgets import QComboBox, QFileDialog

from studio.gui.graph_legend import Legend
from studio.gui.graph_scene import PRECISION_COLORS
from studio.inspection.graph import Graph
from studio.inspection.graph_export import node_rows, onto_graph, read_node_values
from studio.inspection.graph_layout import box_labels, box_values

OVERLAYS = ("none", "time share", "error", "precision", "from JSON file")
PROFILE_EXAMPLES = 4
SEQUENCE_LENGTH = 32
DATA = "builtin:sentences"


def time_shares(model: Any) -> dict[str, float]:
    from studio.evaluation.data import load_examples
    from studio.evaluation.node_profile import profile_model

    profile = profile_model(
        model, load_examples(DATA, PROFILE_EXAMPLES), sequence_length=SEQUENCE_LENGTH, runs=2
    )
    return dict(profile.shares)


def layer_errors(reference: Any, model: Any, graph: Graph) -> dict[str, float]:
    """Per node: the largest relative error, against `reference`, of the modules whose weights it reads."""
    from studio.evaluation.data import load_examples
    from studio.inspection.layer_diff import layer_diff

    diff = layer_diff(
        reference, model, examples=load_examples(DATA, PROFILE_EXAMPLES), sequence_length=SEQUENCE_LENGTH
    )
    errors = {x["name"]: x["relative_error"] for x in diff["layers"]}
    return {r["name"]: r["error"] for r in node_rows(graph, None, errors) if r["error"] is not None}


def overlay_combo() -> QComboBox:
    combo = QComboBox()
    combo.addItems(list(OVERLAYS))
    combo.setToolTip(
        "Colour the boxes: share of run time, relative error against the diff variant (or the open "
        "model), precision, or {node name: number} from a JSON file"
    )
    return combo


class OverlayMixin:
    """The overlay half of `GraphView` (which provides the attributes used here)."""

    overlay_combo: QComboBox
    overlay: str
    node_values: dict[str, float]
    shares: dict[str, float]
    unplaced_share: float
    errors: dict[str, float]
    values_file: Path | None
    legend: Legend | None
    key: str | None
    graph: Graph | None
    layout_: Any
    models: dict[str, Any]
    banner: Any
    summary: Any
    overlay_shown: Any
    diff_key: str | None
    _paint: Callable[[], None]
    _start: Callable[[str, Any, Any, str], None]
    opened: Callable[[str], Any]

    def set_overlay(self, name: str) -> None:
        self.overlay_combo.setCurrentText(name)
        if self.overlay != name:
            self._on_overlay_chosen(name)

    def load_values_file(self, path: str | Path) -> None:
        """Colour the boxes by `{node name: number}` from a JSON file."""
        self.values_file = Path(path)
        self.node_values = read_node_values(self.values_file)
        self.overlay = "from JSON file"
        self.overlay_combo.blockSignals(True)
        self.overlay_combo.setCurrentText(self.overlay)
        self.overlay_combo.blockSignals(False)
        self._paint()
        self.overlay_shown.emit(self.overlay)

    def _on_overlay_chosen(self, name: str) -> None:
        self.overlay = name
        self.banner.dismiss()
        key, graph = self.key, self.graph
        if name == "none" or graph is None or key is None:
            self.node_values = {}
            self._paint()
            return
        if name == "precision":
            self.node_values = {}
            self._paint()
            self.overlay_shown.emit(name)
            return
        if name == "from JSON file":
            path, _ = QFileDialog.getOpenFileName(self, "Per-node values", "", "JSON (*.json)")  # type: ignore[arg-type]
            if not path:
                self.set_overlay("none")
                return
            try:
                self.load_values_file(path)
            except Exception as exc:  # a StudioError names the problem; show it, keep the tab usable
                self.banner.show_message(getattr(exc, "message", str(exc)))
                self.set_overlay("none")
            return
        model = self.models[key]
        if name == "time share":

            def shown_shares(shares: dict[str, float]) -> None:
                self.shares, self.unplaced_share = onto_graph(shares, graph)
                self._values_ready("time share", self.shares)
                if self.unplaced_share > 0:
                    self.summary.setText(
                        f"{100 * self.unplaced_share:.1f} % of the run time is in kernels ONNX Runtime fused "
                        "on load that no node of this graph names"
                    )

            self._start(
                "overlay", lambda: time_shares(model), shown_shares, "profiling the run time per node…"
            )
        elif name == "error":
            reference_key = self.diff_key or f"source:{self.document.source}"
            opened = self.opened

            def work() -> dict[str, float]:
                return layer_errors(opened(reference_key), model, graph)

            def shown_errors(errors: dict[str, float]) -> None:
                self.errors = errors
                self._values_ready("error", errors)

            self._start("overlay", work, shown_errors, "comparing every layer's output…")

    def _values_ready(self, overlay: str, values: dict[str, float]) -> None:
        if self.overlay != overlay:
            return  # another overlay was chosen meanwhile
        self.node_values = values
        self._paint()
        self.overlay_shown.emit(overlay)

    def _scaled(self, value: float) -> float:
        return value * 100 if self.overlay == "time share" else value

    def overlay_colors(self) -> dict[str, QColor]:
        """The fill of every box the overlay colours, and the legend that explains them (`self.legend`)."""
        self.legend = None
        colors: dict[str, QColor] = {}
        if self.layout_ is None or self.graph is None:
            return colors
        if self.overlay == "precision":
            labels = box_labels(self.layout_, {n.name: n.precision for n in self.graph.nodes})
            colors = {b: PRECISION_COLORS.get(v, PRECISION_COLORS["mixed"]) for b, v in labels.items()}
            used = [k for k in PRECISION_COLORS if k in set(labels.values())]
            self.legend = Legend("precision", categories=[(k, PRECISION_COLORS[k]) for k in used])
        elif self.overlay != "none" and self.node_values:
            how = "sum" if self.overlay == "time share" else "max"
            values = {b: self._scaled(v) for b, v in box_values(self.layout_, self.node_values, how).items()}
            if values:
                title, fmt = {
                    "time share": ("share of run time (%)", "{:.1f}"),
                    "error": ("relative error vs reference (max per box)", "{:.2g}"),
                }.get(
                    self.overlay,
                    (f"{self.values_file.name if self.values_file else 'value'} (max per box)", "{:.3g}"),
                )
                self.legend = Legend(
                    title, low=min(0.0, min(values.values())), high=max(values.values()), fmt=fmt
                )
                colors = {b: self.legend.color(v) for b, v in values.items()}
        return colors

    def box_value(self, box_id: str, on_shown_graph: bool) -> str:
        """The overlay's number of a box of the shown graph, as the details panel prints it."""
        if self.layout_ is None or not on_shown_graph or self.legend is None or self.overlay == "precision":
            return ""
        values = box_values(self.layout_, self.node_values, "sum" if self.overlay == "time share" else "max")
        if box_id not in values:
            return ""
        return f"{self.legend.title}: {self.legend.fmt.format(self._scaled(values[box_id]))}"
