"""One row of the run panel's step list: a step's title, its progress bar, and its latest message below.

The bar only moves forward (a late progress event of an earlier phase never pulls it back) and says so in
red when the step failed, in grey when the person cancelled before it finished.
"""

from __future__ import annotations

from PySide6.QtGui import QFont
from PySide6.QtWidgets import QGridLayout, QLabel, QProgressBar, QSizePolicy


class StepRow:
    """One step: its title and progress bar, with the step's latest message in small text below."""

    def __init__(self, grid: QGridLayout, row: int, title: str, tooltip: str = "") -> None:
        self.title = QLabel(title)
        self.title.setToolTip(tooltip or title)
        self.bar = QProgressBar()
        self.bar.setRange(0, 100)
        self.bar.setValue(0)
        self.bar.setTextVisible(True)
        self.bar.setMinimumWidth(120)
        self.message = QLabel()
        self.message.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        font = QFont(self.message.font())
        font.setPointSizeF(font.pointSizeF() * 0.9)
        self.message.setFont(font)
        self.message.setStyleSheet("color: palette(placeholder-text);")
        grid.addWidget(self.title, 2 * row, 0)
        grid.addWidget(self.bar, 2 * row, 1)
        grid.addWidget(self.message, 2 * row + 1, 1)

    def set(self, fraction: float, message: str | None = None) -> None:
        self.bar.setValue(max(self.bar.value(), round(max(0.0, min(1.0, fraction)) * 100)))
        if message is not None:
            self.message.setText(message)
            self.message.setToolTip(message)

    def _restyle(self, color: str) -> None:
        # a style sheet on ::chunk alone switches the bar to the style-sheet look at a smaller height: keep
        # the height of its neighbours and give the whole bar a frame
        self.bar.setFixedHeight(self.bar.sizeHint().height())
        self.bar.setStyleSheet(
            f"QProgressBar {{ border: 1px solid {color}; border-radius: 3px; text-align: center; }}"
            f"QProgressBar::chunk {{ background: {color}; }}"
        )

    def mark_failed(self) -> None:
        self._restyle("#d32f2f")
        self.bar.setFormat("failed at %p%")

    def mark_cancelled(self) -> None:
        """A row the run did not finish because the user cancelled: grey, and says so."""
        if self.bar.value() >= 100:
            return
        self._restyle("#9e9e9e")
        self.bar.setFormat("cancelled at %p%" if self.bar.value() else "cancelled")
        self.message.setText("cancelled")

    def remove(self) -> None:
        for w in (self.title, self.bar, self.message):
            w.setParent(None)
            w.deleteLater()
