"""Paths inside a folder the person cannot enter: one line naming the path and the folder, no
traceback, and never "could not write" for a read (Python 3.11's Path.exists raises
PermissionError there)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from tunebench.engine.cli.main import main
from tunebench.engine.core.files import access_failure, space_left


@pytest.fixture
def locked(tmp_path, monkeypatch) -> Path:
    """A folder that cannot be entered, holding a dataset, a model and a run. As root, chmod does
    not keep anyone out: stat() of what lies inside is made to refuse as the kernel would."""
    folder = tmp_path / "locked"
    (folder / "run" / "adapter").mkdir(parents=True)
    (folder / "model").mkdir()
    (folder / "d.jsonl").write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    if os.geteuid() != 0:
        folder.chmod(0)
        yield folder
        folder.chmod(0o755)
        return
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if str(self.absolute()).startswith(f"{folder}{os.sep}"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    yield folder


@pytest.mark.parametrize(
    "argv, flag, inside",
    [
        (["train", "--dataset", "{L}/d.jsonl"], "--dataset", "d.jsonl"),
        (["train", "--dataset", "{D}", "--val_dataset", "{L}/d.jsonl"], "--val_dataset", "d.jsonl"),
        (["train", "--dataset", "{D}", "--output_dir", "{L}/out"], "--output_dir", "out"),
        (["train", "--dataset", "{D}", "--model", "{L}/model"], "--model", "model"),
        (["train", "--resume_from_checkpoint", "{L}/run"], "--resume_from_checkpoint", "run"),
        (["chat", "--adapters", "{L}/run"], "", "run"),
        (["export", "--adapters", "{L}/run"], "", "run"),
    ],
)
def test_a_path_in_a_folder_that_cannot_be_entered_is_named_with_the_folder(
    argv, flag, inside, locked, tiny_model_dir, tmp_path, capfd
):
    data = tmp_path / "ok.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    args = [a.replace("{L}", str(locked)).replace("{D}", str(data)) for a in argv]
    if args[0] == "train" and "--model" not in args:
        args += ["--model", str(tiny_model_dir)]
    if args[0] == "train" and "--output_dir" not in args:
        args += ["--output_dir", str(tmp_path / "runs")]
    assert main(args) == 2
    err = capfd.readouterr().err
    # runs are written into --output_dir: a folder that cannot be entered keeps them from it
    verb = "write into" if flag == "--output_dir" else "read"
    said = f"{flag + ': ' if flag else ''}cannot {verb} {locked / inside}: permission denied on {locked}"
    assert said in err, err
    assert f"ls -ld {locked}" in err and "Traceback" not in err
    assert "could not write" not in err and "free on" not in err


def test_the_last_chance_handler_tells_a_read_from_a_write(locked, tmp_path):
    """A PermissionError no check caught reaches main(): a path it cannot reach is a read failure;
    a write refused in a folder it can enter stays a write failure, without the space left."""
    blocked = PermissionError(errno.EACCES, "Permission denied", str(locked / "d.jsonl"))
    assert space_left(locked / "d.jsonl")  # words the error, never raises on the way
    read = access_failure(blocked)
    assert read is not None and str(read.message).startswith(f"cannot read {locked / 'd.jsonl'}")
    refused = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "new"))
    write = access_failure(refused)
    assert write is not None and write.message == f"could not write {tmp_path / 'new'}: permission denied"
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "new"))
    assert "free on" in access_failure(full).message  # the space left still explains a full disk


def two_step_run(model: Path, tmp_path: Path) -> Path:
    """A finished run of two steps (a checkpoint at step 2) on four samples; its folder."""
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"hi {i}", "output": "hello"}) + "\n" for i in range(4))
    )
    args = ["--model", str(model), "--dataset", str(data), "--output_dir", str(tmp_path / "runs")]
    assert main(["train", "--probe_after", "false", *args, "--run_name", "r", "--max_steps", "2"]) == 0
    return tmp_path / "runs" / "r"


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "trainer_state.pt"])
def test_a_checkpoint_file_that_cannot_be_read_is_a_permission_problem_not_damage(
    name, tiny_model_dir, tmp_path, monkeypatch, capfd
):
    """A checkpoint file this process may not read was reported as "checkpoint ... is damaged:
    adapter_model.safetensors is not a safetensors file", with "no earlier checkpoint of this run
    is whole: start a new run". As root, the read is made to refuse as the kernel would for a
    file of another user's mode 0600."""
    import builtins
    import io

    run = two_step_run(tiny_model_dir, tmp_path)
    locked = run / "checkpoints" / "step-2" / name
    real_open, real_access = builtins.open, os.access

    def refusing_open(file, *a, **kw):
        if isinstance(file, (str, os.PathLike)) and Path(file).absolute() == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    def access(path, mode, *a, **kw):
        return False if Path(path).absolute() == locked else real_access(path, mode, *a, **kw)

    for module in (builtins, io):
        monkeypatch.setattr(module, "open", refusing_open)
    monkeypatch.setattr(os, "access", access)
    capfd.readouterr()
    assert main(["train", "--resume_from_checkpoint", str(run), "--max_steps", "4"]) == 2
    err = capfd.readouterr().err
    assert f"--resume_from_checkpoint: cannot read {locked}: permission denied on {locked}" in err, err
    assert f"ls -ld {locked}" in err
    assert "damaged" not in err and "start a new run" not in err and "Traceback" not in err


