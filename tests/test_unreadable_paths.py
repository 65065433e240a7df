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
    said = f"{flag + ': ' if flag else ''}cannot read {locked / inside}: permission denied on {locked}"
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
