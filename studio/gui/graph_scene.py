"""What the Graph tab draws: the boxes and edges of a `graph_layout.Layout` as QGraphicsScene items, the
canvas (a QGraphicsView that pans by dragging and zooms with the wheel) with its legend (`graph_legend`);
`graph_exporting` writes canvases with their legends to SVG or PNG.

Nothing here knows about models: the view hands over a layout, a colour per box and a mark per box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import (
    QColor,
    QFont,
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

from studio.gui.graph_legend import LegendWidget
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
    "plumbing": QColor(150, 150, 165),  # ONNX glue no torch module stands for
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
            elif self.mark == "plumbing":
                pen = QPen(MARK_COLORS[self.mark], 2, Qt.PenStyle.DotLine)
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

    def fit_factor(self) -> float:
        """The zoom `fit` picks: the whole graph, or its width when the whole would be unreadable."""
        rect = self.sceneRect()
        if rect.isEmpty():
            return 1.0
        view = self.viewport().rect()
        factor = min(view.width() / rect.width(), view.height() / rect.height())
        if factor < 0.35:  # a whole 32-layer graph would be unreadable: fit the width, start at the top
            factor = min(1.0, view.width() / rect.width())
        return min(1.0, factor)

    def fit(self) -> None:
        """The whole graph in view; a tall graph is fitted to the width, readable, from the top."""
        rect = self.sceneRect()
        if rect.isEmpty():
            return
        self.set_zoom(self.fit_factor())
        self.centerOn(rect.center().x(), rect.top() + self.viewport().rect().height() / 2 / self.zoom())

    def shows(self, box_id: str) -> bool:
        """Whether the box's middle is in the viewport."""
        item = self.graph_scene().boxes.get(box_id)
        seen = self.mapToScene(self.viewport().rect()).boundingRect()
        return item is not None and seen.contains(item.sceneBoundingRect().center())

    def centre(self) -> QPointF:
        """The scene point at the middle of the viewport."""
        return self.mapToScene(self.viewport().rect().center())

    def follow_box(self, other: GraphCanvas, theirs: str, mine: str, relative_zoom: bool = False) -> None:
        """Show box `mine` where `other` shows its counterpart `theirs`: at the same offset from the
        viewport's middle, at other's zoom (box for box), or with `relative_zoom` at other's zoom relative
        to each canvas's fit (a torch original beside its much larger export). A canvas scrolled to an end
        takes the other to that end too."""
        ratio = self.fit_factor() / max(other.fit_factor(), 1e-9) if relative_zoom else 1.0
        zoom = min(MAX_ZOOM, max(MIN_ZOOM, other.zoom() * ratio))
        if abs(self.zoom() - zoom) > 1e-9:
            self.resetTransform()
            self.scale(zoom, zoom)
        offset = other.centre() - other.graph_scene().boxes[theirs].sceneBoundingRect().center()
        target = self.graph_scene().boxes[mine].sceneBoundingRect().center()
        self.centerOn(target + offset * (other.zoom() / self.zoom()))
        for bar, their_bar in (
            (self.horizontalScrollBar(), other.horizontalScrollBar()),
            (self.verticalScrollBar(), other.verticalScrollBar()),
        ):
            if their_bar.maximum() > their_bar.minimum():
                if their_bar.value() >= their_bar.maximum():
                    bar.setValue(bar.maximum())
                elif their_bar.value() <= their_bar.minimum():
                    bar.setValue(bar.minimum())

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
