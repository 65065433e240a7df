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
import errno
import fcntl
import json
import os
import random
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import UserError
from ..core.files import UnreadablePathError, follow_umask, fsync_dir, read_failure, reading, writing
from ..core.targets import ADAPTER_WEIGHTS
from ..core.workspace import CHECKPOINT_STATE_FILE, checkpoint_step, list_checkpoints, read_run
from .types import RunPaths

TMP_CHECKPOINT_PREFIX = ".tmp-step-"


def save_checkpoint(
    run: RunPaths,
    step: int,
    model,
    optimizer,
    scheduler,
    keep: int,
    adapter_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write checkpoints/step-<n>/ under a temporary name, fsync, then rename: never half-written.
    A sharded model's adapter and optimizer state come gathered (`adapter_state`, `optimizer_state`)."""
    import numpy as np
    import torch

    final = run.checkpoints / f"step-{step}"
    tmp = run.checkpoints / f"{TMP_CHECKPOINT_PREFIX}{step}"
    state = {
        "step": step,
        "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_python": list(random.getstate()[1]),
        "rng_numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
    }
    with _written_whole_or_not_at_all(tmp):
        with writing(run.checkpoints):
            run.checkpoints.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        # named as the checkpoint it would have become: the temporary folder goes with the failure
        with writing(final / ADAPTER_WEIGHTS):
            model.save_pretrained(tmp, state_dict=adapter_state)
        with writing(final / CHECKPOINT_STATE_FILE):
            torch.save(state, tmp / CHECKPOINT_STATE_FILE)
            follow_umask(tmp)
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)  # the same step saved again (after a resume)
    os.replace(tmp, final)
    fsync_dir(run.checkpoints, ignore_errors=False)  # the rename itself survives a power loss
    _prune_checkpoints(run, keep)
    return final


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


@contextlib.contextmanager
def _written_whole_or_not_at_all(tmp: Path) -> Iterator[None]:
    """A write that fails takes its half-written folder with it: the space it took is given back
    at once (a full disk stays usable), and no partial folder is left for a later run to find."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prune_checkpoints(run: RunPaths, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(run.root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str) -> Path:
    """A checkpoint folder, or a run folder (its newest complete checkpoint); UserError for one
    whose files are damaged, naming the previous sound one to resume from instead."""
    with reading(path, "--resume_from_checkpoint"):
        return _find_checkpoint(Path(path).expanduser())


def _find_checkpoint(p: Path) -> Path:
    if (p / CHECKPOINT_STATE_FILE).is_file():
        return _sound(p.resolve())
    if p.is_dir():
        run = p.parent if p.name == "checkpoints" else p
        found = list_checkpoints(run)
        if found:
            return _sound(found[-1].resolve())
        raise _no_checkpoint(run)
    raise UserError(
        f"--resume_from_checkpoint: {p} does not exist",
        "point it at runs/<run-id> or runs/<run-id>/checkpoints/step-<n>",
        code="config",
    )


def _no_checkpoint(run: Path) -> UserError:
    """The error for a folder without a checkpoint to resume from: a run that finished or stopped
    before its first save (runs made before the last step was saved too finished without one),
    or a folder that is not a run."""
    info = read_run(run)
    if not info.records and not RunPaths(run).config.is_file():
        return UserError(
            f"--resume_from_checkpoint: {run} is not a run folder: it holds no config.json and no "
            "checkpoints/step-<n>",
            "point it at a run's folder (<output_dir>/<run-id>) or one of its checkpoints "
            "(<output_dir>/<run-id>/checkpoints/step-<n>)",
            code="config",
        )
    save_steps = info.config.get("save_steps", "")
    if info.status == "completed":
        return UserError(
            f"--resume_from_checkpoint: run {run} is complete ({info.steps} steps) but kept no "
            f"checkpoint (it finished before its first save, at --save_steps {save_steps}), so it "
            "cannot be continued",
            "to train longer, start a new run with more steps (its command, without "
            "--resume_from_checkpoint and with a higher --max_steps or --num_train_epochs; runs "
            "now keep a checkpoint of their last step); to use it as it is, "
            f"`tunebench chat --adapters {run}`",
            code="config",
        )
    return UserError(
        f"--resume_from_checkpoint: run {run} saved no checkpoint ({info.status} after "
        f"{info.steps} steps; the first is saved at --save_steps {save_steps}), so there is nothing "
        "to resume",
        "start the run again: the same command without --resume_from_checkpoint",
        code="config",
    )


def checkpoint_damage(path: Path) -> str:
    """What is wrong with a checkpoint's files ("" when nothing is): a file cut short by a full
    disk, a copy that stopped halfway, bytes changed on disk. Reads the files but needs no torch;
    a file the permissions keep from this process raises PermissionError (it is not damaged)."""
    weights = path / ADAPTER_WEIGHTS
    try:
        size = weights.stat().st_size
        with open(weights, "rb") as fh:
            header_size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_size)) if 8 + header_size <= size else None
        if not isinstance(header, dict):
            return f"{ADAPTER_WEIGHTS} is cut short ({size} bytes)"
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + header_size + end != size:
            return f"{ADAPTER_WEIGHTS} is cut short ({size} of {8 + header_size + end} bytes)"
    except FileNotFoundError:
        return f"{ADAPTER_WEIGHTS} is missing"
    except PermissionError:
        raise  # not damage: the files are whole, this process may not read them
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return f"{ADAPTER_WEIGHTS} is not a safetensors file"
    try:
        with zipfile.ZipFile(path / CHECKPOINT_STATE_FILE) as state:  # torch.save's format
            bad = state.testzip()
    except PermissionError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError):
        return f"{CHECKPOINT_STATE_FILE} is cut short or not a torch checkpoint"
    return f"{CHECKPOINT_STATE_FILE} is damaged ({bad} fails its checksum)" if bad else ""


def _sound(checkpoint: Path, damage: str = "") -> Path:
    """`checkpoint` if its files are whole; else a UserError that offers the previous sound one.
    A file this process may not read is a permission problem, said as one."""
    if not damage:
        try:
            damage = checkpoint_damage(checkpoint)
        except PermissionError as exc:
            raise _unreadable(exc) from None
    if not damage:
        return checkpoint
    run = checkpoint.parent.parent
    earlier = [
        c for c in list_checkpoints(run) if (checkpoint_step(c) or 0) < (checkpoint_step(checkpoint) or 0)
    ]
    previous = next((c for c in reversed(earlier) if _whole(c)), None)
    if previous is None:
        hint = (
            "no earlier checkpoint of this run is whole: start a new run (leave out --resume_from_checkpoint)"
        )
    else:
        hint = (
            f"resume from the previous one, step {checkpoint_step(previous)}: "
            f"--resume_from_checkpoint {previous} (in the TUI, move the damaged folder out of "
            f"{checkpoint.parent} and press r)"
        )
    raise UserError(f"checkpoint {checkpoint} is damaged: {damage}", hint, code="checkpoint")


def _whole(checkpoint: Path) -> bool:
    """Whether a checkpoint's files are whole and can be read."""
    try:
        return not checkpoint_damage(checkpoint)
    except PermissionError:
        return False


