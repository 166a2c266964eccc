"""Small pieces the views share: the light/dark theme, off-thread tasks, plot and table export, banners.

Views stay passive: long work goes through `run_task` (a QRunnable on a thread pool whose results come
back as queued signals on the GUI thread), and a view keeps only the newest task's result, so a result
that arrives after the selection moved on is dropped instead of painted over newer state.
"""

from __future__ import annotations

import csv
import itertools
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pyqtgraph as pg
from PySide6.QtCore import QObject, QRunnable, QSettings, Qt, QThreadPool, Signal
from PySide6.QtGui import QAction, QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QWidget,
)

from studio.errors import Cancelled, StudioError

THEMES = ("system", "light", "dark")

# ------------------------------------------------------------------------------------------------ theme


def dark_palette() -> QPalette:
    """A Fusion dark palette, for platforms that report a dark scheme but do not supply one (and for the
    explicit View > Theme > Dark choice)."""
    p = QPalette()
    window, base, text = QColor(45, 45, 48), QColor(30, 30, 32), QColor(230, 230, 230)
    disabled = QColor(130, 130, 130)
    p.setColor(QPalette.ColorRole.Window, window)
    p.setColor(QPalette.ColorRole.WindowText, text)
    p.setColor(QPalette.ColorRole.Base, base)
    p.setColor(QPalette.ColorRole.AlternateBase, QColor(40, 40, 43))
    p.setColor(QPalette.ColorRole.ToolTipBase, QColor(60, 60, 64))
    p.setColor(QPalette.ColorRole.ToolTipText, text)
    p.setColor(QPalette.ColorRole.PlaceholderText, disabled)
    p.setColor(QPalette.ColorRole.Text, text)
    p.setColor(QPalette.ColorRole.Button, window)
    p.setColor(QPalette.ColorRole.ButtonText, text)
    p.setColor(QPalette.ColorRole.BrightText, QColor(255, 90, 90))
    p.setColor(QPalette.ColorRole.Link, QColor(100, 170, 255))
    p.setColor(QPalette.ColorRole.Highlight, QColor(42, 110, 200))
    p.setColor(QPalette.ColorRole.HighlightedText, QColor(255, 255, 255))
    p.setColor(QPalette.ColorRole.Mid, QColor(70, 70, 74))
    p.setColor(QPalette.ColorRole.Dark, QColor(25, 25, 27))
    p.setColor(QPalette.ColorRole.Light, QColor(80, 80, 84))
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText, QPalette.ColorRole.WindowText):
        p.setColor(QPalette.ColorGroup.Disabled, role, disabled)
    return p


def theme_setting() -> str:
    value = str(QSettings().value("theme", "system") or "system")
    return value if value in THEMES else "system"


def system_is_dark() -> bool:
    app = QGuiApplication.instance()
    if app is None:
        return False
    scheme = QGuiApplication.styleHints().colorScheme()
    if scheme == Qt.ColorScheme.Dark:
        return True
    if scheme == Qt.ColorScheme.Light:
        return False
    return QGuiApplication.palette().color(QPalette.ColorRole.Window).lightness() < 128


def apply_theme(app: QApplication, theme: str | None = None) -> bool:
    """Apply `theme` ("system", "light", "dark"; default: the saved choice) to the app and pyqtgraph.

    Returns whether the result is dark. "system" follows Qt 6's QStyleHints.colorScheme(); the Fusion
    style is used everywhere so both palettes look the same on every platform.
    """
    theme = theme or theme_setting()
    if app.style().name().lower() != "fusion":
        app.setStyle("Fusion")
    if theme == "system":
        dark = QGuiApplication.styleHints().colorScheme() == Qt.ColorScheme.Dark
        palette = app.style().standardPalette()
        if dark and palette.color(QPalette.ColorRole.Window).lightness() >= 128:
            palette = dark_palette()  # the platform says dark but gives no dark palette
    else:
        dark = theme == "dark"
        palette = dark_palette() if dark else app.style().standardPalette()
    app.setPalette(palette)
    configure_pyqtgraph(dark)
    return dark


