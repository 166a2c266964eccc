"""The Graph tab's exports: the canvases with their legends as SVG or PNG, and what is on screen as a
table (the diff's rows when a diff is shown, else one row per node with its time share and error), CSV or
JSON by the suffix. `ExportMixin` is one part of `GraphView`, which provides the attributes used here.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import QPointF, QRectF, QSize
from PySide6.QtGui import QColor, QFont, QImage, QPainter
from PySide6.QtWidgets import QFileDialog

from studio.gui.graph_legend import Legend, legend_size, paint_legend
from studio.gui.graph_scene import GraphScene
from studio.inspection.graph import Graph
from studio.inspection.graph_export import DIFF_COLUMNS, NODE_COLUMNS, diff_rows, node_rows, write_table


def render_canvases(
    scenes: Sequence[GraphScene], legends: Sequence[Legend], path: str | Path, font: QFont
) -> Path:
    """The scenes side by side (a diff: A then B) at 100 % with the legends in a row above them, to SVG or
    PNG by the suffix."""
    path = Path(path)
    gap = 30.0
    sizes = [legend_size(legend, font) for legend in legends]
    top = max([s.height() + 12 for s in sizes] + [0.0])
    rects = [s.sceneRect() for s in scenes]
    width = max(sum(r.width() for r in rects) + gap * (len(rects) - 1), 1.0)
    width = max(width, sum(s.width() + 16 for s in sizes))
    height = max([r.height() for r in rects] + [1.0]) + top

    def paint(painter: QPainter) -> None:
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(QRectF(0, 0, width, height), QColor(250, 250, 252))
        x = 8.0
        for legend, size in zip(legends, sizes, strict=True):
            paint_legend(painter, QPointF(x, 6), legend, font)
            x += size.width() + 16
        x = 0.0
        for scene, rect in zip(scenes, rects, strict=True):
            scene.render(painter, QRectF(x, top, rect.width(), rect.height()), rect)
            x += rect.width() + gap

    size = QSize(math.ceil(width), math.ceil(height))
    # written beside the target and renamed over it: a viewer watching the file never sees half an image
    # (the temporary name keeps the suffix: Qt picks the image format by it)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        if path.suffix.lower() == ".svg":
            _write_svg(tmp, size, path.stem, paint)
        else:
            _write_png(tmp, size, paint)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_svg(tmp: Path, size: QSize, title: str, paint: Callable[[QPainter], None]) -> None:
    from PySide6.QtCore import QRect
    from PySide6.QtSvg import QSvgGenerator

    generator = QSvgGenerator()
    generator.setFileName(str(tmp))
    generator.setSize(size)
    generator.setViewBox(QRect(0, 0, size.width(), size.height()))
    generator.setTitle(title)
    generator.setDescription("exported from Model Studio")
    painter = QPainter(generator)
    try:
        paint(painter)
    finally:
        painter.end()
    if not tmp.exists():
        raise OSError(f"could not write {tmp.parent}")


def _write_png(tmp: Path, size: QSize, paint: Callable[[QPainter], None]) -> None:
    scale = 2.0 if size.width() * size.height() < 4_000_000 else 1.0  # sharp, but bounded in memory
    image = QImage(round(size.width() * scale), round(size.height() * scale), QImage.Format.Format_ARGB32)
    image.fill(QColor(250, 250, 252))
    painter = QPainter(image)
    try:
        painter.scale(scale, scale)
        paint(painter)
    finally:
        painter.end()
    if not image.save(str(tmp)):
        raise OSError(f"could not write {tmp.parent}")


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
    panes: Callable[[], list[tuple[Graph, Any]]]

    def export_image(self, path: str | Path) -> Path:
        """The canvases (A and B side by side in a diff) with their legends, as SVG or PNG by the suffix."""
        scenes = [c.graph_scene() for _, c in self.panes()] or [self.scene]
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