def _unreadable(exc: BaseException, file: Path | None = None) -> UserError:
    """A checkpoint file the permissions keep from this process: "cannot read <file>: permission
    denied on <folder>" (core/files.read_failure), never "damaged"."""
    if file is not None and (not isinstance(exc, PermissionError) or not exc.filename):
        # safetensors' loader names no file ("Permission denied (os error 13)")
        exc = PermissionError(errno.EACCES, "Permission denied", str(file))
    flag = "--resume_from_checkpoint"
    return read_failure(exc, flag=flag) or UnreadablePathError(
        f"{flag}: cannot read {exc.filename}: permission denied",
        f"check its permissions (`ls -l {exc.filename}`), or choose another checkpoint",
    )


def _is_permission_error(exc: BaseException) -> bool:
    return isinstance(exc, PermissionError) or any(
        f"(os error {code})" in str(exc) for code in (errno.EACCES, errno.EPERM)
    )


def load_checkpoint(path: Path, model, optimizer, scheduler, device, shard_optimizer=None) -> int:
    """Restore the adapter weights, optimizer, scheduler and RNG states; returns the step saved.
    A sharded model (`shard_optimizer` cuts the optimizer state to this rank's shards) had its
    weights loaded before it was sharded (load_adapter_weights)."""
    import numpy as np
    import torch

    if shard_optimizer is None:
        load_adapter_weights(path, model, device)
    try:
        state = torch.load(path / CHECKPOINT_STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # damage the preflight's look at the files did not show
        if _is_permission_error(exc):
            raise _unreadable(exc, path / CHECKPOINT_STATE_FILE) from None
        _sound(path, f"it cannot be read ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})")
        raise
    optimizer_state = state["optimizer"]
    if shard_optimizer is not None:
        optimizer_state = shard_optimizer(optimizer_state, optimizer)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    random.setstate((3, tuple(state["rng_python"]), None))
    np_state = list(np.random.get_state())
    np_state[1] = state["rng_numpy"].numpy().astype(np.uint32)
    np.random.set_state(tuple(np_state))
    return int(state["step"])


def load_adapter_weights(path: Path, model, device) -> None:
    """The checkpoint's adapter weights into the model (not yet sharded, when it is to be)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path / ADAPTER_WEIGHTS), device=str(device))
    except Exception as exc:  # damage the preflight's look at the files did not show
        if _is_permission_error(exc):
            raise _unreadable(exc, path / ADAPTER_WEIGHTS) from None
        _sound(path, f"it cannot be read ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})")
        raise
    set_peft_model_state_dict(model, weights)


def save_adapter_atomically(
    model, target: Path, initial: Path | None = None, state: dict | None = None
) -> None:
    """The final adapter, written beside `target` and renamed into place; with `initial` (PiSSA /
    OLoRA's adapter before training) converted by PEFT to a plain LoRA of twice the rank, which
    applies to the unchanged base as chat, merge and export load it."""
    tmp = _staging(target)
    with _written_whole_or_not_at_all(tmp), writing(target / ADAPTER_WEIGHTS):
        shutil.rmtree(tmp, ignore_errors=True)
        if initial is None:
            model.save_pretrained(tmp, state_dict=state)
        else:
            model.save_pretrained(tmp, path_initial_model_for_weight_conversion=str(initial))
        follow_umask(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _staging(target: Path) -> Path:
    """Where save_adapter_atomically writes `target` before renaming it into place."""
    return target.with_name(f".{target.name}.tmp")
