"""A run's metrics.jsonl through its one writer (core/metrics_log.py), without torch: appends land
as whole lines, and a resume cuts the file back to its checkpoint."""

from __future__ import annotations

import orjson
from tunebench.engine.core import protocol as P
from tunebench.engine.core.metrics_log import (
    MetricsLog,
    append_metrics,
    metrics_path,
    start_metrics,
    truncate_metrics,
)
from tunebench.engine.core.workspace import read_metrics


def records(run_dir):
    return [orjson.loads(line) for line in metrics_path(run_dir).read_bytes().splitlines()]


def test_appends_are_whole_lines_readable_while_the_file_is_open(tmp_path):
    start_metrics(tmp_path)
    with MetricsLog(tmp_path) as log:
        log.append(P.TrainStep(step=1, loss=2.0).to_dict())
        assert [r["step"] for r in read_metrics(tmp_path)] == [1]  # flushed, not buffered
        log.append(P.TrainStep(step=2, loss=1.5).to_dict())
    append_metrics(tmp_path, P.TrainFinished(status="failed", steps=2).to_dict())
    assert [r["type"] for r in records(tmp_path)] == ["TrainStep", "TrainStep", "TrainFinished"]


def test_a_resume_keeps_what_was_logged_up_to_its_checkpoint(tmp_path):
    start_metrics(tmp_path)
    with MetricsLog(tmp_path) as log:
        for step in (1, 2, 3, 4):
            log.append(P.TrainStep(step=step, loss=1.0).to_dict())
        log.append(P.CheckpointSaved(step=2, path="x").to_dict())
        log.append(P.TrainFinished(status="completed", steps=4).to_dict())
    append_metrics(tmp_path, P.ProbeVerdict(changed=3, total=3, message="the adapter changed").to_dict())
    with open(metrics_path(tmp_path), "ab") as fh:
        fh.write(b'{"type": "TrainStep", "ste')  # the crash cut the last line short
    truncate_metrics(tmp_path, 2)
    kept = records(tmp_path)
    assert [(r["type"], r["step"]) for r in kept] == [
        ("TrainStep", 1),
        ("TrainStep", 2),
        ("CheckpointSaved", 2),
    ]
    assert not list(tmp_path.glob(".*tmp*"))  # the rewrite left no temporary file behind


def test_truncating_a_run_without_metrics_writes_nothing(tmp_path):
    truncate_metrics(tmp_path, 5)
    assert not metrics_path(tmp_path).exists()