def is_dark() -> bool:
    return QGuiApplication.palette().color(QPalette.ColorRole.Window).lightness() < 128


def plot_colors(dark: bool | None = None) -> dict[str, Any]:
    """Colours used by every plot, so light and dark screenshots read the same way."""
    dark = is_dark() if dark is None else dark
    if dark:
        return {
            "background": QColor(30, 30, 32),
            "foreground": QColor(220, 220, 220),
            "bars": QColor(90, 160, 240),
            "bars_fill": QColor(90, 160, 240, 150),
            "mean": QColor(255, 170, 60),
            "std": QColor(255, 170, 60),
            "grid": QColor(230, 90, 90, 45),
            "band": QColor(230, 90, 90, 22),
            "mask": QColor(255, 80, 80),
            "text": QColor(230, 230, 230),
        }
    return {
        "background": QColor(255, 255, 255),
        "foreground": QColor(40, 40, 40),
        "bars": QColor(30, 100, 200),
        "bars_fill": QColor(30, 100, 200, 130),
        "mean": QColor(220, 110, 0),
        "std": QColor(220, 110, 0),
        "grid": QColor(200, 40, 40, 40),
        "band": QColor(200, 40, 40, 16),
        "mask": QColor(220, 20, 20),
        "text": QColor(30, 30, 30),
    }


def configure_pyqtgraph(dark: bool) -> None:
    colors = plot_colors(dark)
    pg.setConfigOptions(
        background=colors["background"],
        foreground=colors["foreground"],
        antialias=True,
        imageAxisOrder="row-major",
    )


def style_plot(plot: pg.PlotWidget, dark: bool | None = None) -> None:
    """Re-colour an existing plot after a theme change (pyqtgraph's config only affects new plots)."""
    colors = plot_colors(dark)
    plot.setBackground(colors["background"])
    item = plot.getPlotItem()
    for name in ("left", "bottom", "right", "top"):
        style_axis(item.getAxis(name), dark)
    item.titleLabel.setText(item.titleLabel.text, color=colors["foreground"].name())
    if item.legend is not None:
        style_legend(item.legend, dark)


def style_axis(axis: pg.AxisItem, dark: bool | None = None) -> None:
    foreground = plot_colors(dark)["foreground"]
    axis.setPen(foreground)
    axis.setTextPen(foreground)


def histogram_curve(colors: dict[str, Any], name: str | None = None) -> pg.PlotDataItem:
    """The filled step curve the studio draws a weight histogram with (edges, then counts per bin)."""
    return pg.PlotDataItem(
        [0.0, 1.0],
        [0],
        stepMode="center",
        fillLevel=0,
        pen=pg.mkPen(colors["bars"], width=1),
        brush=colors["bars_fill"],
        name=name,
    )


def style_legend(legend: pg.LegendItem, dark: bool | None = None) -> None:
    """A legend box that stays readable over data: the plot background, slightly see-through."""
    colors = plot_colors(dark)
    background = QColor(colors["background"])
    background.setAlpha(215)
    legend.setBrush(pg.mkBrush(background))
    legend.setPen(pg.mkPen(colors["foreground"], width=0.5))
    legend.setLabelTextColor(colors["foreground"])
    for _sample, label in legend.items:
        label.setText(label.text, color=colors["foreground"].name())


# ------------------------------------------------------------------------------------------------ numbers


def human_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)}"


