"""Memory over time as bars on an absolute scale (0 to the card's size), newest on the right.

Textual's Sparkline scales between the data's own min and max, so a steady 31 GiB of 80 would
fill the whole strip; against the card's size the headroom stays visible.
"""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

BARS = " ▁▂▃▄▅▆▇█"


class MemoryHistory(Widget):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.values: list[float] = []
        self.scale = 1.0

    def show(self, values: list[float], scale: float) -> None:
        self.values, self.scale = values, max(scale, 1.0)
        self.refresh()

    def render(self) -> Text:
        width, height = self.size.width, max(self.size.height, 1)
        recent = self.values[-width:]
        steps = len(BARS) - 1
        # Each column holds `height` cells of `steps` eighths; fill from the bottom row up.
        levels = [round(min(v / self.scale, 1.0) * steps * height) for v in recent]
        rows = []
        for row in range(height - 1, -1, -1):
            line = "".join(BARS[max(0, min(level - row * steps, steps))] for level in levels)
            rows.append(Text(line.rjust(width), style="cyan"))
        return Text("\n").join(rows)
