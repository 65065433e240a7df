"""The GPU pane: live memory per GPU, the engine's allocator, and the estimate for the form."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Static
from tunebench.engine.core import protocol as P

from .memory_gauge import GIB, EngineMemory, GpuGauge, gib
from .memory_history import MemoryHistory

HISTORY = 400  # samples kept: one per column of the widest terminal likely, ~2.5 per second
COMPACT_FROM = 3  # GPUs from which each gets one row (eight fit an 80x24 terminal)


class GpuPane(Vertical):
    BINDINGS = [Binding("e", "estimate", "Estimate memory")]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sample: P.MemorySample | None = None
        self.estimate: P.MemoryEstimate | None = None
        self.history: deque[float] = deque(maxlen=HISTORY)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="gpu-body"):
            yield Static("waiting for the engine's first memory sample…", id="gpu-waiting")
            yield Static("", id="gpu-names")
            yield Vertical(id="gpu-gauges")
            yield EngineMemory(id="engine-memory")
            yield Label("memory over time", classes="section-title", id="memory-history-title")
            yield MemoryHistory(id="memory-history")
            yield Label("estimate for the current parameters", classes="section-title")
            yield Static("press e to ask the engine for an estimate", id="memory-estimate")

    # ------------------------------------------------------------ public API

    def show_sample(self, sample: P.MemorySample) -> None:
        self.sample = sample
        self.query_one("#gpu-waiting").display = False
        self._draw_gauges(sample)
        self.query_one(EngineMemory).show(sample)
        now = float(sum(g.get("used", 0) for g in sample.gpus) if sample.gpus else sample.rss)
        self.history.append(now)
        scale = float(sum(g.get("total", 0) for g in sample.gpus) if sample.gpus else sample.ram_total)
        scale = scale or max(self.history)
        self.query_one(MemoryHistory).show(list(self.history), scale)
        what = "GPU memory used" if sample.gpus else "engine RAM"
        self.query_one("#memory-history-title", Label).update(
            f"{what} over time (scale 0 to {gib(scale)}): now {gib(now)}, peak {gib(max(self.history))}"
        )

    def _draw_gauges(self, sample: P.MemorySample) -> None:
        gauges = self.query_one("#gpu-gauges")
        existing = list(gauges.query(GpuGauge))
        compact = len(sample.gpus) >= COMPACT_FROM
        if len(existing) != len(sample.gpus):
            gauges.remove_children()
            existing = [GpuGauge(i, compact=compact) for i in range(len(sample.gpus))]
            gauges.mount_all(existing)
        names = self.query_one("#gpu-names", Static)
        names.display = compact
        if compact:
            names.update(gpu_names(sample.gpus))
        estimate = self._estimate_bytes()
        for gauge, gpu in zip(existing, sample.gpus, strict=True):
            # The engine's reserved memory is on the GPU it trains on, the first one it sees.
            own = float(sample.reserved) if gauge.index == 0 else 0.0
            gauge.show(gpu, estimate, own)

    def show_estimate(self, estimate: P.MemoryEstimate | None, problem: str = "") -> None:
        self.estimate = estimate
        widget = self.query_one("#memory-estimate", Static)
        if estimate is None:
            widget.update(Text(problem or "no estimate", style="yellow"))
            return
        text = Text()
        text.append(f"{estimate.total_gib:.1f} GiB", style="bold magenta")
        parts = ", ".join(f"{name} {value:.2f}" for name, value in estimate.parts.items())
        if parts:
            text.append(f"  ({parts} GiB)")
        if estimate.memory == "host":
            fits = estimate.total_gib <= estimate.available_gib
            text.append(
                f"\nof RAM (no GPU): {'fits in' if fits else 'does NOT fit in'} the "
                f"{estimate.available_gib:.1f} GiB free",
                style="green" if fits else "bold red",
            )
            if not fits:
                text.append(
                    "\ntraining will be refused; any one of these fits: "
                    + ("; or ".join(estimate.advice) or "a smaller model"),
                    style="red",
                )
        elif estimate.refused:
            text.append(f"\ntraining will be refused: {estimate.refused}", style="bold red")
            for advice in estimate.advice:
                text.append(f"\n{advice}", style="red")
        elif self.sample is not None and self.sample.gpus:
            total = max(float(g.get("total") or 0) for g in self.sample.gpus)
            if total:
                fits = estimate.total_gib * GIB <= total
                text.append(
                    f"\n{'fits in' if fits else 'does NOT fit in'} {gib(total)}"
                    + ("" if fits else ": lower max_memory, max_length or the micro-batch, or use qlora"),
                    style="green" if fits else "bold red",
                )
        if estimate.plan:
            text.append(f"\n{estimate.plan}", style="bold")
        for note in estimate.notes:
            text.append(f"\n{note}", style="dim")
        if self.sample is not None and self.sample.gpus:
            text.append("\n┃ marks the estimate on the gauges", style="dim")
        widget.update(text)
        if self.sample is not None:
            self._draw_gauges(self.sample)

    def _estimate_bytes(self) -> float:
        return self.estimate.total_gib * GIB if self.estimate else 0.0

    # ------------------------------------------------------------- actions

    def action_estimate(self) -> None:
        self.app.request_memory_estimate()


def gpu_names(gpus: list[dict]) -> Text:
    """The title over one-row gauges: "4 GPUs: NVIDIA H200", or each one's name where they differ."""
    names = {str(g.get("name", "")) for g in gpus}
    text = Text(f"{len(gpus)} GPUs: ", style="bold")
    if len(names) == 1:
        text.append(names.pop())
    else:
        text.append(", ".join(f"{g.get('index', i)} {g.get('name', '')}" for i, g in enumerate(gpus)))
    text.append("   memory used / total, utilisation", style="dim")
    return text
