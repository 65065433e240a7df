"""`tunebench train --resume_from_checkpoint` headless, on a tiny model: a complete run is never
trained over, a run continues with more steps, and a resume works from any folder."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
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
    # the run kept its last step's checkpoint: it goes on from there, steps 3 and 4 are not trained again
    assert "the run had completed 4 steps; it continues to 6 from step-4" in out + err
    assert "train again" not in out + err
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    assert (run / "metrics.jsonl").read_bytes().startswith(kept["metrics.jsonl"].rsplit(b"\n", 2)[0])
    assert (run / adapter).read_bytes() != kept[adapter]


def test_a_short_run_keeps_its_last_step_and_continues_from_it(tiny_model_dir, data, tmp_path, capfd):
    """A run shorter than --save_steps (50 by default: the 24-step demo) kept no checkpoint, so
    it could not be continued, and the error said "holds no complete checkpoint" with a hint to
    pass the run folder that had been passed."""
    args = ["--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(tmp_path)]
    assert train(*args, "--run_name", "r", "--max_steps", "2", "--logging_steps", "1") == 0
    run = tmp_path / "r"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert {p.name for p in (run / "checkpoints" / "step-2").iterdir()} >= {
        "adapter_model.safetensors",
        "trainer_state.pt",
    }
    first_steps = (run / "metrics.jsonl").read_bytes().splitlines()[:2]
    capfd.readouterr()
    assert train("--resume_from_checkpoint", str(run), "--max_steps", "4") == 0
    out, err = capfd.readouterr()
    assert "it continues to 4 from step-2, its learning-rate schedule stretched to 4 steps" in out + err
    assert steps_logged(run) == [1, 2, 3, 4]
    assert (run / "metrics.jsonl").read_bytes().splitlines()[:2] == first_steps
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]

    # A run made before the last step was kept: complete, with no checkpoint to go on from. It says
    # so, with or without more steps asked, and what to do instead.
    shutil.rmtree(run / "checkpoints")
    for more in ([], ["--max_steps", "6"]):
        assert train("--resume_from_checkpoint", str(run), *more) == 2
        err = capfd.readouterr().err
        assert f"run {run} is complete (4 steps) but kept no checkpoint" in err, err
        assert "so it cannot be continued" in err and "start a new run with more steps" in err
        assert f"tunebench chat --adapters {run}" in err
        assert "holds no complete checkpoint" not in err and "Traceback" not in err


def signal_on(monkeypatch, kind: str, signum: int, step: int = 0) -> None:
    """Send this process `signum` once the run emits an event of `kind` (at `step`, for steps),
    as a person pressing Ctrl-C (or a scheduler's SIGTERM) at that moment would."""
    from tunebench.engine.cli.progress import JsonRenderer

    shown = JsonRenderer.__call__

    def call(self, event) -> None:
        shown(self, event)
        if event.type == kind and getattr(event, "step", 0) == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(JsonRenderer, "__call__", call)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_by_signal_saves_exits_non_zero_and_says_how_to_resume(
    signum, code, tiny_model_dir, data, tmp_path, monkeypatch, capfd
):
    """Ctrl-C or SIGTERM during `tunebench train` exited 0, as a finished run, and said nothing
    of how to go on."""
    signal_on(monkeypatch, "TrainStep", signum, step=1)
    args = ["--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", "runs"]
    monkeypatch.chdir(tmp_path)
    assert train(*args, "--run_name", "r", "--max_steps", "6", "--logging_steps", "1", "--json") == code
    err = capfd.readouterr().err
    run = tmp_path / "runs" / "r"
    assert "stopping after this step and saving a checkpoint" in err
    command = f"tunebench train --resume_from_checkpoint {run}"
    assert f"stopped by {signal.Signals(signum).name}; to continue the run: {command}" in err, err
    assert (run / "checkpoints" / "step-1").is_dir()
    monkeypatch.undo()
    assert main(shlex.split(command)[1:]) == 0  # the command as said, from any folder
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]