def fmt(value: float | None, spec: str = ".5g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


# ------------------------------------------------------------------------------------------------ tasks


class TaskSignals(QObject):
    """Emitted from the worker thread; Qt queues them to the receiver's (GUI) thread."""

    progress = Signal(int, float, str)  # token, fraction, message
    finished = Signal(int, object)  # token, result
    failed = Signal(int, str)  # token, message


class Task(QRunnable):
    """One function run on a thread pool. `progress(fraction, message)` is passed to the function when it
    accepts it; after `cancel()`, the next progress call raises `Cancelled`, so the work stops at its next
    checkpoint and `failed` reports "cancelled"."""

    _tokens = itertools.count(1)

    def __init__(self, fn: Callable[..., Any], *, with_progress: bool = False) -> None:
        super().__init__()
        self.setAutoDelete(False)  # owned by Python (kept in _LIVE until done), not by the pool
        self.fn = fn
        self.with_progress = with_progress
        self.token = next(self._tokens)
        self.signals = TaskSignals()
        self._cancel = threading.Event()
        self.done = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _progress(self, fraction: float, message: str = "") -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled")
        self.signals.progress.emit(self.token, float(fraction), str(message))

    def run(self) -> None:
        try:
            result = self.fn(self._progress) if self.with_progress else self.fn()
        except Cancelled:
            self.signals.failed.emit(self.token, "cancelled")
        except StudioError as exc:
            self.signals.failed.emit(self.token, exc.message)
        except Exception as exc:  # a bug in a view's work must not kill the window; say what happened
            self.signals.failed.emit(self.token, f"{type(exc).__name__}: {exc}")
        else:
            self.signals.finished.emit(self.token, result)
        finally:
            self.done.set()


# Tasks queued or running, by token. PySide drops a QRunnable's Python half when its last Python
# reference goes, so the pool would run an empty shell; each task stays here until its final signal
# has reached the GUI thread.
_LIVE: dict[int, Task] = {}


def live_tasks() -> int:
    return len(_LIVE)


def run_task(
    fn: Callable[..., Any],
    *,
    on_done: Callable[[int, Any], None],
    on_error: Callable[[int, str], None],
    on_progress: Callable[[int, float, str], None] | None = None,
    pool: QThreadPool | None = None,
    with_progress: bool = False,
) -> Task:
    task = Task(fn, with_progress=with_progress or on_progress is not None)
    task.signals.finished.connect(on_done)
    task.signals.failed.connect(on_error)
    if on_progress is not None:
        task.signals.progress.connect(on_progress)
    _LIVE[task.token] = task
    release = lambda *_args, token=task.token: _LIVE.pop(token, None)  # noqa: E731 (captures the token only)
    task.signals.finished.connect(release)
    task.signals.failed.connect(release)
    (pool or QThreadPool.globalInstance()).start(task)
    return task


def finish_tasks(timeout_ms: int = 30_000) -> None:
    """Cancel every task and wait for the pools, before the window goes at quit: a task still reading a
    model would otherwise emit into deleted Qt objects and print tracebacks on the way out."""
    for task in list(_LIVE.values()):
        task.cancel()
    pools = [QThreadPool.globalInstance()] + ([_POOL] if _POOL is not None else [])
    for pool in pools:
        pool.waitForDone(timeout_ms)


# ------------------------------------------------------------------------------------------------ export


def export_plot(plot: pg.PlotWidget, path: str | Path) -> Path:
    """Save a plot as PNG (twice the widget's size, for sharpness) or SVG, chosen by the suffix.

    SVG is written by Qt's QSvgGenerator rendering the widget: pyqtgraph 0.14's SVGExporter cannot parse
    the closed paths newer Qt versions emit (pyqtgraph issue #3495).
    """
    path = Path(path)
    if path.suffix.lower() == ".svg":
        from PySide6.QtCore import QPoint, QRect
        from PySide6.QtGui import QPainter
        from PySide6.QtSvg import QSvgGenerator

        generator = QSvgGenerator()
        generator.setFileName(str(path))
        generator.setSize(plot.size())
        generator.setViewBox(QRect(QPoint(0, 0), plot.size()))
        generator.setTitle(plot.getPlotItem().titleLabel.text or path.stem)
        generator.setDescription("exported from Model Studio")
        painter = QPainter(generator)
        try:
            plot.render(painter)
        finally:
            painter.end()
    else:
        from pyqtgraph import exporters

        item = plot.getPlotItem()
        exporter = exporters.ImageExporter(item)
        exporter.parameters()["width"] = max(800, int(item.sceneBoundingRect().width()) * 2)
        if not exporter.export(str(path)) and not path.exists():
            raise OSError(f"could not write {path}")
    return path


def table_rows(table: QTableWidget) -> list[list[str]]:
    header = [
        (table.horizontalHeaderItem(c).text() if table.horizontalHeaderItem(c) else f"column {c}")
        for c in range(table.columnCount())
    ]
    rows = [header]
    for r in range(table.rowCount()):
        rows.append(
            [(table.item(r, c).text() if table.item(r, c) else "") for c in range(table.columnCount())]
        )
    return rows


def export_table_csv(table: QTableWidget, path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(table_rows(table))
    return path


def add_plot_export_action(owner: QWidget, plot: pg.PlotWidget, name: str) -> QAction:
    """An "Export plot…" action on `owner`'s context menu (PNG or SVG)."""
    action = QAction("Export plot as PNG/SVG…", owner)

    def export() -> None:
        path, _ = QFileDialog.getSaveFileName(
            owner, "Export plot", f"{name}.png", "PNG image (*.png);;SVG image (*.svg)"
        )
        if path:
            export_plot(plot, path)

    action.triggered.connect(export)
    owner.addAction(action)
    owner.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
    return action


def add_table_export_action(table: QTableWidget, name: str) -> QAction:
    action = QAction("Export table as CSV…", table)

    def export() -> None:
        path, _ = QFileDialog.getSaveFileName(table, "Export table", f"{name}.csv", "CSV (*.csv)")
        if path:
            export_table_csv(table, path)

    action.triggered.connect(export)
    table.addAction(action)
    table.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
    return action


def make_table(headers: Sequence[str]) -> QTableWidget:
    """A read-only, selectable table with the given column headers."""
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(list(headers))
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.verticalHeader().setVisible(False)
    table.verticalHeader().setDefaultSectionSize(table.fontMetrics().height() + 6)
    table.setWordWrap(False)
    table.setAlternatingRowColors(True)
    table.horizontalHeader().setStretchLastSection(True)
    return table


def fill_table(table: QTableWidget, rows: Sequence[Sequence[Any]], align_right_from: int = 1) -> None:
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            item = QTableWidgetItem(str(value))
            item.setToolTip(str(value))
            if c >= align_right_from:
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            table.setItem(r, c, item)


_POOL: QThreadPool | None = None


def work_pool() -> QThreadPool:
    """The one thread the Compare tab and the export dialog load models on.

    Two models opened at once on two threads race in transformers' lazy imports (one thread is told the
    model class does not exist), and a replaced comparison still finishes its current part; one thread
    runs them in turn, and on a laptop's few cores nothing is lost.
    """
    global _POOL
    if _POOL is None:
        _POOL = QThreadPool()
        _POOL.setMaxThreadCount(1)
        _POOL.setObjectName("compare-work")
    return _POOL


# ------------------------------------------------------------------------------------------------ banners


class Banner(QFrame):
    """A dismissible message strip (errors, hints) shown inside the window instead of a modal dialog."""

    closed = Signal()

    STYLES: ClassVar[dict[str, tuple[str, str, str, str]]] = {
        "error": ("#f8d7da", "#721c24", "#5c1a22", "#ffd6db"),
        "info": ("#dbeafe", "#1e3a5f", "#1e3a5f", "#dbeafe"),
    }

    def __init__(self, kind: str = "error", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.kind = kind
        self.setObjectName(f"{kind}Banner")
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.close_button = QToolButton()
        self.close_button.setText("✕")
        self.close_button.setToolTip("Dismiss")
        self.close_button.setAutoRaise(True)
        self.close_button.clicked.connect(self.dismiss)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(10, 6, 6, 6)
        layout.addWidget(self.label, 1)
        layout.addWidget(self.close_button, 0, Qt.AlignmentFlag.AlignTop)
        self.restyle()
        self.hide()

    def restyle(self) -> None:
        light_bg, light_fg, dark_bg, dark_fg = self.STYLES[self.kind]
        bg, fg = (dark_bg, dark_fg) if is_dark() else (light_bg, light_fg)
        self.setStyleSheet(
            f"#{self.objectName()} {{ background: {bg}; border-radius: 4px; }} "
            f"#{self.objectName()} QLabel {{ color: {fg}; }}"
        )

    def show_message(self, text: str) -> None:
        self.label.setText(text)
        self.show()

    def text(self) -> str:
        return self.label.text()

    def dismiss(self) -> None:
        self.hide()
        self.closed.emit()