def test_a_checkpoint_file_refused_while_loading_is_a_permission_problem(tmp_path, monkeypatch):
    """The load after the preflight's look (a mode changed in between): safetensors' loader says
    only "Permission denied (os error 13)", which was taken for damage."""
    import safetensors.torch
    from tunebench.engine.core.files import UnreadablePathError
    from tunebench.engine.train.checkpoints import load_adapter_weights

    def refuse(*_args, **_kwargs):
        raise PermissionError("Permission denied (os error 13)")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    checkpoint.mkdir(parents=True)
    weights = checkpoint / "adapter_model.safetensors"
    weights.write_bytes(b"whole, but not for this user")
    with pytest.raises(UnreadablePathError) as caught:
        load_adapter_weights(checkpoint, model=None, device="cpu")
    assert (
        caught.value.message
        == f"--resume_from_checkpoint: cannot read {weights}: permission denied on {weights}"
    )


def refuse_files_in(folder: Path, monkeypatch) -> None:
    """Making a file in `folder` fails as the kernel fails it for a folder of another user's mode
    0755 (chmod keeps no root process out)."""
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).absolute() == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / "x"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("exists", [True, False], ids=["folder", "new-folder"])
def test_an_output_dir_that_cannot_be_written_is_refused_before_the_model_loads(
    exists, tiny_model_dir, tmp_path, monkeypatch, capfd
):
    """An --output_dir this process may enter but not write into was found only once the model and
    the data had loaded. As root, making a file there is made to refuse as the kernel would."""
    shared = tmp_path / "shared"
    shared.mkdir()
    output = shared if exists else shared / "runs"
    refuse_files_in(shared, monkeypatch)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(output)]
    assert main([*args, "--json"]) == 2
    out, err = capfd.readouterr()
    said = f"cannot write into {shared}: permission denied" if exists else f"cannot create {output}"
    assert f"--output_dir: {said}" in err, err
    assert f"ls -ld {shared}" in err and "choose another --output_dir" in err and "Traceback" not in err
    assert "ModelLoaded" not in out and not list(shared.iterdir())  # before the load, nothing made


@pytest.mark.parametrize("locked_part", ["run", "checkpoints"])
def test_a_resume_into_a_run_folder_that_cannot_be_written_is_refused_before_the_model_loads(
    locked_part, tiny_model_dir, tmp_path, monkeypatch, capfd
):
    """A resume writes into its run's own folder (its checkpoints, log and adapter), whatever
    --output_dir says: a run folder, or its checkpoints folder, that refuses files is said at once.
    As root, making a file there is made to refuse as the kernel would."""
    run = two_step_run(tiny_model_dir, tmp_path)
    locked = run if locked_part == "run" else run / "checkpoints"
    refuse_files_in(locked, monkeypatch)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    capfd.readouterr()
    assert main(["train", "--resume_from_checkpoint", str(run), "--max_steps", "4", "--json"]) == 2
    out, err = capfd.readouterr()
    assert f"--resume_from_checkpoint: cannot write into {locked}: permission denied" in err, err
    assert f"ls -ld {locked}" in err and "Traceback" not in err
    assert "ModelLoaded" not in out
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # the run as it was
