"""The Train pane: start / stop / abort, live numbers and progress, loss curve, checkpoints, log."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar
from tunebench.engine.core import protocol as P
from tunebench.tui.engine_client import decode_events
from tunebench.tui.paths import short_path

from .checkpoint_list import CheckpointList
from .loss_chart import LossChart
from .run_state import RunState
from .run_stats import RunStats
from .train_log import TrainLog


class TrainPane(Vertical):
    BINDINGS = [
        Binding("s", "start", "Start"),
        Binding("x", "stop", "Stop (save)"),
        Binding("X", "abort", "Abort"),
        Binding("r", "resume", "Resume last"),
    ]
    HELP_KEYS = (("↑ ↓ enter", "on a checkpoint or the final adapter: chat with it beside the base"),)

    def __init__(self, workspace: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.workspace = workspace
        self.run = RunState()

    def compose(self) -> ComposeResult:
        yield RunStats(id="run-stats")
        yield ProgressBar(id="train-progress", show_eta=False)
        with Horizontal(id="train-body"):
            yield LossChart(id="loss-chart")
            with Vertical(id="train-side"):
                yield Label("Checkpoints", classes="section-title")
                yield CheckpointList(id="checkpoints")
        yield TrainLog(id="train-log", wrap=True, markup=False, max_lines=500)

    def on_mount(self) -> None:
        self.redraw()

    # ------------------------------------------------------------ public API

    def apply_events(self, events: list[P.Event], *, replay: bool = False) -> None:
        """Fold events in and redraw once: a reattach can replay thousands of steps."""
        changed = False
        for event in events:
            if isinstance(event, P.TrainStarted) and event.start_step > 0:
                changed |= self.run.apply(event)
                self._load_earlier_steps(Path(event.run_dir), event.start_step)
            else:
                changed |= self.run.apply(event)
            self._log_event(event)
        if changed:
            self.redraw()

    def reset(self) -> None:
        """Forget the run shown (a Snapshot is about to replay the engine's picture of it)."""
        self.run = RunState()
        self.query_one(TrainLog).clear()
        self.redraw()

    def set_status(self, status: str, stage: str = "") -> None:
        self.run.status, self.run.stage = status, stage
        self.redraw()

    def log_line(self, text: str | Text, style: str = "") -> None:
        self.query_one(TrainLog).write(Text(text, style=style) if isinstance(text, str) else text)

    def redraw(self) -> None:
        run = self.run
        self.query_one(RunStats).show(run)
        bar = self.query_one(ProgressBar)
        bar.update(total=run.total_steps or None, progress=run.step)
        self.query_one(LossChart).set_data(run.train_points, run.eval_points, run.total_steps)
        self.query_one(CheckpointList).show(run)

    def _load_earlier_steps(self, run_dir: Path, upto: int) -> None:
        # A resumed run's engine history starts at the resume point; the steps before it are in
        # the run's metrics.jsonl, so the curve shows the whole run and not only its second half.
        try:
            lines = (run_dir / "metrics.jsonl").read_bytes().splitlines()
        except OSError:
            return
        earlier = RunState()
        for event in decode_events(lines):
            if getattr(event, "step", upto + 1) <= upto:
                earlier.apply(event)
        self.run.train_points = earlier.train_points + self.run.train_points
        self.run.eval_points = earlier.eval_points + self.run.eval_points
        self.run.checkpoints = earlier.checkpoints + self.run.checkpoints

    def _log_event(self, event: P.Event) -> None:
        if isinstance(event, P.ModelLoaded):
            self.log_line(
                f"model {event.model}: {event.parameters / 1e6:.1f}M parameters, {event.dtype} on "
                f"{event.device}, loaded in {event.seconds:.1f}s"
            )
        elif isinstance(event, P.DataReport):
            self.log_line(
                f"data {event.samples} train / {event.eval_samples} eval samples, {event.tokens:,} "
                f"tokens; {event.left_out()}"
            )
            for problem in event.problems[:10]:
                self.log_line(f"  skipped {problem}", "yellow")
        elif isinstance(event, P.TrainStarted):
            resumed = f", resumed at step {event.start_step}" if event.start_step else ""
            self.log_line(f"run {self._short(event.run_dir)} ({event.total_steps} steps{resumed})", "bold")
        elif isinstance(event, P.EvalResult):
            self.log_line(f"eval at step {event.step}: loss {event.eval_loss:.4f}", "magenta")
        elif isinstance(event, P.CheckpointSaved):
            self.log_line(f"checkpoint {self._short(event.path)}")
        elif isinstance(event, P.TrainFinished):
            self.log_line(f"{event.status} after {event.steps} steps", "bold")
            if event.adapter_dir:
                self.log_line(f"adapter {self._short(event.adapter_dir)}: enter on it (right) opens a chat")
        elif isinstance(event, P.ProbeVerdict):
            self.log_line(f"verdict: {event.message}", "bold green" if event.changed else "bold yellow")
        elif isinstance(event, P.Log):
            self.log_line(event.message, "yellow" if event.level in ("warning", "error") else "")

    def _short(self, path: str) -> str:
        return short_path(path, self.workspace)

    # ------------------------------------------------------------- actions

    def action_start(self) -> None:
        self.app.start_training()

    def action_resume(self) -> None:
        self.app.start_training(resume=True)

    def action_stop(self) -> None:
        self.app.stop_training("graceful")

    def action_abort(self) -> None:
        self.app.stop_training("abort")
