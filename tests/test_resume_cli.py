"""`tunebench train --resume_from_checkpoint` headless, on a tiny model: a complete run is never
trained over, a run continues with more steps, and a resume works from any folder."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from tunebench.engine.cli.main import main


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data" / "d.jsonl"
    path.parent.mkdir()
    rows = [{"instruction": f"Say hi {i}", "output": f"hi number {i}"} for i in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def train(*args: str) -> int:
    return main(["train", "--probe_after", "false", *args])


def first_run(tiny_model_dir, dataset, out: Path, *extra: str) -> Path:
    code = train(
        *("--model", str(tiny_model_dir), "--dataset", str(dataset), "--output_dir", str(out)),
        *("--run_name", "r", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1"),
        *("--per_device_train_batch_size", "2", *extra),
    )
    assert code == 0
    return out / "r"


def steps_logged(run: Path) -> list[int]:
    records = [orjson.loads(line) for line in (run / "metrics.jsonl").read_bytes().splitlines()]
    return [r["step"] for r in records if r["type"] == "TrainStep"]


def test_a_complete_run_is_not_trained_again_unless_more_steps_are_asked(
    tiny_model_dir, data, tmp_path, capfd
):
    """A resume of a finished run went back to its last checkpoint, trained again, replaced the
    adapter and cut metrics.jsonl back."""
    run = first_run(tiny_model_dir, data, tmp_path / "runs")
    capfd.readouterr()
    adapter = "adapter/adapter_model.safetensors"
    kept = {name: (run / name).read_bytes() for name in ("metrics.jsonl", adapter)}
    for resume in ([str(run)], [str(run / "checkpoints" / "step-2")], [str(run), "--learning_rate", "1e-3"]):
        # the last one changes a setting, so it is refused once the steps it plans are known
        assert train("--resume_from_checkpoint", *resume) == 2
        err = capfd.readouterr().err
        assert f"run {run} is complete: it trained all 4 steps" in err, err
        assert "--max_steps above 4" in err and "Traceback" not in err
        assert {name: (run / name).read_bytes() for name in kept} == kept

    assert train("--resume_from_checkpoint", str(run), "--max_steps", "6") == 0
    out, err = capfd.readouterr()
    assert "the run had completed 4 steps; it continues to 6 from step-2" in out + err
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    assert (run / adapter).read_bytes() != kept[adapter]
