"""The pipeline editor: a palette of technique blocks, the pipeline as an ordered list, and a parameter form.

The editor is a passive view of `document.pipeline`: it rebuilds its list from the model's signals and
changes the pipeline only through the document (undoable commands). Drag and drop carries a technique id
(palette -> pipeline) or a step index (moves inside the pipeline) in custom MIME types; the drop handler
reads only the QMimeData and the drop position, so tests send a real QDropEvent offscreen.

Problems (a step that cannot follow the previous one, a bad parameter, an unavailable technique) come from
`PipelineModel.problems`, the same check `model-studio run` does, and are shown on the step at once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from PySide6.QtCore import QMimeData, QModelIndex, QPoint, QRect, QSize, Qt, Signal
from PySide6.QtGui import (
    QAction,
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
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QScrollArea,
    QSplitter,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QToolBar,
    QToolButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from studio.gui.document import StudioDocument
from studio.gui.param_form import ParamForm

TECHNIQUE_MIME = "application/x-model-studio-technique"
STEP_MIME = "application/x-model-studio-step"
RECIPE_FILTER = "Recipes (*.yaml *.yml);;All files (*)"
MAX_PROBLEM_LINES = 5

ID_ROLE = Qt.ItemDataRole.UserRole + 1
KINDS_ROLE = Qt.ItemDataRole.UserRole + 2
PROBLEM_ROLE = Qt.ItemDataRole.UserRole + 3
TITLE_ROLE = Qt.ItemDataRole.UserRole + 4

CATEGORY_TITLES = {
    "precision": "Precision",
    "quantization": "Quantization",
    "pruning": "Pruning",
    "distillation": "Distillation",
    "export": "Export",
    "graph": "Graph optimization",
    "compile": "Compilation",
}


def technique_mime(technique_id: str) -> QMimeData:
    """What the palette puts on a drag: the technique id (plain text too, for text editors)."""
    mime = QMimeData()
    mime.setData(TECHNIQUE_MIME, technique_id.encode("utf-8"))
    mime.setText(technique_id)
    return mime


def _registry() -> dict[str, Any]:
    from studio.techniques.base import registry

    return registry()


def _is_dark(palette: QPalette) -> bool:
    return palette.color(QPalette.ColorRole.Base).lightness() < 128


def problem_color(palette: QPalette) -> QColor:
    return QColor("#ef9a9a") if _is_dark(palette) else QColor("#c62828")


def _short(source: str) -> str:
    """A model's name for a button: the folder or file name, not the whole path."""
    return source if source.startswith("builtin:") else Path(source).name or source


# ------------------------------------------------------------------------------------------------ palette


