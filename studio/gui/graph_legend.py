"""The legend of the Graph tab's colours: a ramp for numbers (time share, error, values from a file) or
named categories (precision, diff marks), drawn on a card in a canvas's corner and in exported images."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PySide6.QtCore import QPointF, QRectF, QSize, QSizeF, Qt
from PySide6.QtGui import QBrush, QColor, QFont, QFontMetricsF, QLinearGradient, QPainter, QPen
from PySide6.QtWidgets import QWidget

# A ramp from pale yellow to dark red (the YlOrRd scheme's ends and middle): low values stay quiet.
RAMP = (QColor(255, 245, 190), QColor(253, 150, 70), QColor(180, 20, 40))


def ramp_color(t: float) -> QColor:
    """The ramp's colour at t in 0..1."""
    t = min(1.0, max(0.0, t if math.isfinite(t) else 0.0))
    low, high, u = (RAMP[0], RAMP[1], t * 2) if t < 0.5 else (RAMP[1], RAMP[2], t * 2 - 1)
    return QColor(
        round(low.red() + (high.red() - low.red()) * u),
        round(low.green() + (high.green() - low.green()) * u),
        round(low.blue() + (high.blue() - low.blue()) * u),
    )


@dataclass
class Legend:
    """What the colours mean: a ramp from `low` to `high` (numbers formatted by `fmt`, with the unit in the
    title), or named categories."""

    title: str
    low: float = 0.0
    high: float = 1.0
    fmt: str = "{:.3g}"
    categories: list[tuple[str, QColor]] = field(default_factory=list)

    @property
    def is_ramp(self) -> bool:
        return not self.categories

    def color(self, value: float) -> QColor:
        span = self.high - self.low
        # all values equal (a model against itself: every error 0) is the quiet end, not an alarm
        return ramp_color((value - self.low) / span if span > 0 else 0.0)


LEGEND_PAD = 8.0
RAMP_SIZE = QSizeF(220.0, 14.0)


def legend_size(legend: Legend, font: QFont) -> QSizeF:
    fm = QFontMetricsF(font)
    line = fm.height()
    if legend.is_ramp:
        width = max(RAMP_SIZE.width(), fm.horizontalAdvance(legend.title))
        return QSizeF(width + 2 * LEGEND_PAD, 3 * line + RAMP_SIZE.height() + 2 * LEGEND_PAD)
    widest = max(
        [fm.horizontalAdvance(legend.title)] + [fm.horizontalAdvance(n) + 22 for n, _ in legend.categories]
    )
    return QSizeF(widest + 2 * LEGEND_PAD, line * (1.4 + 1.25 * len(legend.categories)) + 2 * LEGEND_PAD)


def paint_legend(painter: QPainter, origin: QPointF, legend: Legend, font: QFont) -> QRectF:
    """Draw the legend with its top-left at `origin` (on a white card, so it reads on any background);
    the rectangle it covers."""
    size = legend_size(legend, font)
    rect = QRectF(origin, size)
    fm = QFontMetricsF(font)
    line = fm.height()
    painter.save()
    painter.setFont(font)
    painter.setPen(QPen(QColor(150, 150, 150), 1))
    painter.setBrush(QColor(255, 255, 255, 235))
    painter.drawRoundedRect(rect, 4, 4)
    painter.setPen(QColor(20, 20, 20))
    x, y = rect.left() + LEGEND_PAD, rect.top() + LEGEND_PAD
    painter.drawText(QPointF(x, y + fm.ascent()), legend.title)
    y += line * 1.4
    if legend.is_ramp:
        bar = QRectF(QPointF(x, y), RAMP_SIZE)
        gradient = QLinearGradient(bar.topLeft(), bar.topRight())
        for stop in range(11):
            gradient.setColorAt(stop / 10, ramp_color(stop / 10))
        painter.setPen(QPen(QColor(120, 120, 120), 1))
        painter.setBrush(QBrush(gradient))
        painter.drawRect(bar)
        painter.setPen(QColor(20, 20, 20))
        ticks = [legend.low, (legend.low + legend.high) / 2, legend.high]
        for i, value in enumerate(ticks):
            text = legend.fmt.format(value)
            tx = bar.left() + bar.width() * i / 2 - fm.horizontalAdvance(text) * i / 2
            painter.drawLine(
                QPointF(bar.left() + bar.width() * i / 2, bar.bottom()),
                QPointF(bar.left() + bar.width() * i / 2, bar.bottom() + 4),
            )
            painter.drawText(QPointF(tx, bar.bottom() + 4 + fm.ascent()), text)
    else:
        for name, color in legend.categories:
            swatch = QRectF(x, y + (line - 12) / 2, 14, 12)
            painter.setPen(QPen(color.darker(140), 1))
            painter.setBrush(color)
            painter.drawRect(swatch)
            painter.setPen(QColor(20, 20, 20))
            painter.drawText(QPointF(x + 22, y + fm.ascent()), name)
            y += line * 1.25
    painter.restore()
    return rect


class LegendWidget(QWidget):
    """The legend floating in a canvas's top-left corner (hidden when there is nothing to explain)."""

    def __init__(self, parent: QWidget) -> None:
        super().__init__(parent)
        self.legend: Legend | None = None
        self.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
        self.hide()

    def set_legend(self, legend: Legend | None) -> None:
        self.legend = legend
        if legend is None:
            self.hide()
            return
        size = legend_size(legend, self.font())
        self.resize(QSize(math.ceil(size.width()) + 2, math.ceil(size.height()) + 2))
        self.move(8, 8)
        self.show()
        self.raise_()
        self.update()

    def paintEvent(self, _event: object) -> None:
        if self.legend is None:
            return
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        paint_legend(painter, QPointF(0.5, 0.5), self.legend, self.font())
        painter.end()
