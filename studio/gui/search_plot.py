"""The Search view's scatter: every finished trial as a point (objective 1 against objective 2), the
infeasible ones as grey crosses, and the Pareto front of the feasible ones as a step line.

A click on a point asks the view to select that trial (`trial_clicked`, its number); the selected trial is
ringed. With a single objective the x axis is the trial number.
"""

from __future__ import annotations

import re

import pyqtgraph as pg
from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QColor

from studio.gui.widgets import add_plot_export_action, fmt, plot_colors, style_legend, style_plot
from studio.search_progress import SearchProgress, TrialProgress

_LATENCY = re.compile(r"^latency_ms\.b(\d+)\.(\w+)$")
_THROUGHPUT = re.compile(r"^throughput_per_s\.b(\d+)$")
INFEASIBLE_COLOR = QColor(140, 140, 140)
FRONT_COLOR = QColor(220, 110, 0)


def axis_label(metric: str, direction: str | None = None) -> str:
    """A metric name as an axis title with its unit: latency_ms.b1.p50 -> 'latency b1 p50 (ms)'."""
    if match := _LATENCY.match(metric):
        text = f"latency b{match.group(1)} {match.group(2)} (ms)"
    elif match := _THROUGHPUT.match(metric):
        text = f"throughput b{match.group(1)} (items/s)"
    elif metric == "size_mb":
        text = "size (MB)"
    elif metric == "peak_memory_mb":
        text = "peak memory (MB)"
    elif metric.startswith("quality."):
        text = metric.removeprefix("quality.").replace("_", " ")
    else:
        text = metric
    if direction is not None:
        text += ", higher is better" if direction == "maximize" else ", lower is better"
    return text


def front_steps(points: list[tuple[float, float]], directions: tuple[str, str]) -> tuple[list, list]:
    """The staircase through the front's points: sorted best-x first, each step goes across at the last
    point's y and then to the next point, so the line bounds the region the front dominates."""
    ordered = sorted(points, key=lambda p: -p[0] if directions[0] == "maximize" else p[0])
    xs: list[float] = []
    ys: list[float] = []
    for i, (x, y) in enumerate(ordered):
        if i:
            xs.append(x)
            ys.append(ys[-1])
        xs.append(x)
        ys.append(y)
    return xs, ys