def test_a_stop_before_the_first_step_says_nothing_was_saved(
    tiny_model_dir, data, tmp_path, monkeypatch, capfd
):
    """Ctrl-C while the model or the data loads said "stopping after this step"."""
    signal_on(monkeypatch, "Progress", signal.SIGTERM)
    args = ["--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(tmp_path)]
    assert train(*args, "--max_steps", "6", "--json") == 143
    err = capfd.readouterr().err
    assert "stopping: no step trained yet, nothing to save" in err and "after this step" not in err
    assert "stopped by SIGTERM before any checkpoint was saved: nothing to resume" in err


def test_a_stop_while_loading_says_stopped_before_the_first_step(
    tiny_model_dir, data, tmp_path, monkeypatch, capfd
):
    """Ctrl-C while the data loaded ended with "aborted after 0 steps in 0:01, final loss 0.0000"."""
    from tunebench.engine.cli.progress import ProgressRenderer

    shown = ProgressRenderer.__call__

    def call(self, event) -> None:
        shown(self, event)
        if event.type == "Progress":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ProgressRenderer, "__call__", call)
    args = ["--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(tmp_path)]
    assert train(*args, "--max_steps", "6") == 130
    out = capfd.readouterr().out
    assert "stopped before the first step, after 0:0" in out and "nothing was trained or saved" in out, out
    assert "final loss" not in out and "aborted after" not in out


def test_a_run_resumes_from_any_folder_and_keeps_its_output_dir(
    tiny_model_dir, data, tmp_path, monkeypatch, capfd
):
    """A resume worked only from the folder the run started in (its data recorded as typed, relative
    to it), and after a resume config.json said --output_dir output, the default."""
    started, elsewhere = tmp_path, tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(started)
    run = started / first_run(tiny_model_dir, Path("data/d.jsonl"), Path("runs"))
    record = orjson.loads((run / "config.json").read_bytes())
    assert record["config"]["dataset"] == [str(data)] and record["config"]["output_dir"] == str(run.parent)
    assert record["cwd"] == str(started)

    monkeypatch.chdir(elsewhere)
    assert train("--resume_from_checkpoint", str(run), "--max_steps", "6") == 0
    record = orjson.loads((run / "config.json").read_bytes())
    assert record["config"]["output_dir"] == str(run.parent) and record["config"]["run_name"] == "r"
    assert record["config"]["max_steps"] == 6 and steps_logged(run) == [1, 2, 3, 4, 5, 6]

    # A run recorded before: its data as typed, and no folder. The recorded one is used when there
    # is one; else the error names the file missing and the folder to run the resume from.
    record["config"]["dataset"], record["config"]["output_dir"] = ["data/d.jsonl"], "runs"
    record["config"]["max_steps"], record["cwd"] = 4, str(started)
    (run / "config.json").write_bytes(orjson.dumps(record))
    capfd.readouterr()
    assert train("--resume_from_checkpoint", str(run), "--max_steps", "8") == 0
    del record["cwd"]
    (run / "config.json").write_bytes(orjson.dumps(record))
    assert train("--resume_from_checkpoint", str(run), "--max_steps", "10") == 2
    err = capfd.readouterr().err
    assert (
        f"--dataset data/d.jsonl relative to the folder it was started in, and {elsewhere / 'data/d.jsonl'}"
        in err
    )
    assert f"run the resume from {started}, the folder it was started in" in err and "Traceback" not in err


def test_a_resume_refuses_another_output_dir_or_run_name(tiny_model_dir, data, tmp_path, monkeypatch, capfd):
    """--output_dir and --run_name given with a resume were ignored without a word: the run went on
    in its own folder. Naming the run's own folder, however spelt, is fine."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / first_run(tiny_model_dir, data, Path("old2"))
    before = (run / "metrics.jsonl").read_bytes()
    capfd.readouterr()
    for place, named in (
        (["--output_dir", "elsewhere", "--run_name", "other"], "--output_dir elsewhere and --run_name other"),
        (["--output_dir", "elsewhere"], "--output_dir elsewhere"),
        (["--run_name", "other"], "--run_name other"),
    ):
        assert train("--resume_from_checkpoint", "old2/r", "--max_steps", "6", *place) == 2
        err = capfd.readouterr().err
        assert f"a resume continues run {run} in its own folder, so {named} cannot be applied" in err, err
        assert f"(the run's are --output_dir {run.parent} --run_name r)" in err
        assert "to continue the run where it is" in err and "Traceback" not in err
        assert not (tmp_path / "elsewhere").exists() and (run / "metrics.jsonl").read_bytes() == before
    own = ["--output_dir", f"{tmp_path}/old2/../old2/", "--run_name", "r"]
    assert train("--resume_from_checkpoint", "old2/r", "--max_steps", "6", *own) == 0
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    # the stored command gives the checkpoint as an absolute path, as it does the data and the folder
    record = orjson.loads((run / "config.json").read_bytes())
    assert record["config"]["resume_from_checkpoint"] == str(run)
    assert record["command"].endswith(f"--resume_from_checkpoint {run}"), record["command"]
