"""The Graph tab's exports: the canvases with their legends as SVG or PNG, and what is on screen as a
table (the diff's rows when a diff is shown, else one row per node with its time share and error), CSV or
JSON by the suffix. `ExportMixin` is one part of `GraphView`, which provides the attributes used here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtWidgets import QFileDialog

from studio.gui.graph_legend import Legend
from studio.gui.graph_scene import GraphScene, render_canvases
from studio.inspection.graph import Graph
from studio.inspection.graph_export import DIFF_COLUMNS, NODE_COLUMNS, diff_rows, node_rows, write_table


class ExportMixin:
    """The export actions of `GraphView`."""

    scene: GraphScene
    other_scene: GraphScene
    other: Graph | None
    graph: Graph | None
    legend: Legend | None
    structure: dict[str, Any] | None
    shares: dict[str, float]
    errors: dict[str, float]
    banner: Any
    font: Callable[[], Any]
    _diff_legend: Callable[[], Legend]

    def export_image(self, path: str | Path) -> Path:
        """The canvases (A and B side by side in a diff) with their legends, as SVG or PNG by the suffix."""
        scenes = [self.other_scene, self.scene] if self.other is not None else [self.scene]
        legends = [self.legend] if self.legend is not None else []
        if self.structure is not None:
            legends.append(self._diff_legend())
        return render_canvases(scenes, legends, path, self.font())

    def table_rows(self) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
        """What "Export table" writes: the diff's rows when there is one, else one row per node with the
        time share and error computed so far."""
        if self.structure is not None:
            return diff_rows(self.structure), DIFF_COLUMNS
        if self.graph is None:
            return [], NODE_COLUMNS
        rows = node_rows(self.graph, self.shares or None, None)
        for row in rows:
            row["error"] = self.errors.get(row["name"])
        return rows, NODE_COLUMNS

    def export_table(self, path: str | Path) -> Path:
        rows, columns = self.table_rows()
        return write_table(path, rows, columns)

    def _export_image_dialog(self, suffix: str) -> None:
        name = "graph-diff" if self.other is not None else "graph"
        kind = "SVG image (*.svg)" if suffix == "svg" else "PNG image (*.png)"
        path, _ = QFileDialog.getSaveFileName(self, "Export the graph", f"{name}.{suffix}", kind)
        if path and Path(path).suffix.lower() not in (".svg", ".png"):
            path += f".{suffix}"  # the format goes by the suffix
        if path:
            try:
                self.export_image(path)
            except OSError as exc:
                self.banner.show_message(f"could not export: {exc}")

    def _export_table_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export the table", "graph.csv", "CSV (*.csv);;JSON (*.json)"
        )
        if path:
            try:
                self.export_table(path)
            except Exception as exc:  # BadInput says why the place cannot be written
                self.banner.show_message(getattr(exc, "message", str(exc)))
