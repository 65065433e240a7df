"""What the Train pane knows about a run, folded from protocol events.

Live events, the Snapshot's history on reattach and a past run's metrics.jsonl all go through
`apply`, so a reattached TUI shows exactly what a TUI that never left would show.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunebench.engine.core import protocol as P

LIVE = ("loading", "training", "stopping")


@dataclass
class RunState:
    # idle, loading, training, stopping, completed, stopped, aborted, failed, interrupted (the
    # engine died mid-run: r resumes from the last checkpoint)
    status: str = "idle"
    run_id: str = ""
    run_dir: str = ""
    total_steps: int = 0
    start_step: int = 0
    step: int = 0
    epoch: float = 0.0
    loss: float = float("nan")
    lr: float = 0.0
    tokens_per_s: float = 0.0
    eta_s: float = 0.0
    elapsed_s: float = 0.0
    trainable_parameters: int = 0
    adapter_dir: str = ""
    stage: str = ""  # the last Progress message while loading, or compiling before the first step
    train_points: list[tuple[float, float]] = field(default_factory=list)
    eval_points: list[tuple[float, float]] = field(default_factory=list)
    checkpoints: list[tuple[int, str]] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return self.status in LIVE

    def apply(self, event: P.Event) -> bool:
        """Fold one event in; True when it changed what the pane shows."""
        if isinstance(event, P.Progress):
            if (self.status in ("loading", "idle") and event.stage in ("load", "tokenize")) or (
                self.status == "training" and event.stage in ("compile", "probe")
            ):
                self.stage = event.message or event.stage
                return True
            return False
        if isinstance(event, P.TrainStarted):
            resumed_from = event.start_step
            vars(self).update(vars(RunState()))  # a new run starts from a clean slate
            self.status, self.run_id, self.run_dir = "training", event.run_id, event.run_dir
            self.total_steps, self.start_step = event.total_steps, resumed_from
            self.step = resumed_from
            self.trainable_parameters = event.trainable_parameters
        elif isinstance(event, P.TrainStep):
            if self.status not in ("stopping",):
                self.status = "training"
            self.stage = ""
            self.step, self.total_steps, self.epoch = event.step, event.total_steps, event.epoch
            self.loss, self.lr = event.loss, event.lr
            self.tokens_per_s, self.eta_s, self.elapsed_s = event.tokens_per_s, event.eta_s, event.elapsed_s
            # A resumed run re-logs steps the chart may already hold: keep the newest value.
            while self.train_points and self.train_points[-1][0] >= event.step:
                self.train_points.pop()
            self.train_points.append((float(event.step), event.loss))
        elif isinstance(event, P.EvalResult):
            self.eval_points = [p for p in self.eval_points if p[0] != event.step]
            self.eval_points.append((float(event.step), event.eval_loss))
        elif isinstance(event, P.CheckpointSaved):
            self.checkpoints = [c for c in self.checkpoints if c[0] != event.step]
            self.checkpoints.append((event.step, event.path))
        elif isinstance(event, P.TrainFinished):
            self.status = event.status or "completed"
            self.step = event.steps or self.step
            self.adapter_dir = event.adapter_dir
            self.eta_s = 0.0
            self.elapsed_s = event.seconds or self.elapsed_s
        else:
            return False
        return True
