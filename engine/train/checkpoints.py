"""Training checkpoints on disk: saving, pruning, finding and loading them, and the final adapter.

    <run>/checkpoints/step-<n>/  adapter + trainer_state.pt (optimizer, scheduler, RNG, step)
    <run>/adapter/               the final adapter in PEFT format

Every folder is written under a temporary name and renamed into place, so a crash leaves either
the complete folder or none (workspace.list_checkpoints counts only folders with the state file).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import UserError
from ..core.files import fsync_dir, writing
from ..core.targets import ADAPTER_WEIGHTS
from ..core.workspace import CHECKPOINT_STATE_FILE, list_checkpoints

if TYPE_CHECKING:
    from .types import RunPaths


def save_checkpoint(run: RunPaths, step: int, model, optimizer, scheduler, keep: int) -> Path:
    """Write checkpoints/step-<n>/ under a temporary name, fsync, then rename: never half-written."""
    import numpy as np
    import torch

    final = run.checkpoints / f"step-{step}"
    tmp = run.checkpoints / f".tmp-step-{step}"
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
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
            model.save_pretrained(tmp)
        with writing(final / CHECKPOINT_STATE_FILE):
            torch.save(state, tmp / CHECKPOINT_STATE_FILE)
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)  # the same step saved again (after a resume)
    os.replace(tmp, final)
    fsync_dir(run.checkpoints, ignore_errors=False)  # the rename itself survives a power loss
    _prune_checkpoints(run, keep)
    return final


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

    weights = load_file(str(path / ADAPTER_WEIGHTS), device=str(device))
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
    tmp = target.with_name(f".{target.name}.tmp")
    with _written_whole_or_not_at_all(tmp), writing(target / ADAPTER_WEIGHTS):
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
