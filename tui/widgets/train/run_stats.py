"""The numbers of a run in two lines: status, step, epoch, loss, lr, tokens/s, ETA."""

from __future__ import annotations

import math

from rich.text import Text
from textual.widgets import Static
from tunebench.engine.core.step_clock import speed_text

from .run_state import RunState

STATUS_STYLE = {
    "idle": "dim",
    "loading": "yellow",
    "training": "bold green",
    "stopping": "bold yellow",
    "completed": "bold cyan",
    "stopped": "bold yellow",
    "aborted": "bold red",
    "failed": "bold red",
    "interrupted": "bold red",
}


def duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}:{seconds % 60:02d}"


class RunStats(Static):
    def show(self, run: RunState) -> None:
        self.update(stats_text(run))


def stats_text(run: RunState) -> Text:
    """The run's status line and its numbers."""
    text = Text()
    text.append(f"● {run.status}", style=STATUS_STYLE.get(run.status, ""))
    if run.run_id:
        text.append(f"  run {run.run_id}", style="dim")
    if run.status in ("loading", "training") and run.stage:
        text.append(f"  {run.stage}…")
    if run.status == "idle":
        text.append("  press s to start training with the current parameters and dataset")
    elif run.status in ("interrupted", "stopped", "failed") and run.checkpoints:
        text.append("  r resumes from the last checkpoint")
    text.append("\n")
    if run.total_steps:
        loss = f"{run.loss:.4f}" if math.isfinite(run.loss) else "–"
        fields = [
            ("step", f"{run.step}/{run.total_steps}"),
            ("epoch", f"{run.epoch:.2f}"),
            ("loss", loss),
            ("lr", f"{run.lr:.2e}"),
            # Zero while live: the first step (compiling, warming up) is not a step's speed.
            ("tok/s", speed_text(run.tokens_per_s) if run.tokens_per_s or not run.live else "measuring"),
            # measured once tok/s is: the last step's ETA is 0, not unknown
            ("ETA", duration(run.eta_s) if run.tokens_per_s else "measuring")
            if run.live
            else ("took", duration(run.elapsed_s)),
        ]
        for i, (name, value) in enumerate(fields):
            if i:
                text.append("  ")
            text.append(f"{name} ", style="dim")
            text.append(value, style="bold")
    return text
