"""The pipeline as an ordered list of steps: each row drawn with its stage kinds and its problem, drops
of palette blocks (add) and of its own rows (move) reported as signals.

The drop handler reads only the QMimeData and the drop position, so tests send a real QDropEvent
offscreen; a step MIME carries a token of this list, so a row dragged from another window is not a move.
"""

from __future__ import annotations

import os
from typing import Any

from PySide6.QtCore import QMimeData, QModelIndex, QPoint, QRect, QSize, Qt, Signal
from PySide6.QtGui import (
    QColor,
    QDrag,
    QDragEnterEvent,
    QDragLeaveEvent,
    QDragMoveEvent,
    QDropEvent,
    QFont,
    QIcon,
    QKeyEvent,
    QPainter,
    QPalette,
    QPen,
)
from PySide6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QListWidget,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QWidget,
)

from studio.gui.pipeline_palette import ID_ROLE, TECHNIQUE_MIME

STEP_MIME = "application/x-model-studio-step"
KINDS_ROLE = Qt.ItemDataRole.UserRole + 2
PROBLEM_ROLE = Qt.ItemDataRole.UserRole + 3
TITLE_ROLE = Qt.ItemDataRole.UserRole + 4


def is_dark_palette(palette: QPalette) -> bool:
    return palette.color(QPalette.ColorRole.Base).lightness() < 128


def problem_color(palette: QPalette) -> QColor:
    return QColor("#ef9a9a") if is_dark_palette(palette) else QColor("#c62828")


class StepDelegate(QStyledItemDelegate):
    """A step row: number and title, the stage kinds, the id, and the problem (if any) in red."""

    PAD = 6

    def sizeHint(self, option: QStyleOptionViewItem, index: QModelIndex) -> QSize:
        fm = option.fontMetrics
        lines = 3 if index.data(PROBLEM_ROLE) else 2
        return QSize(240, lines * (fm.height() + 2) + 2 * self.PAD)

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: QModelIndex) -> None:
        opt = QStyleOptionViewItem(option)
        self.initStyleOption(opt, index)
        opt.text = ""
        opt.icon = QIcon()
        widget = opt.widget
        style = widget.style() if widget is not None else QApplication.style()
        style.drawControl(QStyle.ControlElement.CE_ItemViewItem, opt, painter, widget)

        selected = bool(opt.state & QStyle.StateFlag.State_Selected)
        pal = opt.palette
        text = pal.color(QPalette.ColorRole.HighlightedText if selected else QPalette.ColorRole.Text)
        dim = QColor(text)
        dim.setAlphaF(0.65)
        problem = index.data(PROBLEM_ROLE)
        bad = problem_color(pal)
        rect = opt.rect.adjusted(self.PAD + 6, self.PAD, -self.PAD, -self.PAD)
        fm = opt.fontMetrics
        line_h = fm.height() + 2
        painter.save()
        if problem:
            painter.fillRect(QRect(opt.rect.left(), opt.rect.top() + 2, 4, opt.rect.height() - 4), bad)
        title_font = QFont(opt.font)
        title_font.setBold(True)
        painter.setFont(title_font)
        painter.setPen(text)
        number = f"{index.row() + 1}."
        kinds = index.data(KINDS_ROLE) or ""
        kinds_w = fm.horizontalAdvance(kinds) + 8
        title_rect = QRect(rect.left(), rect.top(), rect.width() - kinds_w, line_h)
        title = f"{number} {index.data(TITLE_ROLE)}"
        painter.drawText(
            title_rect,
            Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
            painter.fontMetrics().elidedText(title, Qt.TextElideMode.ElideRight, title_rect.width()),
        )
        painter.setFont(opt.font)
        painter.setPen(bad if problem and not selected else dim)
        painter.drawText(
            QRect(rect.right() - kinds_w, rect.top(), kinds_w, line_h),
            Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
            kinds,
        )
        indent = fm.horizontalAdvance(number + " ")
        painter.setPen(dim)
        painter.drawText(
            QRect(rect.left() + indent, rect.top() + line_h, rect.width() - indent, line_h),
            Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
            index.data(ID_ROLE) or "",
        )
        if problem:
            icon = style.standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning)
            size = fm.height()
            top = rect.top() + 2 * line_h + (line_h - size) // 2
            icon.paint(painter, QRect(rect.left() + indent, top, size, size))
            painter.setPen(text if selected else bad)
            x = rect.left() + indent + size + 4
            width = rect.right() - x
            painter.drawText(
                QRect(x, rect.top() + 2 * line_h, width, line_h),
                Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                fm.elidedText(str(problem), Qt.TextElideMode.ElideRight, width),
            )
        painter.restore()