class SearchPlot(QObject):
    trial_clicked = Signal(int)  # a trial's number

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.plot = pg.PlotWidget()
        self.progress: SearchProgress | None = None
        self.selected: int | None = None
        colors = plot_colors()
        item = self.plot.getPlotItem()
        item.setTitle("Trials (click a point to select its trial)")
        item.showGrid(x=True, y=True, alpha=0.15)
        for name in ("left", "bottom"):
            item.getAxis(name).enableAutoSIPrefix(False)
        # one row across the top, over the band `_fit` keeps free of points
        self.legend = item.addLegend(offset=(10, 5), labelTextSize="9pt", colCount=5)
        self.front_line = pg.PlotDataItem([], [], pen=pg.mkPen(FRONT_COLOR, width=2), name="Pareto front")
        item.addItem(self.front_line)
        self.points = pg.ScatterPlotItem(
            size=11,
            symbol="o",
            pen=pg.mkPen(colors["bars"], width=1.2),
            brush=colors["bars_fill"],
            hoverable=True,
            tip=self._tip,
            name="feasible trial",
        )
        self.infeasible = pg.ScatterPlotItem(
            size=11,
            symbol="x",
            pen=pg.mkPen(INFEASIBLE_COLOR, width=1),
            brush=pg.mkBrush(INFEASIBLE_COLOR),
            hoverable=True,
            tip=self._tip,
            name="infeasible (a constraint broken)",
        )
        self.front_points = pg.ScatterPlotItem(
            size=12,
            symbol="o",
            pen=pg.mkPen(FRONT_COLOR.darker(130), width=1.2),
            brush=pg.mkBrush(FRONT_COLOR),
            hoverable=True,
            tip=self._tip,
            name="on the front",
        )
        self.highlight = pg.ScatterPlotItem(
            size=20, pen=pg.mkPen(colors["mean"], width=2.5), brush=None, name="selected"
        )
        self.highlight.setZValue(5)
        self.scatters = (self.points, self.front_points, self.infeasible)
        for scatter in (*self.scatters, self.highlight):
            item.addItem(scatter)
        for scatter in self.scatters:
            scatter.sigClicked.connect(self._clicked)
        style_legend(self.legend)
        add_plot_export_action(self.plot, self.plot, "search")

    def apply_theme(self) -> None:
        style_plot(self.plot)

    # ---------------------------------------------------------------------------- drawing

    def _xy(self, trial: TrialProgress) -> tuple[float, float]:
        assert trial.values is not None
        if len(trial.values) == 1:
            return float(trial.number), trial.values[0]
        return trial.values[0], trial.values[1]

    def show(self, progress: SearchProgress) -> None:
        self.progress = progress
        item = self.plot.getPlotItem()
        names, dirs = progress.objectives, progress.directions
        if len(names) == 1:
            item.setLabel("bottom", "trial")
            item.setLabel("left", axis_label(names[0], dirs[0]))
        elif len(names) >= 2:
            item.setLabel("bottom", axis_label(names[0], dirs[0]))
            item.setLabel("left", axis_label(names[1], dirs[1]))
        done = [t for t in progress.trials if t.values is not None]
        on = set(progress.pareto)
        for scatter, trials in (
            (self.points, [t for t in done if t.feasible and t.number not in on]),
            (self.front_points, [t for t in done if t.number in on]),
            (self.infeasible, [t for t in done if not t.feasible]),
        ):
            spots = [{"pos": self._xy(t), "data": t.number} for t in trials]
            scatter.setData(spots=spots)
        front = [self._xy(t) for t in progress.front]
        if len(dirs) < 2:  # one objective (or none yet): the front is the best trials in trial order
            front = sorted(front)
            xs, ys = [p[0] for p in front], [p[1] for p in front]
        else:
            xs, ys = front_steps(front, (dirs[0], dirs[1]))
        self.front_line.setData(xs, ys)
        self._fit([self._xy(t) for t in done])
        self.select(self.selected)

    def _fit(self, points: list[tuple[float, float]]) -> None:
        """Every point in view with a margin, and a free band at the top for the legend."""
        if not points:
            return
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        dx = (max(xs) - min(xs)) or abs(max(xs)) or 1.0
        dy = (max(ys) - min(ys)) or abs(max(ys)) or 1.0
        box = self.plot.getPlotItem().getViewBox()
        box.setRange(
            xRange=(min(xs) - 0.06 * dx, max(xs) + 0.06 * dx),
            yRange=(min(ys) - 0.08 * dy, max(ys) + 0.3 * dy),
            padding=0,
        )

    def select(self, number: int | None) -> None:
        self.selected = number
        trial = self.trial(number)
        if trial is None or trial.values is None:
            self.highlight.setData([], [])
        else:
            x, y = self._xy(trial)
            self.highlight.setData([x], [y])

    def trial(self, number: int | None) -> TrialProgress | None:
        if self.progress is None or number is None:
            return None
        return next((t for t in self.progress.trials if t.number == number), None)

    def point_count(self) -> int:
        return sum(len(scatter.data) for scatter in self.scatters)

    def front_numbers(self) -> list[int]:
        """The trials the drawn front line passes through, read back from the line (its corners are not
        trials), in the line's order."""
        xs, ys = self.front_line.getData()
        if xs is None or self.progress is None:
            return []
        step = 1 if len(self.progress.objectives) == 1 else 2
        at = {self._xy(t): t.number for t in self.progress.trials if t.values is not None}
        return [at[(float(x), float(y))] for x, y in zip(xs[::step], ys[::step], strict=True)]

    # ---------------------------------------------------------------------------- interaction

    def _clicked(self, _item: pg.ScatterPlotItem, spots: list, *_args: object) -> None:
        if len(spots):
            self.trial_clicked.emit(int(spots[0].data()))

    def _tip(self, x: float, y: float, data: object) -> str:
        trial = self.trial(int(data))  # type: ignore[call-overload]
        if trial is None:
            return ""
        names = self.progress.objectives if self.progress else ()
        values = "\n".join(
            f"{axis_label(n)}: {fmt(v)}" for n, v in zip(names, trial.values or (), strict=False)
        )
        params = "\n".join(f"{k} = {v}" for k, v in trial.params.items())
        return f"trial {trial.number} ({trial.state})\n{values}\n{params}\nvariant {trial.variant or '-'}"