class TechniquePalette(QTreeWidget):
    """Technique blocks grouped by category; available ones can be dragged or double-clicked."""

    technique_activated = Signal(str)  # double-click / Enter: add it where its stage kind fits

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setColumnCount(2)
        self.setHeaderLabels(["Technique", "id"])
        self.header().setStretchLastSection(False)
        self.header().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.header().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.setRootIsDecorated(False)
        self.setIndentation(10)
        self.setUniformRowHeights(True)
        self.setDragEnabled(True)
        self.setDragDropMode(QAbstractItemView.DragDropMode.DragOnly)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.itemDoubleClicked.connect(self._activated)
        self.populate()

    def populate(self) -> None:
        self.clear()
        techniques = _registry()
        by_category: dict[str, list[Any]] = {}
        for cls in techniques.values():
            by_category.setdefault(cls.category, []).append(cls)
        order = list(CATEGORY_TITLES) + sorted(set(by_category) - set(CATEGORY_TITLES))
        bold = QFont(self.font())
        bold.setBold(True)
        for category in order:
            classes = by_category.get(category)
            if not classes:
                continue
            header = QTreeWidgetItem(self, [CATEGORY_TITLES.get(category, category.capitalize()), ""])
            header.setFlags(Qt.ItemFlag.ItemIsEnabled)
            header.setFont(0, bold)
            header.setData(0, ID_ROLE, None)
            header.setFirstColumnSpanned(True)
            for cls in classes:
                item = QTreeWidgetItem(header, [cls.title, cls.id])
                item.setData(0, ID_ROLE, cls.id)
                item.setForeground(1, self.palette().color(QPalette.ColorRole.PlaceholderText))
                ok, reason = cls().availability()
                kinds = f"{cls.input_kind} -> {cls.output_kind}"
                if ok:
                    item.setFlags(
                        Qt.ItemFlag.ItemIsEnabled
                        | Qt.ItemFlag.ItemIsSelectable
                        | Qt.ItemFlag.ItemIsDragEnabled
                    )
                    tip = f"<b>{cls.title}</b> ({cls.id}, {kinds})<br>{cls.description}"
                else:
                    item.setFlags(Qt.ItemFlag.NoItemFlags)
                    tip = f"<b>{cls.title}</b> ({cls.id}, {kinds})<br>Not available here: {reason}"
                item.setToolTip(0, tip)
                item.setToolTip(1, tip)
            header.setExpanded(True)
        # wide enough for the longest title next to the longest id: names were cut at the default width
        fm = self.fontMetrics()
        titles = [cls.title for cls in techniques.values()]
        ids = [cls.id for cls in techniques.values()]
        needed = (
            max((fm.horizontalAdvance(t) for t in titles), default=0)
            + max((fm.horizontalAdvance(i) for i in ids), default=0)
            + self.indentation()
            + 6 * fm.averageCharWidth()  # cell padding, the frame and a scroll bar
        )
        self.setMinimumWidth(needed)

    def items_by_id(self) -> dict[str, QTreeWidgetItem]:
        out = {}
        for i in range(self.topLevelItemCount()):
            header = self.topLevelItem(i)
            for j in range(header.childCount()):
                child = header.child(j)
                out[child.data(0, ID_ROLE)] = child
        return out

    def set_filter(self, text: str) -> None:
        needle = text.strip().lower()
        for i in range(self.topLevelItemCount()):
            header = self.topLevelItem(i)
            shown = 0
            for j in range(header.childCount()):
                child = header.child(j)
                hit = not needle or needle in (child.text(0) + " " + child.text(1)).lower()
                child.setHidden(not hit)
                shown += hit
            header.setHidden(shown == 0)

    # drag: our own MIME type and a copy action (the palette keeps its items)
    def mimeTypes(self) -> list[str]:
        return [TECHNIQUE_MIME]

    def startDrag(self, supported: Qt.DropAction) -> None:
        item = self.currentItem()
        technique_id = item.data(0, ID_ROLE) if item is not None else None
        if not technique_id or not (item.flags() & Qt.ItemFlag.ItemIsEnabled):
            return
        drag = QDrag(self)
        drag.setMimeData(technique_mime(technique_id))
        rect = self.visualItemRect(item)
        drag.setPixmap(self.viewport().grab(rect))
        drag.setHotSpot(QPoint(12, rect.height() // 2))
        drag.exec(Qt.DropAction.CopyAction)

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and self.currentItem() is not None:
            self._activated(self.currentItem())
            return
        super().keyPressEvent(event)

    def _activated(self, item: QTreeWidgetItem, _column: int = 0) -> None:
        technique_id = item.data(0, ID_ROLE)
        if technique_id and item.flags() & Qt.ItemFlag.ItemIsEnabled:
            self.technique_activated.emit(technique_id)


# ------------------------------------------------------------------------------------------------ pipeline list


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


# ------------------------------------------------------------------------------------------------ editor


class PipelineEditor(QWidget):
    """Palette | pipeline | parameters, with Open/Save (recipe YAML) and Undo/Redo."""

    saved = Signal(str)  # path
    opened = Signal(str)  # path
    model_checked = Signal()  # the open model's structure is known: heads / layer names are checked now

    def __init__(self, document: StudioDocument, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.pipeline = document.pipeline
        self.last_error = ""
        self._form: ParamForm | None = None
        self._form_row: int | None = None
        self._problems: dict[int, str] = {}
        self._layout: Any = None  # ModelLayout of the open model once computed (None: not yet)
        self._layout_task: Any = None

        self._build_actions()
        self._build_ui()

        self.pipeline.step_added.connect(self._on_added)
        self.pipeline.step_moved.connect(self._on_moved)
        self.pipeline.step_removed.connect(self._on_removed)
        self.pipeline.params_changed.connect(self._on_params_changed)
        self.pipeline.reset.connect(self._on_reset)
        document.model_changed.connect(self._on_model_changed)
        document.undo_stack.cleanChanged.connect(self._clean_changed)
        self._rebuild(select=0 if len(self.pipeline) else None)
        if document.model is not None:
            self._on_model_changed()

    # ---------------------------------------------------------------------------- construction

    def _build_actions(self) -> None:
        style = self.style()
        sp = QStyle.StandardPixmap
        self.open_action = QAction(style.standardIcon(sp.SP_DialogOpenButton), "Open pipeline…", self)
        self.open_action.setToolTip("Open a recipe YAML file (the format `model-studio run` reads)")
        self.open_action.triggered.connect(self.open_dialog)
        self.save_action = QAction(style.standardIcon(sp.SP_DialogSaveButton), "Save pipeline", self)
        self.save_action.setToolTip("Save the pipeline as a recipe YAML file")
        self.save_action.triggered.connect(self.save)
        self.save_as_action = QAction("Save pipeline as…", self)
        self.save_as_action.triggered.connect(self.save_as)
        # Fixed labels (the toolbar does not jump as command names change); what is undone goes in the tooltip.
        stack = self.document.undo_stack
        self.undo_action = QAction(style.standardIcon(sp.SP_ArrowBack), "Undo", self)
        self.undo_action.triggered.connect(stack.undo)
        self.redo_action = QAction(style.standardIcon(sp.SP_ArrowForward), "Redo", self)
        self.redo_action.triggered.connect(stack.redo)
        # state comes with the signals: the stack may be going away when it sends them (window closing)
        stack.canUndoChanged.connect(self.undo_action.setEnabled)
        stack.canRedoChanged.connect(self.redo_action.setEnabled)
        stack.undoTextChanged.connect(self._undo_text_changed)
        stack.redoTextChanged.connect(self._redo_text_changed)
        self.undo_action.setEnabled(stack.canUndo())
        self.redo_action.setEnabled(stack.canRedo())
        self._undo_text_changed(stack.undoText())
        self._redo_text_changed(stack.redoText())
        self.remove_action = QAction(style.standardIcon(sp.SP_TrashIcon), "Remove step", self)
        self.remove_action.setToolTip("Remove the selected step (Delete)")
        self.remove_action.triggered.connect(self.remove_selected)
        self.up_action = QAction(style.standardIcon(sp.SP_ArrowUp), "Move up", self)
        self.up_action.triggered.connect(lambda: self._move_selected(-1))
        self.down_action = QAction(style.standardIcon(sp.SP_ArrowDown), "Move down", self)
        self.down_action.triggered.connect(lambda: self._move_selected(+1))

    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.setSpacing(4)

        self.toolbar = QToolBar()
        self.toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.toolbar.setIconSize(QSize(16, 16))
        for action in (self.open_action, self.save_action, self.save_as_action):
            self.toolbar.addAction(action)
        self.toolbar.addSeparator()
        self.toolbar.addAction(self.undo_action)
        self.toolbar.addAction(self.redo_action)
        self.toolbar.addSeparator()
        for action in (self.remove_action, self.up_action, self.down_action):
            self.toolbar.addAction(action)
        layout.addWidget(self.toolbar)

        self.error_banner = QFrame()
        self.error_banner.setObjectName("pipeline-error")
        self.error_banner.setFrameShape(QFrame.Shape.StyledPanel)
        self.error_banner.setStyleSheet(
            "#pipeline-error { background: rgba(211, 47, 47, 0.12); border: 1px solid rgba(211, 47, 47, 0.6);"
            " border-radius: 4px; }"
        )
        banner = QHBoxLayout(self.error_banner)
        banner.setContentsMargins(8, 4, 4, 4)
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        banner.addWidget(self.error_label, 1)
        close = QToolButton()
        close.setAutoRaise(True)
        close.setIcon(self.style().standardIcon(QStyle.StandardPixmap.SP_TitleBarCloseButton))
        close.setToolTip("Dismiss")
        close.clicked.connect(lambda: self.show_error(""))
        banner.addWidget(close, 0, Qt.AlignmentFlag.AlignTop)
        self.error_banner.hide()
        layout.addWidget(self.error_banner)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.setChildrenCollapsible(False)
        layout.addWidget(splitter, 1)

        # palette
        left = QWidget()
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        lv.addWidget(self._heading("Techniques"))
        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter…")
        self.filter_edit.setClearButtonEnabled(True)
        lv.addWidget(self.filter_edit)
        self.palette_view = TechniquePalette()
        self.palette_view.technique_activated.connect(self.document.add_block)
        self.filter_edit.textChanged.connect(self.palette_view.set_filter)
        lv.addWidget(self.palette_view, 1)
        splitter.addWidget(left)

        # pipeline
        middle = QWidget()
        mv = QVBoxLayout(middle)
        mv.setContentsMargins(0, 0, 0, 0)
        self.pipeline_heading = self._heading("Pipeline")
        mv.addWidget(self.pipeline_heading)
        self.list = PipelineList()
        self.list.technique_dropped.connect(self._technique_dropped)
        self.list.step_dropped.connect(self._step_dropped)
        self.list.delete_requested.connect(self.remove_selected)
        self.list.currentRowChanged.connect(self._selection_changed)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
        for action in (self.up_action, self.down_action, self.remove_action):
            self.list.addAction(action)
        mv.addWidget(self.list, 1)
        self.problems_label = QLabel()
        self.problems_label.setObjectName("pipeline-problems")
        self.problems_label.setWordWrap(True)
        self.problems_label.setTextFormat(Qt.TextFormat.PlainText)
        self.problems_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        mv.addWidget(self.problems_label)
        splitter.addWidget(middle)

        # parameters
        right = QWidget()
        rv = QVBoxLayout(right)
        rv.setContentsMargins(0, 0, 0, 0)
        self.params_heading = self._heading("Parameters")
        rv.addWidget(self.params_heading)
        self.description_label = QLabel()
        self.description_label.setWordWrap(True)
        self.description_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        rv.addWidget(self.description_label)
        self.form_area = QScrollArea()
        self.form_area.setWidgetResizable(True)
        self.form_area.setFrameShape(QFrame.Shape.NoFrame)
        rv.addWidget(self.form_area, 1)
        splitter.addWidget(right)

        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        splitter.setStretchFactor(2, 1)
        splitter.setSizes([max(330, self.palette_view.minimumWidth()), 440, 480])

    @staticmethod
    def _heading(text: str) -> QLabel:
        label = QLabel(text)
        font = label.font()
        font.setBold(True)
        font.setPointSizeF(font.pointSizeF() * 1.1)
        label.setFont(font)
        return label

    # ---------------------------------------------------------------------------- model -> view

    def _rebuild(self, select: int | None) -> None:
        """Refill the list from the pipeline model (a handful of rows: cheaper than patching)."""
        techniques = _registry()
        self.list.blockSignals(True)
        self.list.clear()
        for i in range(len(self.pipeline)):
            step = self.pipeline.step(i)
            cls = techniques.get(step.technique)
            title = cls.title if cls is not None else step.technique
            kinds = f"{cls.input_kind} -> {cls.output_kind}" if cls is not None else "?"
            item = QListWidgetItem(f"{i + 1}. {title}  ({step.technique}, {kinds})")
            item.setData(TITLE_ROLE, title)
            item.setData(ID_ROLE, step.technique)
            item.setData(KINDS_ROLE, kinds)
            item.setFlags(
                Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsDragEnabled
            )
            self.list.addItem(item)
        if select is not None and 0 <= select < self.list.count():
            self.list.setCurrentRow(select)
        self.list.blockSignals(False)
        self._refresh_problems()
        self._selection_changed(self.list.currentRow())

    # ---------------------------------------------------------------------------- the open model

    def _on_model_changed(self) -> None:
        """A new model: check at once what needs no structure, and the heads / layer names the steps give
        once its structure is known (`model_layout` imports the architecture: seconds the first time)."""
        from studio.gui.widgets import run_task
        from studio.recipe_check import model_layout

        self._layout = None
        model = self.document.model
        self._layout_task = None
        if model is not None:
            self._layout_task = run_task(
                lambda: model_layout(model), on_done=self._on_layout, on_error=self._on_layout_error
            )
        self._refresh_problems()

    def _on_layout(self, token: int, layout: Any) -> None:
        if self._layout_task is None or token != self._layout_task.token:
            return  # the answer for a model that is no longer open
        self._layout_task = None
        self._layout = layout
        self._refresh_problems()
        self.model_checked.emit()

    def _on_layout_error(self, token: int, _message: str) -> None:
        from studio.recipe_check import UNKNOWN

        self._on_layout(token, UNKNOWN)

    @property
    def checking_model(self) -> bool:
        """The open model's structure is still being read: heads and layer names are not checked yet."""
        return self._layout_task is not None

    def _refresh_problems(self) -> None:
        from studio.recipe_check import UNKNOWN

        try:
            self._problems = self.pipeline.problems(
                self.document.start_kind(), self.document.model, self._layout or UNKNOWN
            )
        except Exception as exc:  # a broken technique must not take the editor down
            self._problems = {-1: f"could not check the pipeline: {exc}"}
        techniques = _registry()
        warn = self.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning)
        for i in range(self.list.count()):
            item = self.list.item(i)
            problem = self._problems.get(i)
            item.setData(PROBLEM_ROLE, problem)
            item.setIcon(warn if problem else QIcon())
            cls = techniques.get(item.data(ID_ROLE))
            if problem:
                item.setToolTip(problem)
            else:
                item.setToolTip(cls.description if cls is not None else "")
        self.list.doItemsLayout()  # rows with a problem are taller
        self.list.viewport().update()
        pal = self.problems_label.palette()
        if self._problems:
            lines = [f"⚠ {self._problems[i]}" for i in sorted(self._problems)]
            if len(lines) > MAX_PROBLEM_LINES:  # the rest are on their steps (marker and tooltip)
                lines = [*lines[: MAX_PROBLEM_LINES - 1], f"… and {len(lines) - MAX_PROBLEM_LINES + 1} more"]
            self.problems_label.setText("\n".join(lines))
            self.problems_label.setStyleSheet(f"color: {problem_color(pal).name()};")
        elif len(self.pipeline) and self.checking_model:
            self.problems_label.setText(f"Checking the pipeline against {self.document.source}…")
            self.problems_label.setStyleSheet("")
        elif len(self.pipeline):
            first = self.document.start_kind()
            last = techniques[self.pipeline.step(len(self.pipeline) - 1).technique].output_kind
            on = f" on {self.document.source}" if self.document.source else ""
            self.problems_label.setText(f"✓ Ready to run{on}: {first} model -> {last} model")
            self.problems_label.setStyleSheet("color: #2e7d32;" if not _is_dark(pal) else "color: #a5d6a7;")
        else:
            self.problems_label.setText("")
        self._update_actions()
        self._update_title()

    def problems(self) -> dict[int, str]:
        """The problems shown now, by step index."""
        return dict(self._problems)

    def _update_actions(self) -> None:
        row = self.list.currentRow()
        self.remove_action.setEnabled(row >= 0)
        self.up_action.setEnabled(row > 0)
        self.down_action.setEnabled(0 <= row < self.list.count() - 1)

    def _undo_text_changed(self, text: str) -> None:
        self.undo_action.setToolTip(f"Undo {text}" if text else "Nothing to undo")

    def _redo_text_changed(self, text: str) -> None:
        self.redo_action.setToolTip(f"Redo {text}" if text else "Nothing to redo")

    def _clean_changed(self, clean: bool) -> None:
        self._update_title(clean)

    def _update_title(self, clean: bool | None = None) -> None:
        if clean is None:
            clean = self.document.undo_stack.isClean()
        path = self.document.recipe_path
        name = path.name if path else "unsaved"
        dirty = "" if clean else " •"
        self.pipeline_heading.setText(f"Pipeline — {name}{dirty}")
        self.pipeline_heading.setToolTip(str(path) if path else "")

    def _on_added(self, index: int) -> None:
        self._rebuild(select=index)

    def _on_moved(self, _src: int, dst: int) -> None:
        self._form_row = None
        self._rebuild(select=dst)

    def _on_removed(self, index: int) -> None:
        self._form_row = None
        self._rebuild(select=min(index, len(self.pipeline) - 1) if len(self.pipeline) else None)

    def _on_reset(self) -> None:
        self._form_row = None
        self._rebuild(select=0 if len(self.pipeline) else None)

    def _on_params_changed(self, index: int) -> None:
        self._refresh_problems()
        if index == self._form_row and self._form is not None:
            params = self.pipeline.step(index).params
            if self._form.values() != params:  # undo/redo or an outside change: show it
                self._form.set_values(params)

    def _selection_changed(self, row: int) -> None:
        self._update_actions()
        if row == self._form_row and self._form is not None:
            return
        self._form_row = row if row >= 0 else None
        old = self.form_area.takeWidget()
        if old is not None:
            old.deleteLater()
        self._form = None
        if row < 0 or row >= len(self.pipeline):
            self.params_heading.setText("Parameters")
            self.description_label.setText(
                "Select a step to edit its parameters." if len(self.pipeline) else ""
            )
            return
        step = self.pipeline.step(row)
        cls = _registry().get(step.technique)
        if cls is None:
            self.params_heading.setText(f"Step {row + 1}: {step.technique}")
            self.description_label.setText("Unknown technique: remove this step.")
            return
        self.params_heading.setText(f"Step {row + 1}: {cls.title}")
        self.description_label.setText(cls.description)
        holder = QWidget()
        hv = QVBoxLayout(holder)
        hv.setContentsMargins(0, 4, 8, 0)
        form = ParamForm(cls.Params, step.params)
        form.params_edited.connect(self._params_edited)
        hv.addWidget(form)
        hv.addStretch(1)
        self.form_area.setWidget(holder)
        self._form = form

    @property
    def param_form(self) -> ParamForm | None:
        """The form of the selected step (None when nothing is selected)."""
        return self._form

    # ---------------------------------------------------------------------------- view -> document

    def _params_edited(self, params: dict[str, Any]) -> None:
        if self._form_row is not None and self._form_row < len(self.pipeline):
            self.document.set_params(self._form_row, params)

    def _technique_dropped(self, technique_id: str, row: int) -> None:
        if technique_id not in _registry():
            self.show_error(f"Unknown technique '{technique_id}'")
            return
        self.document.add_step(technique_id, index=max(0, min(row, len(self.pipeline))))

    def _step_dropped(self, source: int, row: int) -> None:
        if not 0 <= source < len(self.pipeline):
            return
        dst = row if row <= source else row - 1
        dst = max(0, min(dst, len(self.pipeline) - 1))
        if dst != source:
            self.document.move_step(source, dst)

    def select_step(self, index: int) -> None:
        self.list.setCurrentRow(index)

    def remove_selected(self) -> None:
        row = self.list.currentRow()
        if 0 <= row < len(self.pipeline):
            self.document.remove_step(row)

    def _move_selected(self, delta: int) -> None:
        row = self.list.currentRow()
        dst = row + delta
        if 0 <= row < len(self.pipeline) and 0 <= dst < len(self.pipeline):
            self.document.move_step(row, dst)

    # ---------------------------------------------------------------------------- files

    def show_error(self, message: str) -> None:
        """Show (or, with "", hide) the editor's error banner; errors are never raised to the caller."""
        self.last_error = message
        self.error_label.setText(message)
        self.error_banner.setVisible(bool(message))

    def _start_dir(self) -> str:
        if self.document.recipe_path is not None:
            return str(self.document.recipe_path)
        return str(Path.home())

    def save(self) -> bool:
        """Save to the pipeline's file, asking for one the first time."""
        if self.document.recipe_path is None:
            return self.save_as()
        return self.save_to(self.document.recipe_path)

    def save_as(self) -> bool:
        path, _ = QFileDialog.getSaveFileName(self, "Save pipeline", self._start_dir(), RECIPE_FILTER)
        if not path:
            return False
        if not Path(path).suffix:
            path += ".yaml"
        return self.save_to(path)

    def open_dialog(self) -> bool:
        path, _ = QFileDialog.getOpenFileName(self, "Open pipeline", self._start_dir(), RECIPE_FILTER)
        return self.open_from(path) if path else False

    def save_to(self, path: str | Path) -> bool:
        """Write the recipe YAML (`Recipe.to_yaml()`, what `model-studio run` reads) atomically."""
        path = Path(path)
        try:
            data = self.document.recipe().to_yaml().encode("utf-8")
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except (OSError, ValueError) as exc:
            self.show_error(f"Could not save the pipeline to {path}: {exc}")
            return False
        self.document.recipe_path = path
        self.document.undo_stack.setClean()
        self.show_error("")
        self._update_title()
        self.document.status.emit(f"Saved pipeline to {path}")
        self.saved.emit(str(path))
        return True

    def ask_model(self, recipe_model: str, open_model: str) -> str | None:
        """A pipeline names another model than the open one: "recipe" (open its model), "open" (apply it
        to the open model) or None (do not open it). Asked, never decided silently; tests replace this."""
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle("Which model?")
        box.setText(f"This pipeline was made for <b>{recipe_model}</b>; <b>{open_model}</b> is open.")
        box.setInformativeText(
            "Apply the pipeline to the open model, or open the pipeline's model? Head and layer names in "
            "the steps are checked against the model you choose."
        )
        keep = box.addButton(f"Use {_short(open_model)}", QMessageBox.ButtonRole.AcceptRole)
        other = box.addButton(f"Open {_short(recipe_model)}", QMessageBox.ButtonRole.ActionRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(keep)
        box.exec()
        clicked = box.clickedButton()
        return "open" if clicked is keep else "recipe" if clicked is other else None

    def open_from(self, path: str | Path) -> bool:
        """Open a recipe file; its model is opened too when it is not the one open now."""
        from studio.errors import StudioError
        from studio.pipeline import load_recipe

        path = Path(path)
        try:
            recipe = load_recipe(path)
        except StudioError as exc:
            self.show_error(f"Could not open the pipeline: {exc.message}")
            return False
        except Exception as exc:  # an unreadable file must not take the window down
            self.show_error(f"Could not open the pipeline {path}: {type(exc).__name__}: {exc}")
            return False
        note = ""
        current = self.document.source
        if current and recipe.model != current:
            choice = self.ask_model(recipe.model, current)
            if choice is None:
                self.document.status.emit(f"Did not open the pipeline {path}")
                return False
            if choice == "open":
                recipe = recipe.model_copy(update={"model": current, "trust": self.pipeline.recipe.trust})
                self.document.status.emit(f"The pipeline now applies to {current}")
            elif not self.document.open_model(recipe.model, trust=recipe.trust):
                note = (
                    f"The pipeline was opened, but its model '{recipe.model}' could not be opened;"
                    f" it now applies to {self.document.source or 'no model'}."
                )
        self.document.load_recipe(recipe, path)
        self.document.undo_stack.setClean()
        self.show_error(note)
        self._update_title()
        self.document.status.emit(f"Opened pipeline {path}")
        self.opened.emit(str(path))
        return True
