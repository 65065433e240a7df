"""A loss curve drawn with braille dots: train loss as a line, eval loss as bold points.

Each terminal cell holds a 2x4 grid of braille dots, so a 60x10 chart has 120x40 points of
resolution: enough to see a loss curve flatten, with no plotting library and no images.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.widget import Widget

# Bit of each dot in a braille cell, by [row][column] (Unicode braille patterns, U+2800).
_DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
AXIS_WIDTH = 8  # "12.345 ┤"


class BrailleCanvas:
    """A width x height cell grid addressed in dots (2 per cell across, 4 down); y grows up."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.bits = [[0] * width for _ in range(height)]
        self.styles: list[list[str]] = [[""] * width for _ in range(height)]

    def dot(self, x: int, y: int, style: str) -> None:
        if not (0 <= x < self.width * 2 and 0 <= y < self.height * 4):
            return
        row = self.height - 1 - y // 4
        col = x // 2
        self.bits[row][col] |= _DOTS[3 - y % 4][x % 2]
        # Eval points are drawn last and win the cell's colour: they are the rarer signal.
        self.styles[row][col] = style

    def line(self, x0: int, y0: int, x1: int, y1: int, style: str) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), style)

    def rows(self) -> list[Text]:
        out = []
        for bits_row, style_row in zip(self.bits, self.styles, strict=True):
            text = Text()
            for bits, style in zip(bits_row, style_row, strict=True):
                text.append(chr(0x2800 + bits), style=style or None)
            out.append(text)
        return out


def _finite(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if math.isfinite(y)]


class LossChart(Widget):
    """Train and eval loss against the optimizer step."""

    TRAIN_STYLE = "cyan"
    EVAL_STYLE = "bold magenta"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train: list[tuple[float, float]] = []
        self.eval: list[tuple[float, float]] = []
        self.total_steps = 0

    def set_data(
        self, train: list[tuple[float, float]], eval_: list[tuple[float, float]], total_steps: int = 0
    ) -> None:
        self.train, self.eval, self.total_steps = _finite(train), _finite(eval_), total_steps
        self.refresh()

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        plot_w, plot_h = width - AXIS_WIDTH, height - 2  # a row for the x axis, one for the legend
        if plot_w < 4 or plot_h < 2:
            return Text("")
        points = self.train + self.eval
        if not points:
            return Text("the loss curve appears here once training logs its first step", style="dim")
        xs = [x for x, _ in points]
        ys = [y for _, y in points]
        x_lo = min(xs)
        x_hi = max(max(xs), float(self.total_steps), x_lo + 1)
        y_lo, y_hi = min(ys), max(ys)
        pad = (y_hi - y_lo) * 0.05 or max(abs(y_hi) * 0.05, 0.01)
        # A loss is never negative: do not pad the axis below zero.
        y_lo, y_hi = (max(y_lo - pad, 0.0) if y_lo >= 0 else y_lo - pad), y_hi + pad

        def to_dots(x: float, y: float) -> tuple[int, int]:
            return (
                round((x - x_lo) / (x_hi - x_lo) * (plot_w * 2 - 1)),
                round((y - y_lo) / (y_hi - y_lo) * (plot_h * 4 - 1)),
            )

        canvas = BrailleCanvas(plot_w, plot_h)
        previous = None
        for x, y in self.train:
            here = to_dots(x, y)
            if previous is None:
                canvas.dot(*here, self.TRAIN_STYLE)
            else:
                canvas.line(*previous, *here, self.TRAIN_STYLE)
            previous = here
        for x, y in self.eval:
            dx, dy = to_dots(x, y)
            for ox, oy in ((0, 0), (1, 0), (0, 1), (1, 1)):  # a 2x2 blob stands out from the line
                canvas.dot(dx + ox, dy + oy, self.EVAL_STYLE)

        lines: list[Text] = []
        for i, row in enumerate(canvas.rows()):
            if i == 0:
                label = f"{y_hi:7.3f}┤"
            elif i == plot_h - 1:
                label = f"{y_lo:7.3f}┤"
            elif i == plot_h // 2 and plot_h >= 7:  # a tall chart gets a middle tick too
                label = f"{y_hi - (y_hi - y_lo) * i / (plot_h - 1):7.3f}┤"
            else:
                label = " " * 7 + "│"
            lines.append(Text(label, style="dim") + row)
        left, right = f"step {x_lo:.0f}", f"{x_hi:.0f}"
        axis = " " * AXIS_WIDTH + left + " " * max(plot_w - len(left) - len(right), 1) + right
        lines.append(Text(axis, style="dim"))
        legend = Text(" " * AXIS_WIDTH)
        legend.append("━ train loss", style=self.TRAIN_STYLE)
        if self.eval:
            legend.append("   ● eval loss", style=self.EVAL_STYLE)
        last = self.train[-1][1] if self.train else None
        if last is not None:
            legend.append(f"   last {last:.4f}", style="dim")
        lines.append(legend)
        return Text("\n").join(lines)
