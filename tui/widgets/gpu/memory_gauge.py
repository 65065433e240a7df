"""Memory gauges: one per GPU (NVML used / total, and its utilisation) and the engine's own
allocator numbers."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

GIB = 1024**3


def gib(n_bytes: float) -> str:
    """ "1.5 GiB", or "312 MiB" below a GiB, where one decimal of GiB would read 0.0."""
    if abs(n_bytes) < GIB:
        return f"{n_bytes / 2**20:.0f} MiB"
    return f"{n_bytes / GIB:.1f} GiB"


def bar(
    fraction: float,
    width: int,
    *,
    own: float = 0.0,
    mark: float | None = None,
    style: str = "green",
    warn: bool = True,
) -> Text:
    """A one-line bar of `fraction` used, the first `own` of it in cyan (this engine's share);
    `mark` draws a ┃ where an estimate would land, so "will it fit" is visible at a glance.
    `warn` turns it yellow then red as it fills (memory; a busy GPU is no warning)."""
    width = max(width, 4)
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    own_cells = min(round(min(max(own, 0.0), 1.0) * width), filled)
    if warn and fraction >= 0.9:
        style = "red"
    elif warn and fraction >= 0.75:
        style = "yellow"
    mark_at = None if mark is None else min(int(mark * width), width - 1)
    text = Text()
    for i in range(width):
        if i == mark_at:
            text.append("┃", style="bold magenta")
        elif i < own_cells:
            text.append("█", style="cyan")
        elif i < filled:
            text.append("█", style=style)
        else:
            text.append("░", style="grey37")
    return text


class GpuGauge(Static):
    """One GPU: name, used / total, utilisation, and where the estimate would land. `compact`
    (a machine of several GPUs) draws it in one row, the name left to the pane's title."""

    def __init__(self, index: int, compact: bool = False, **kwargs) -> None:
        super().__init__("", classes="gpu-gauge -compact" if compact else "gpu-gauge", **kwargs)
        self.index = index
        self.compact = compact
        self.gpu: dict[str, Any] = {}
        self.estimate_bytes = 0.0
        self.engine_bytes = 0.0

    def show(self, gpu: dict[str, Any], estimate_bytes: float = 0.0, engine_bytes: float = 0.0) -> None:
        self.gpu = gpu
        self.estimate_bytes = estimate_bytes
        self.engine_bytes = engine_bytes
        self.update(self._render_text())

    def on_resize(self) -> None:
        if self.gpu:
            self.update(self._render_text())

    def _render_text(self) -> Text:
        gpu = self.gpu
        total = float(gpu.get("total") or 0) or 1.0
        used = float(gpu.get("used") or 0)
        util = gpu.get("util")
        known = (
            isinstance(util, (int, float)) and util >= 0
        )  # NVML says -1 where a (virtualised) GPU gives none
        util_text = Text(f"util {util:.0f}%" if known else "util n/a", style="blue" if known else "dim")
        mark = self.estimate_bytes / total if self.estimate_bytes else None
        width = max(self.size.width - 2, 10)
        util_width = max(width // 5, 4) if not self.compact else max(width // 10, 4)
        if self.compact:
            # GPU 3 ████░░░░ 70.0/141 GiB  util 35% ██░░  : a row each, columns aligned
            row = Text(f"GPU {gpu.get('index', self.index)} ", style="bold")
            numbers = f" {used / GIB:5.1f}/{total / GIB:.0f} GiB  "
            room = width - len(row) - len(numbers) - 9 - 1 - util_width  # "util 100%" is 9
            row.append_text(bar(used / total, room, own=self.engine_bytes / total, mark=mark))
            row.append(numbers)
            row.append_text(util_text.copy())
            row.pad_right(9 - len(util_text) + 1)
            row.append_text(bar(util / 100 if known else 0.0, util_width, style="blue", warn=False))
            return row
        head = Text()
        head.append(f"GPU {gpu.get('index', self.index)} ", style="bold")
        head.append(str(gpu.get("name", "")))
        head.append(f"   {gib(used)} / {gib(total)}  ")
        head.append_text(util_text)
        # memory on the left, utilisation in the last fifth
        line = bar(used / total, width - util_width - 1, own=self.engine_bytes / total, mark=mark)
        line.append(" ")
        line.append_text(bar(util / 100 if known else 0.0, util_width, style="blue", warn=False))
        return Text("\n").join([head, line])


class EngineMemory(Static):
    """The engine's torch allocator (allocated / reserved / peak), or without a GPU its RAM."""

    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.sample: Any = None

    def show(self, sample: Any) -> None:
        self.sample = sample
        self.update(self._render_text())

    def on_resize(self) -> None:
        if self.sample is not None:
            self.update(self._render_text())

    def _render_text(self) -> Text:
        sample = self.sample
        text = Text()
        if sample.gpus:
            text.append("█ ", style="cyan")
            text.append("engine  ", style="bold")
            text.append(
                f"allocated {gib(sample.allocated)}   reserved {gib(sample.reserved)}   "
                f"peak {gib(sample.peak)}"
            )
            return text
        text.append("no NVIDIA GPU: showing engine RAM\n", style="bold yellow")
        if sample.gpu_note and "NVML" in sample.gpu_note:  # why NVML found none, for the curious
            text.append(f"{sample.gpu_note}\n", style="dim")
        total = sample.ram_total or 1
        used = total - sample.ram_available if sample.ram_total else sample.rss
        text.append("█ ", style="cyan")
        text.append("engine RSS ", style="bold")
        text.append(f"{gib(sample.rss)}   system {gib(used)} / {gib(total)}\n")
        text.append_text(bar(used / total, max(self.size.width - 2, 10), own=sample.rss / total))
        return text
