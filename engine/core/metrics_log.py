"""The one writer of a run's metrics.jsonl: every record the run logged, one JSON object a line.

The recipe appends a line per logged step, eval, checkpoint and the final TrainFinished; a resume
truncates the file back to its checkpoint; the engine appends the TrainFinished of a run that
failed, and the verdict (ProbeVerdict) after a completed one. They all write through here, so the
file has one format and one crash rule: appends are flushed line by line, and the only rewrite
(the truncation) goes through a temporary file and a rename, so a crash leaves the old file or the
new one, never half of either. Readers skip a last line cut short by a crash
(workspace.read_metrics).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import IO, Any

import orjson

from .files import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
ATTEMPT_ENDS = frozenset({"TrainFinished", "ProbeVerdict"})  # records a resume drops


def metrics_path(run_dir: str | Path) -> Path:
    """Where a run folder keeps its metrics."""
    return Path(run_dir) / METRICS_FILE


class MetricsLog:
    """A run's metrics.jsonl, open for appending the records the run logs (a context manager)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = metrics_path(run_dir)
        self._file: IO[bytes] = open(self.path, "ab")  # noqa: SIM115 - closed in close()

    def append(self, record: dict[str, Any]) -> None:
        """One record, flushed at once: a reader (or a crash) sees whole lines up to this one."""
        self._file.write(orjson.dumps(record) + b"\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def start_metrics(run_dir: str | Path) -> None:
    """An empty metrics.jsonl for a new run, there from the moment the run is announced."""
    metrics_path(run_dir).write_bytes(b"")


def append_metrics(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one record to a run's metrics.jsonl that nobody has open (the run's job has ended)."""
    with MetricsLog(run_dir) as log:
        log.append(record)


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Keep only what was logged up to `step` (the checkpoint a run resumes from): the resumed run
    logs the rest again. Also drops the end of the earlier attempt (its TrainFinished and verdict)
    and a line cut short by the crash. Rewritten through a temporary file and a rename."""
    path = metrics_path(run_dir)
    if not path.exists():
        return
    kept = []
    for line in path.read_bytes().splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:  # a line cut short by the crash
            continue
        if record.get("type") not in ATTEMPT_ENDS and record.get("step", 0) <= step:
            kept.append(line + b"\n")
    atomic_write_bytes(path, b"".join(kept), sync_dir=True)
