"""A loss curve drawn in the terminal with braille dots: every step's loss (raw) and its EMA.

Braille characters give each terminal cell a 2×4 grid of dots, so an 60×10 cell plot has 120×40
"pixels": enough to see a trend and the noise around it. Raw losses are drawn as dots (a dense
run becomes a band showing the spread); the smoothed curve as a connected line on top.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

# Weight of the past in the exponential moving average (TensorBoard's default "smoothing").
SMOOTHING = 0.9

# Bit of each dot in a braille cell, indexed [row][column] (Unicode's dot numbering 1-8).
_DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
_BRAILLE_BLANK = 0x2800


def ema(values: Sequence[float], smoothing: float = SMOOTHING) -> list[float]:
    """The exponential moving average of ``values`` (same length; starts at the first value, so the
    early part is not pulled towards zero)."""
    out: list[float] = []
    average: float | None = None
    for value in values:
        average = value if average is None else smoothing * average + (1.0 - smoothing) * value
        out.append(average)
    return out


class BrailleCanvas:
    """A ``width``×``height`` cell canvas addressed in dots (2 per cell across, 4 down).

    Each dot is drawn on a layer; a cell takes the style of the highest layer drawn in it, so the
    smoothed line stays visible where it crosses the raw points.
    """

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self._bits = [[0] * width for _ in range(height)]
        self._layer = [[-1] * width for _ in range(height)]

    @property
    def dots_x(self) -> int:
        return self.width * 2

    @property
    def dots_y(self) -> int:
        return self.height * 4

    def dot(self, x: int, y: int, layer: int) -> None:
        """Set the dot at (x, y), y growing downwards; dots outside the canvas are ignored."""
        if not (0 <= x < self.dots_x and 0 <= y < self.dots_y):
            return
        row, col = y // 4, x // 2
        self._bits[row][col] |= _DOT_BITS[y % 4][x % 2]
        self._layer[row][col] = max(self._layer[row][col], layer)

    def line(self, x0: int, y0: int, x1: int, y1: int, layer: int) -> None:
        """A connected line from (x0, y0) to (x1, y1), x0 <= x1 (no gaps where it is steep)."""
        span = max(1, x1 - x0)
        previous = y0
        for x in range(x0, x1 + 1):
            y = round(y0 + (y1 - y0) * (x - x0) / span)
            low, high = sorted((previous, y))
            for yy in range(low, high + 1):
                self.dot(x, yy, layer)
            previous = y

    def rows(self, styles: Sequence[Style]) -> list[Text]:
        """One Text per cell row; ``styles[layer]`` styles a cell whose top layer is ``layer``."""
        out = []
        for bits_row, layer_row in zip(self._bits, self._layer, strict=True):
            text = Text()
            for bits, layer in zip(bits_row, layer_row, strict=True):
                text.append(chr(_BRAILLE_BLANK + bits), styles[layer] if layer >= 0 else Style())
            out.append(text)
        return out


def _label(value: float) -> str:
    return f"{value:.4g}"


class LossPlot(Widget):
    """The loss of every step so far (``set_data``), raw and smoothed, with the y range and steps.

    Row 1 is a legend with the latest values, then the plot with the y-axis labels on the left,
    then the first and last step under it. Fewer than 2 rows or no data: a one-line note instead.
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {"loss-plot--raw", "loss-plot--smooth", "loss-plot--axis"}

    DEFAULT_CSS = """
    LossPlot { height: 12; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._steps: list[int] = []
        self._losses: list[float] = []

    def set_data(self, steps: Sequence[int], losses: Sequence[float]) -> None:
        """Replace the plotted steps and their losses (parallel sequences) and redraw."""
        self._steps, self._losses = list(steps), list(losses)
        self.refresh()

    def render(self) -> Text:
        raw_style = self.get_component_rich_style("loss-plot--raw")
        smooth_style = self.get_component_rich_style("loss-plot--smooth")
        axis_style = self.get_component_rich_style("loss-plot--axis")
        width, height = self.size.width, self.size.height
        if not self._losses:
            return Text("loss: no steps yet — the curve starts with the first step", style=axis_style)
        smooth = ema(self._losses)
        legend = Text.assemble(
            ("loss ", "bold"),
            ("⣿ raw ", raw_style),
            (f"{self._losses[-1]:.4f}", "bold"),
            ("   ", ""),
            ("━ smoothed ", smooth_style),
            (f"{smooth[-1]:.4f}", "bold"),
            (f"  (EMA {SMOOTHING:g})", axis_style),
        )
        plot_height = height - 2
        top, bottom = _label(max(self._losses)), _label(min(self._losses))
        gutter = max(len(top), len(bottom)) + 2
        plot_width = width - gutter
        if plot_height < 2 or plot_width < 4:
            return legend
        canvas = self._draw(plot_width, plot_height, smooth)
        lines = [legend]
        for row, cells in enumerate(canvas.rows([raw_style, smooth_style])):
            label = top if row == 0 else bottom if row == plot_height - 1 else ""
            lines.append(
                Text.assemble(
                    (label.rjust(gutter - 2) + " ┤" if label else " " * (gutter - 1) + "│", axis_style), cells
                )
            )
        first, last = f"step {self._steps[0]}", f"step {self._steps[-1]}"
        axis = " " * gutter + first + last.rjust(max(1, plot_width - len(first)))
        lines.append(Text(axis, style=axis_style))
        text = Text("\n").join(lines)
        text.no_wrap = True
        text.overflow = "crop"
        return text

    def _draw(self, width: int, height: int, smooth: list[float]) -> BrailleCanvas:
        canvas = BrailleCanvas(width, height)
        low, high = min(self._losses), max(self._losses)
        count = len(self._losses)

        def to_x(i: int) -> int:
            # Many steps share a dot column when there are more steps than columns: the raw dots then
            # stack into a band that shows the spread of the loss at that point of training.
            return i * (canvas.dots_x - 1) // (count - 1) if count > 1 else 0

        def to_y(value: float) -> int:
            if high == low:
                return canvas.dots_y // 2
            return round((high - value) / (high - low) * (canvas.dots_y - 1))

        for i, value in enumerate(self._losses):
            canvas.dot(to_x(i), to_y(value), layer=0)
        # One smoothed value per dot column (the last step in it), then joined up.
        columns: dict[int, int] = {}
        for i, value in enumerate(smooth):
            columns[to_x(i)] = to_y(value)
        points = sorted(columns.items())
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            canvas.line(x0, y0, x1, y1, layer=1)
        if len(points) == 1:
            canvas.dot(points[0][0], points[0][1], layer=1)
        return canvas