class PipelineList(QListWidget):
    """The steps; accepts technique drops (add) and step drops (move) and reports them as signals."""

    technique_dropped = Signal(str, int)  # technique id, insertion row
    step_dropped = Signal(int, int)  # source row, insertion row (in the list before the move)
    delete_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setItemDelegate(StepDelegate(self))
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setDragEnabled(True)
        self.setAcceptDrops(True)
        self.viewport().setAcceptDrops(True)
        self.setDragDropMode(QAbstractItemView.DragDropMode.DragDrop)
        self.setDefaultDropAction(Qt.DropAction.MoveAction)
        self.setDropIndicatorShown(False)  # drawn by paintEvent: a line where the step will land
        self.setSpacing(1)
        self.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self._drop_row: int | None = None
        self._token = f"{os.getpid()}-{id(self)}"  # a step MIME from another list is not a move here

    def step_mime(self, row: int) -> QMimeData:
        """What a drag of step `row` carries (also what tests drop)."""
        mime = QMimeData()
        mime.setData(STEP_MIME, f"{self._token}:{row}".encode())
        return mime

    def drop_row(self, pos: QPoint) -> int:
        """Insertion row for a drop at `pos` (viewport coordinates): before or after the item under it."""
        item = self.itemAt(pos)
        if item is None:
            return self.count()
        row = self.row(item)
        return row + 1 if pos.y() > self.visualItemRect(item).center().y() else row

    def _step_source(self, mime: QMimeData) -> int | None:
        if not mime.hasFormat(STEP_MIME):
            return None
        token, _, row = bytes(mime.data(STEP_MIME).data()).decode("utf-8", "replace").rpartition(":")
        if token != self._token or not row.isdigit():
            return None
        return int(row)

    # ---------------------------------------------------------------------------- drag source

    def mimeTypes(self) -> list[str]:
        return [STEP_MIME, TECHNIQUE_MIME]

    def supportedDropActions(self) -> Qt.DropAction:
        return Qt.DropAction.MoveAction | Qt.DropAction.CopyAction

    def startDrag(self, supported: Qt.DropAction) -> None:
        item = self.currentItem()
        if item is None:
            return
        drag = QDrag(self)
        drag.setMimeData(self.step_mime(self.row(item)))
        rect = self.visualItemRect(item)
        drag.setPixmap(self.viewport().grab(rect))
        drag.setHotSpot(QPoint(12, rect.height() // 2))
        drag.exec(Qt.DropAction.MoveAction)  # the pipeline model moves the step; nothing is removed here

    # ---------------------------------------------------------------------------- drop target

    def _accepts(self, event: QDropEvent | QDragMoveEvent | QDragEnterEvent) -> Qt.DropAction | None:
        mime = event.mimeData()
        if mime.hasFormat(TECHNIQUE_MIME):
            return Qt.DropAction.CopyAction
        if self._step_source(mime) is not None:
            return Qt.DropAction.MoveAction
        return None

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        action = self._accepts(event)
        if action is None:
            event.ignore()
            return
        event.setDropAction(action)
        event.accept()

    def dragMoveEvent(self, event: QDragMoveEvent) -> None:
        action = self._accepts(event)
        if action is None:
            event.ignore()
            return
        self._drop_row = self.drop_row(event.position().toPoint())
        self.viewport().update()
        event.setDropAction(action)
        event.accept()

    def dragLeaveEvent(self, event: QDragLeaveEvent) -> None:
        self._drop_row = None
        self.viewport().update()
        event.accept()

    def dropEvent(self, event: QDropEvent) -> None:
        self._drop_row = None
        self.viewport().update()
        mime = event.mimeData()
        row = self.drop_row(event.position().toPoint())
        if mime.hasFormat(TECHNIQUE_MIME):
            technique_id = bytes(mime.data(TECHNIQUE_MIME).data()).decode("utf-8", "replace").strip()
            event.setDropAction(Qt.DropAction.CopyAction)
            event.accept()
            if technique_id:
                self.technique_dropped.emit(technique_id, row)
            return
        source = self._step_source(mime)
        if source is not None:
            event.setDropAction(Qt.DropAction.MoveAction)
            event.accept()
            self.step_dropped.emit(source, row)
            return
        event.ignore()

    # ---------------------------------------------------------------------------- keys and painting

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.key() in (Qt.Key.Key_Delete, Qt.Key.Key_Backspace) and self.currentRow() >= 0:
            self.delete_requested.emit()
            event.accept()
            return
        super().keyPressEvent(event)

    def paintEvent(self, event: Any) -> None:
        super().paintEvent(event)
        painter = QPainter(self.viewport())
        if self.count() == 0:
            color = QColor(self.palette().color(QPalette.ColorRole.Text))
            color.setAlphaF(0.55)
            painter.setPen(color)
            painter.drawText(
                self.viewport().rect().adjusted(20, 20, -20, -20),
                Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                "Drag techniques here from the palette\n(or double-click them)",
            )
        if self._drop_row is not None:
            if self.count() == 0:
                y = 2
            elif self._drop_row < self.count():
                y = self.visualItemRect(self.item(self._drop_row)).top() - 1
            else:
                y = self.visualItemRect(self.item(self.count() - 1)).bottom() + 1
            painter.setPen(QPen(self.palette().color(QPalette.ColorRole.Highlight), 3))
            painter.drawLine(4, y, self.viewport().width() - 4, y)
        painter.end()
