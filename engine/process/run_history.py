"""The engine's record of the current (or last) training run: what a client that attaches later is
sent in its Snapshot to redraw the run (id, folder, status and every event so far).

It lives in the engine's event loop and never blocks on a job. After a restart it is read back
from the run's metrics.jsonl, so a client still sees the whole loss curve of a run the old engine
was serving.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..core import protocol as P
from ..core.metrics_log import append_metrics
from ..core.workspace import Workspace, read_metrics

MAX_HISTORY_LOGS = 1000  # Log events kept in a run's history (steps are always kept)
# Events that make up a run's history: what a reattaching client needs to redraw the run.
RUN_EVENTS = frozenset(
    ["ModelLoaded", "DataReport", "TrainStarted", "TrainStep", "EvalResult", "CheckpointSaved"]
    + ["ProbeVerdict", "TrainFinished", "Log", "EngineError"]
)


class RunHistory:
    """The run's id, folder and status, and its events as dicts, in order (Snapshot.history)."""

    def __init__(self) -> None:
        self.run_id = ""
        self.run_dir = ""
        self.status = ""
        self.records: list[dict[str, Any]] = []
        self._logs = 0

    def begin(self) -> None:
        """A training job starts: forget the last run; the new one has no folder yet."""
        self.run_id, self.run_dir, self.status = "", "", "starting"
        self.records, self._logs = [], 0

    def load_last_run(self, ws: Workspace) -> None:
        """The workspace's last run, from its files (an engine that just started)."""
        try:
            run = ws.last_run()
        except OSError:
            return
        if run is None:
            return
        self.run_id, self.run_dir, self.status = run.run_id, str(run.path), run.status
        started = P.TrainStarted(
            run_id=run.run_id, run_dir=str(run.path), total_steps=run.total_steps, command=run.command
        )
        self.records = [started.to_dict(), *run.records]

    def record(self, event: P.Event) -> bool:
        """Keep one event of the training job (others are ignored). True when the clients need a
        fresh Snapshot: a resumed run's steps before its checkpoint came from disk, not as events."""
        if event.type not in RUN_EVENTS:
            return False
        if isinstance(event, P.TrainStarted):
            self.run_id, self.run_dir, self.status = event.run_id, event.run_dir, "running"
            if event.start_step > 0:
                earlier = [r for r in read_metrics(event.run_dir) if r.get("type") != "TrainFinished"]
                self.records.append(event.to_dict())
                self.records.extend(earlier)
                return True
        elif isinstance(event, P.TrainFinished):
            self.status = event.status
        elif isinstance(event, P.Log):
            self._logs += 1
            if self._logs > MAX_HISTORY_LOGS:
                return False
        self.records.append(event.to_dict())
        return False

    @property
    def unfinished(self) -> bool:
        return self.status in ("starting", "running")

    def close_failed(self, request_id: str, steps: int, seconds: float) -> P.TrainFinished | None:
        """The training job failed: the run is marked failed, and if its folder exists, its
        TrainFinished (returned, for the clients) is kept here and appended to its metrics.jsonl,
        so `tunebench status` tells a failed run from one still going (a resume drops the line)."""
        self.status = "failed"
        if not self.run_dir:
            return None  # it failed before the run folder existed: nothing to close
        finished = P.TrainFinished(
            id=request_id,
            run_id=self.run_id,
            status="failed",
            steps=steps,
            final_loss=float("nan"),
            seconds=seconds,
        )
        self.records.append(finished.to_dict())
        with contextlib.suppress(OSError):
            append_metrics(self.run_dir, finished.to_dict())
        return finished
