"""What the Graph tab draws: the boxes and edges of a `graph_layout.Layout` as QGraphicsScene items, the
canvas (a QGraphicsView that pans by dragging and zooms with the wheel) with its legend (`graph_legend`),
and the export of canvases with their legend to SVG or PNG.

Nothing here knows about models: the view hands over a layout, a colour per box and a mark per box.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from PySide6.QtCore import QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import (
    QColor,
    QFont,
    QImage,
    QPainter,
    QPainterPath,
    QPen,
    QPolygonF,
    QWheelEvent,
)
from PySide6.QtWidgets import (
    QGraphicsItem,
    QGraphicsPathItem,
    QGraphicsRectItem,
    QGraphicsScene,
    QGraphicsSceneMouseEvent,
    QGraphicsSimpleTextItem,
    QGraphicsView,
    QWidget,
)

from studio.gui.graph_legend import Legend, LegendWidget, legend_size, paint_legend
from studio.inspection.graph_layout import Box, Layout

# Colours of categories: precision per node, and the diff marks.
PRECISION_COLORS = {
    "float32": QColor(120, 150, 200),
    "float64": QColor(90, 110, 170),
    "float16": QColor(90, 185, 120),
    "bfloat16": QColor(60, 160, 160),
    "int8": QColor(240, 150, 50),
    "int4": QColor(215, 70, 60),
    "float (excluded)": QColor(165, 110, 200),
    "mixed": QColor(175, 175, 175),
}
MARK_COLORS = {
    "added": QColor(60, 170, 80),
    "removed": QColor(215, 60, 60),
    "changed": QColor(240, 160, 30),
}
NEUTRAL = QColor(236, 238, 242)
BLOCK_FILL = QColor(214, 224, 240)
ZOOM_STEP = 1.15
MIN_ZOOM, MAX_ZOOM = 0.02, 8.0


def text_color_on(fill: QColor) -> QColor:
    """Black on light fills, white on dark ones (relative luminance)."""
    lum = 0.2126 * fill.redF() + 0.7152 * fill.greenF() + 0.0722 * fill.blueF()
    return QColor(20, 20, 20) if lum > 0.5 else QColor(250, 250, 250)


class BoxItem(QGraphicsRectItem):
    """One box: a node, or a collapsed block (drawn thicker, with its node count)."""

    def __init__(self, box: Box) -> None:
        super().__init__(0, 0, box.w, box.h)
        self.box = box
        self.setPos(box.x, box.y)
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIsSelectable)
        self.setAcceptHoverEvents(True)
        self.fill = BLOCK_FILL if box.collapsed else NEUTRAL
        self.mark: str | None = None
        self.highlighted = False
        self.text = QGraphicsSimpleTextItem(box.label, self)
        font = QFont()
        font.setPointSizeF(8.5)
        font.setBold(box.collapsed)
        self.text.setFont(font)
        self.sub: QGraphicsSimpleTextItem | None = None
        if box.collapsed:
            self.sub = QGraphicsSimpleTextItem(
                f"{box.members} nodes · {box.ops.get(box.op or '', 0)} {box.op}", self
            )
            small = QFont()
            small.setPointSizeF(7.5)
            self.sub.setFont(small)
        self._place_text()
        self.setToolTip(
            f"{box.id}\n{box.members} nodes (double-click to expand)"
            if box.collapsed
            else f"{box.id}\n{box.op}"
        )
        self.restyle()

    def _place_text(self) -> None:
        r = self.rect()
        lines = [t for t in (self.text, self.sub) if t is not None]
        heights = sum(t.boundingRect().height() for t in lines)
        y = (r.height() - heights) / 2
        for t in lines:
            b = t.boundingRect()
            t.setPos(max(2.0, (r.width() - b.width()) / 2), y)
            y += b.height()

    def set_fill(self, color: QColor | None) -> None:
        self.fill = color if color is not None else (BLOCK_FILL if self.box.collapsed else NEUTRAL)
        self.restyle()

    def set_mark(self, mark: str | None) -> None:
        self.mark = mark
        self.restyle()

    def set_highlighted(self, on: bool) -> None:
        self.highlighted = on
        self.restyle()

    def restyle(self) -> None:
        if self.highlighted:
            pen = QPen(QColor(20, 110, 230), 4)
        elif self.mark in MARK_COLORS:
            pen = QPen(MARK_COLORS[self.mark], 4)
            if self.mark == "removed":
                pen.setStyle(Qt.PenStyle.DashLine)
        else:
            pen = QPen(QColor(90, 95, 110), 2 if self.box.collapsed else 1)
        self.setPen(pen)
        self.setBrush(self.fill)
        ink = text_color_on(self.fill)
        for t in (self.text, self.sub):
            if t is not None:
                t.setBrush(ink)

    def mouseDoubleClickEvent(self, event: QGraphicsSceneMouseEvent) -> None:
        scene = self.scene()
        if isinstance(scene, GraphScene):
            scene.box_double_clicked.emit(self.box.id)
        event.accept()

    def mousePressEvent(self, event: QGraphicsSceneMouseEvent) -> None:
        scene = self.scene()
        if isinstance(scene, GraphScene) and event.button() == Qt.MouseButton.LeftButton:
            scene.box_clicked.emit(self.box.id)
        super().mousePressEvent(event)


def arrow_path(points: Sequence[tuple[float, float]]) -> QPainterPath:
    """The polyline with an arrowhead at its end (where it enters the reading box)."""
    path = QPainterPath(QPointF(*points[0]))
    for p in points[1:]:
        path.lineTo(QPointF(*p))
    (x0, y0), (x1, y1) = points[-2], points[-1]
    angle = math.atan2(y1 - y0, x1 - x0)
    head = QPolygonF(
        [
            QPointF(x1, y1),
            QPointF(x1 - 8 * math.cos(angle - 0.4), y1 - 8 * math.sin(angle - 0.4)),
            QPointF(x1 - 8 * math.cos(angle + 0.4), y1 - 8 * math.sin(angle + 0.4)),
            QPointF(x1, y1),
        ]
    )
    path.addPolygon(head)
    return path


class GraphScene(QGraphicsScene):
    box_clicked = Signal(str)
    box_double_clicked = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.boxes: dict[str, BoxItem] = {}
        self.layout: Layout | None = None
        self.setBackgroundBrush(QColor(250, 250, 252))

    def show_layout(self, layout: Layout) -> None:
        self.clear()
        self.boxes = {}
        self.layout = layout
        edge_pen = QPen(QColor(130, 135, 150), 1.2)
        for e in layout.edges:
            line = QGraphicsPathItem(arrow_path(e.points))
            line.setPen(edge_pen)
            line.setZValue(-1)
            self.addItem(line)
        for box in layout.boxes:
            item = BoxItem(box)
            self.addItem(item)
            self.boxes[box.id] = item
        # room above the graph for the legend floating in the canvas's corner, so a fitted view is not
        # covered by it
        margin, above = 40.0, 110.0
        self.setSceneRect(QRectF(-margin, -above, layout.width + 2 * margin, layout.height + above + margin))

    def color_boxes(self, colors: dict[str, QColor]) -> None:
        for box_id, item in self.boxes.items():
            item.set_fill(colors.get(box_id))

    def mark_boxes(self, marks: dict[str, str]) -> None:
        for box_id, item in self.boxes.items():
            item.set_mark(marks.get(box_id))

    def highlight(self, box_id: str | None) -> None:
        for other, item in self.boxes.items():
            item.set_highlighted(other == box_id)


class GraphCanvas(QGraphicsView):
    """Pan by dragging, zoom with the wheel (around the cursor), fit with `fit()`; `navigated` fires on any
    scroll or zoom, so a second canvas can follow."""

    navigated = Signal()

    def __init__(self, scene: GraphScene, parent: QWidget | None = None) -> None:
        super().__init__(scene, parent)
        self.setRenderHint(QPainter.RenderHint.Antialiasing)
        self.setDragMode(QGraphicsView.DragMode.ScrollHandDrag)
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.AnchorUnderMouse)
        self.setViewportUpdateMode(QGraphicsView.ViewportUpdateMode.SmartViewportUpdate)
        self.legend = LegendWidget(self)
        self.horizontalScrollBar().valueChanged.connect(lambda _v: self.navigated.emit())
        self.verticalScrollBar().valueChanged.connect(lambda _v: self.navigated.emit())

    def graph_scene(self) -> GraphScene:
        scene = self.scene()
        assert isinstance(scene, GraphScene)
        return scene

    def zoom(self) -> float:
        return self.transform().m11()

    def set_zoom(self, factor: float) -> None:
        factor = min(MAX_ZOOM, max(MIN_ZOOM, factor))
        self.resetTransform()
        self.scale(factor, factor)
        self.navigated.emit()

    def wheelEvent(self, event: QWheelEvent) -> None:
        steps = event.angleDelta().y() / 120.0
        if steps:
            target = min(MAX_ZOOM, max(MIN_ZOOM, self.zoom() * ZOOM_STEP**steps))
            self.scale(target / self.zoom(), target / self.zoom())
            self.navigated.emit()
        event.accept()

    def fit(self) -> None:
        """The whole graph in view; a tall graph is fitted to the width, readable, from the top."""
        rect = self.sceneRect()
        if rect.isEmpty():
            return
        view = self.viewport().rect()
        factor = min(view.width() / rect.width(), view.height() / rect.height())
        if factor < 0.35:  # a whole 32-layer graph would be unreadable: fit the width, start at the top
            factor = min(1.0, view.width() / rect.width())
        self.set_zoom(min(1.0, factor))
        self.centerOn(rect.center().x(), rect.top() + view.height() / 2 / self.zoom())

    def centre_on_box(self, box_id: str) -> bool:
        item = self.graph_scene().boxes.get(box_id)
        if item is None:
            return False
        if self.zoom() < 0.6:
            self.set_zoom(1.0)
        self.centerOn(item.sceneBoundingRect().center())
        return True

    def follow(self, other: GraphCanvas) -> None:
        """Take `other`'s zoom and its scroll position, as a fraction of each scroll range."""
        if abs(self.zoom() - other.zoom()) > 1e-9:
            self.resetTransform()
            self.scale(other.zoom(), other.zoom())
        for mine, theirs in (
            (self.horizontalScrollBar(), other.horizontalScrollBar()),
            (self.verticalScrollBar(), other.verticalScrollBar()),
        ):
            span = theirs.maximum() - theirs.minimum()
            fraction = (theirs.value() - theirs.minimum()) / span if span > 0 else 0.0
            mine.setValue(round(mine.minimum() + fraction * (mine.maximum() - mine.minimum())))


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
