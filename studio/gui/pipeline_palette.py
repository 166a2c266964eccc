"""The palette of technique blocks: every registered technique, grouped by category, dragged or activated.

A drag carries the technique id in a MIME type of our own (`TECHNIQUE_MIME`), plain text too for text
editors; a technique that is not available here (a missing package, no GPU) is shown greyed out with the
reason in its tooltip and cannot be dragged.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QMimeData, QPoint, Qt, Signal
from PySide6.QtGui import QDrag, QFont, QKeyEvent, QPalette
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTreeWidget, QTreeWidgetItem, QWidget

TECHNIQUE_MIME = "application/x-model-studio-technique"
ID_ROLE = Qt.ItemDataRole.UserRole + 1  # the technique id, on palette items and on pipeline steps

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


def technique_classes() -> dict[str, Any]:
    """Technique classes by id, read on first use: the registry imports every technique module."""
    from studio.techniques.base import registry

    return registry()


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
        techniques = technique_classes()
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
