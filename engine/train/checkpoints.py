"""Training checkpoints on disk: saving, pruning, finding and loading them, and the final adapter.

    <run>/checkpoints/step-<n>/  adapter + trainer_state.pt (optimizer, scheduler, RNG, step)
    <run>/adapter/               the final adapter in PEFT format

Every folder is written under a temporary name and renamed into place, so a crash leaves either
the complete folder or none (workspace.list_checkpoints counts only folders with the state file).
A temporary folder left by a killed run or a failed write is removed at the next run's start
(remove_unfinished_writes), unless the run it belongs to is being written (writing_run's lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import UserError
from ..core.files import fsync_dir
from ..core.workspace import CHECKPOINT_STATE_FILE, list_checkpoints
from .types import RunPaths


def save_checkpoint(run: RunPaths, step: int, model, optimizer, scheduler, keep: int) -> Path:
    """Write checkpoints/step-<n>/ under a temporary name, fsync, then rename: never half-written."""
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    final = run.checkpoints / f"step-{step}"
    tmp = run.checkpoints / f"{TMP_CHECKPOINT_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_checkpoint(tmp, step, model, optimizer, scheduler)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (a full disk) leaves nothing behind
        raise
    shutil.rmtree(final, ignore_errors=True)  # the same step saved again (after a resume)
    os.replace(tmp, final)
    fsync_dir(run.checkpoints, ignore_errors=False)  # the rename itself survives a power loss
    _prune_checkpoints(run, keep)
    return final


TMP_CHECKPOINT_PREFIX = ".tmp-step-"


def _write_checkpoint(tmp: Path, step: int, model, optimizer, scheduler) -> None:
    import numpy as np
    import torch

    model.save_pretrained(tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_python": list(random.getstate()[1]),
        "rng_numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
    }
    torch.save(state, tmp / CHECKPOINT_STATE_FILE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


@contextlib.contextmanager
def writing_run(root: Path) -> Iterator[None]:
    """Hold the run folder's lock while training writes into it: remove_unfinished_writes in
    another process then leaves its temporary folders alone. The kernel drops the lock however
    the process ends, so a killed run's left-overs are found at the next start."""
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_unfinished_writes(output_dir: Path) -> list[Path]:
    """Remove the temporary checkpoint and adapter folders in the runs under `output_dir` that no
    process is writing: left by a run killed before its write finished, or by a write that failed.
    Returns what it removed."""
    removed: list[Path] = []
    if not output_dir.is_dir():
        return removed
    for run in sorted(p for p in output_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        staged_adapter = _staging(RunPaths(run).adapter)
        leftovers = [*run.glob(f"checkpoints/{TMP_CHECKPOINT_PREFIX}*")]
        leftovers += [staged_adapter] if staged_adapter.exists() else []
        if not leftovers or _is_being_written(run):
            continue
        for tmp in leftovers:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _is_being_written(run: Path) -> bool:
    try:
        fd = os.open(run, os.O_RDONLY)
    except OSError:
        return True  # cannot tell: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also lets go of the lock, if this took it
    return False


def _prune_checkpoints(run: RunPaths, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(run.root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str) -> Path:
    """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
    p = Path(path).expanduser()
    if (p / CHECKPOINT_STATE_FILE).is_file():
        return p.resolve()
    if p.is_dir():
        found = list_checkpoints(p.parent if p.name == "checkpoints" else p)
        if found:
            return found[-1].resolve()
        raise UserError(
            f"--resume_from_checkpoint: {p} holds no complete checkpoint",
            "point it at runs/<run-id> or runs/<run-id>/checkpoints/step-<n>",
            code="config",
        )
    raise UserError(
        f"--resume_from_checkpoint: {p} does not exist",
        "point it at runs/<run-id> or runs/<run-id>/checkpoints/step-<n>",
        code="config",
    )


def load_checkpoint(path: Path, model, optimizer, scheduler, device) -> int:
    """Restore the adapter weights, optimizer, scheduler and RNG states; returns the step saved."""
    import numpy as np
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"), device=str(device))
    set_peft_model_state_dict(model, weights)
    state = torch.load(path / CHECKPOINT_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    random.setstate((3, tuple(state["rng_python"]), None))
    np_state = list(np.random.get_state())
    np_state[1] = state["rng_numpy"].numpy().astype(np.uint32)
    np.random.set_state(tuple(np_state))
    return int(state["step"])


def save_adapter_atomically(model, target: Path) -> None:
    """The final adapter, written beside `target` and renamed into place."""
    tmp = _staging(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _staging(target: Path) -> Path:
    """Where save_adapter_atomically writes `target` before renaming it into place."""
    return target.with_name(f".{target.name}.tmp")
