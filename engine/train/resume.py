"""A run's record and resuming from it: the config.json each run writes when it starts (its
settings, data and batch layout), the settings a resume trains with, the changes a resume may
make to them, and the data it trained on.

A resume trains with the run's recorded settings (its config.json). Settings given with the
resume (the flags on the command line, the form's values from the TUI) replace them where a
resume can honour them (epochs, learning rate, save_steps, ...): those are applied and reported.
Those marked `resume="fixed"` in core/config.py (the model, the LoRA shape, the template) would
not fit the checkpoint's weights or would train on different tokens: a change there is refused
with the list of differences. Standard library only at import time, like the preflight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shlex
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from ..core.config import TrainConfig, format_value, to_command, to_dict
from ..core.errors import UserError
from ..core.files import atomic_write_bytes, next_free
from ..core.workspace import checkpoint_step, list_checkpoints, read_metrics, read_run
from .checkpoints import find_checkpoint
from .types import RunPaths

# What the resume itself decides: the run folder comes from the checkpoint, and the number of
# processes and their GPUs from this launch (a resume on another number says what that changes:
# recipe.py).
_NOT_SETTINGS = ("resume_from_checkpoint", "output_dir", "run_name", "nproc_per_node", "gpus")


def resume_config(given: dict[str, Any], typed: bool = True) -> TrainConfig:
    """The config a resume trains with: the run's recorded settings, with the `given` ones (which
    include resume_from_checkpoint) applied; UserError listing any a resume cannot change.
    `typed`: `given` holds only what the person asked for (the command's flags), so an
    --output_dir or --run_name other than the run's is refused; the TUI's form always sends its
    own, meant for new runs."""
    checkpoint = find_checkpoint(given["resume_from_checkpoint"])
    run = RunPaths(checkpoint.parent.parent)
    record = read_run_config(run)
    recorded = recorded_config(record, run.config)
    changes = {k: v for k, v in given.items() if k not in _NOT_SETTINGS}
    if typed:
        refuse_another_place(given, run.root)
    # the run goes on in its own folder, whatever the defaults or the flags say
    where = {"output_dir": str(run.root.parent), "run_name": (record.get("config") or {}).get("run_name", "")}
    cfg = TrainConfig(
        **{**recorded, **changes, **where, "resume_from_checkpoint": given["resume_from_checkpoint"]}
    )
    applied = resume_changes(recorded, cfg, str(checkpoint))
    for flag in ("dataset", "val_dataset"):
        if flag not in changes:
            _check_recorded_data(flag, getattr(cfg, flag), run.root, record)
    # the same settings on the same data plan the same steps: a complete run is refused at once,
    # before the model loads (else the recipe refuses it once it knows the steps planned); the
    # data is hashed only for a complete run, since the recipe hashes it again for every resume
    if not applied and read_run(run.root).status == "completed":
        if not data_changed_warning(record.get("dataset_sha256") or {}, dataset_hashes(cfg)):
            refuse_finished_run(run.root, cfg, None, checkpoint)
    return cfg


def refuse_another_place(given: dict[str, Any], run_root: Path) -> None:
    """A resume continues the run in its own folder: an --output_dir or --run_name that names
    another would not be honoured, so it is refused (UserError) rather than ignored."""
    asked = []
    output_dir = given.get("output_dir")
    if output_dir and Path(output_dir).expanduser().resolve() != run_root.parent.resolve():
        asked.append(f"--output_dir {output_dir}")
    if given.get("run_name") and given["run_name"] != run_root.name:
        asked.append(f"--run_name {given['run_name']}")
    if not asked:
        return
    raise UserError(
        f"--resume_from_checkpoint: a resume continues run {run_root} in its own folder, so "
        f"{' and '.join(asked)} cannot be applied (the run's are --output_dir {run_root.parent} "
        f"--run_name {run_root.name})",
        f"leave {' and '.join(a.split()[0] for a in asked)} out to continue the run where it is; to "
        "train elsewhere, copy the run's folder there and resume the copy, or start a new run "
        "without --resume_from_checkpoint",
        code="config",
    )


def refuse_finished_run(run_root: Path, cfg: TrainConfig, planned: int | None, checkpoint: Path) -> int:
    """A resume of a completed run that plans no more steps than it took (`planned`; None when not
    known yet, for settings that plan the run's own steps) has nothing to train, or would train
    its last steps again over its finished adapter and metrics: UserError. The steps the run
    completed (0 when it did not)."""
    info = read_run(run_root)
    completed = info.steps if info.status == "completed" else 0
    if not completed or (planned is not None and planned > completed):
        return completed
    epochs = f"now {format_value(cfg.num_train_epochs)}" if cfg.max_steps <= 0 else "with --max_steps -1"
    saved_at = checkpoint_step(checkpoint) or 0
    again = (
        "a resume with the same steps has nothing left to train"
        if saved_at >= completed
        else f"resuming it from {checkpoint.name} would train steps {saved_at + 1}-{completed} again "
        "and replace that adapter"
    )
    raise UserError(
        f"--resume_from_checkpoint: run {run_root} is complete: it trained all {completed} steps and "
        f"saved its adapter in {RunPaths(run_root).adapter}; {again}",
        f"to train it further, resume with more steps: a higher --num_train_epochs ({epochs}) or "
        f"--max_steps above {completed}; to use it as it is, `tunebench chat --adapters {run_root}`",
        code="config",
    )


def continued_note(completed: int, planned: int, checkpoint: Path) -> str:
    """What a resume of a completed run with more steps does: goes on from its last step (the
    schedule stretched to the new length), or trains again the steps after an earlier checkpoint."""
    saved_at = checkpoint_step(checkpoint) or 0
    note = f"the run had completed {completed} steps; it continues to {planned} from {checkpoint.name}"
    if saved_at < completed:  # an earlier checkpoint, or a run made before the last step was saved
        return f"{note} (steps {saved_at + 1}-{completed} train again, in the longer schedule)"
    return f"{note}, its learning-rate schedule stretched to {planned} steps"


def recorded_config(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """The TrainConfig fields a run recorded when it started (or last resumed): `payload` is its
    config.json as read_run_config read it from `path`."""
    if not isinstance(payload.get("config"), dict):
        raise UserError(
            f"--resume_from_checkpoint: {path} is missing or unreadable, so the settings the run "
            "trained with are unknown",
            "resume a run TuneBench made (its folder holds config.json), or start a new run",
            code="config",
        )
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in payload["config"].items() if k in names and k not in _NOT_SETTINGS}
    started_in = payload.get("cwd")  # runs record their data as absolute paths, and this folder
    for key in ("dataset", "val_dataset"):
        if started_in and isinstance(settings.get(key), list):
            settings[key] = [absolute_spec(spec, started_in) for spec in settings[key]]
    return settings


def absolute_spec(spec: Any, root: str | Path) -> Any:
    """A dataset spec with its file made absolute from `root` (a hub id stays as typed)."""
    from ..core.data import resolve_dataset_spec

    return resolve_dataset_spec(spec, root) if isinstance(spec, str) else spec


def _check_recorded_data(flag: str, specs: list[str], run_root: Path, record: dict[str, Any]) -> None:
    """Runs made before the data was recorded as absolute paths (and the folder they started in)
    hold it as typed: from another folder the file is not found. UserError naming the file and
    the folder to run the resume from."""
    from ..core.data import parse_dataset_spec
    from ..core.errors import DataError
    from ..core.model_files import looks_like_hub_id

    for spec in specs:
        try:
            path = parse_dataset_spec(spec).path
        except (DataError, TypeError, AttributeError):
            continue  # reading the data says what is wrong with it
        hub_id = looks_like_hub_id(str(path)) and not path.suffix
        if path.is_absolute() or hub_id or path.exists():
            continue
        output_dir = (record.get("config") or {}).get("output_dir") or ""
        folder = _started_in(run_root, output_dir)
        there = (
            f"from {folder}, the folder it was started in" if folder else "from the folder it was started in"
        )
        raise UserError(
            f"--resume_from_checkpoint: the run recorded --{flag} {spec} relative to the folder it "
            f"was started in, and {path.absolute()} does not exist",
            f"run the resume {there}, or give the data again: --{flag} <its path>",
            code="data",
        )


def _started_in(run_root: Path, output_dir: str) -> Path | None:
    """The folder a run was started in, when its relative --output_dir says it: runs/<id> under
    <folder>/runs; None when that cannot be told."""
    out = Path(output_dir).expanduser()
    parent = run_root.absolute().parent
    if not output_dir or out.is_absolute():
        return None
    depth = len(out.parts)
    if depth == 0:  # "."
        return parent
    return Path(*parent.parts[:-depth]) if parent.parts[-depth:] == out.parts else None


def resume_changes(recorded: dict[str, Any], cfg: TrainConfig, checkpoint: str) -> list[str]:
    """ "--name old -> new" for each setting `cfg` changes from the recorded ones; UserError naming
    every change a resume cannot make, all at once."""
    fixed, applied = [], []
    for f in dataclasses.fields(TrainConfig):
        if f.name in _NOT_SETTINGS:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        old, new = recorded.get(f.name, default), getattr(cfg, f.name)  # default: not recorded by older runs
        if _same(f.name, old, new):
            continue
        line = f"--{f.name} {_shown(old)} -> {_shown(new)}"
        (fixed if f.metadata.get("resume") == "fixed" else applied).append(line)
    if fixed:
        raise UserError(
            f"cannot resume {checkpoint} with these settings changed:\n  " + "\n  ".join(fixed),
            "a resume keeps the run's model, LoRA shape and chat template, which its weights were "
            "trained with: set them back (leave those flags out to take the run's own), or start a "
            "new run without --resume_from_checkpoint",
            code="config",
        )
    return applied


def _shown(value: Any) -> str:
    return format_value(value) or "''"


def _same(name: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if name == "model" and isinstance(old, str) and isinstance(new, str):
        a, b = Path(old).expanduser(), Path(new).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    if name in ("dataset", "val_dataset") and isinstance(old, list) and isinstance(new, list):
        here = Path.cwd()
        return [absolute_spec(s, here) for s in old] == [absolute_spec(s, here) for s in new]
    return False


# ------------------------------------------------------------- the run's record


def logged_seconds(run_dir: Path) -> float:
    """The elapsed time of the last step a run's metrics.jsonl holds (0 when none)."""
    steps = [r for r in read_metrics(run_dir) if r.get("type") == "TrainStep"]
    return float(steps[-1].get("elapsed_s") or 0.0) if steps else 0.0


def stopped_by_signal(signum: int, run_dir: str | Path, processes: int | None) -> str:
    """What a run stopped by Ctrl-C or SIGTERM says last: the command that continues it from its
    newest checkpoint, or that it has none to continue from."""
    name = signal.Signals(signum).name
    if run_dir and list_checkpoints(run_dir):
        return f"stopped by {name}; to continue the run: {resume_command(run_dir, processes)}"
    return (
        f"stopped by {name} before any checkpoint was saved: nothing to resume; run the same command "
        "again to start over"
    )


def resume_command(run_dir: str | Path, processes: int | None = 1) -> str:
    """The command that continues a run: its folder holds every setting, but not how many
    processes trained it (a resume on another number says what that changes)."""
    more = f" --nproc_per_node {processes}" if processes and processes > 1 else ""
    return f"tunebench train --resume_from_checkpoint {shlex.quote(str(Path(run_dir).absolute()))}{more}"


def new_run_dir(cfg: TrainConfig) -> Path:
    """A new run's folder: --run_name, or the time it started, under --output_dir."""
    base = Path(cfg.output_dir).expanduser()
    return next_free(base / (cfg.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")))


def write_run_config(
    run: RunPaths,
    cfg: TrainConfig,
    base_path: Path,
    micro_batches_per_step: int,
    processes: int,
    created: str | None = None,
) -> None:
    """The run's config.json, written when it starts and again at each resume: the settings the next
    resume starts from, and the data they trained on."""
    recorded = _as_recorded(cfg, run)
    payload = {
        "run_id": run.root.name,
        "config": to_dict(recorded),
        "command": to_command(recorded),
        "cwd": str(Path.cwd()),  # what relative paths were typed from
        "base_model_path": str(base_path),
        "dataset_sha256": dataset_hashes(cfg),  # a resume on other data warns
        "created": created or datetime.now().isoformat(timespec="seconds"),
        # what a resume on another number of processes keeps, and says it changed
        "micro_batches_per_step": micro_batches_per_step,
        "processes": processes,
    }
    atomic_write_bytes(run.config, orjson.dumps(payload, option=orjson.OPT_INDENT_2), sync_dir=True)


def _as_recorded(cfg: TrainConfig, run: RunPaths) -> TrainConfig:
    """`cfg` with its data files, run folder and the checkpoint it resumed from as absolute paths:
    a resume finds them from any folder."""
    here = Path.cwd()
    resumed = cfg.resume_from_checkpoint
    return dataclasses.replace(
        cfg,
        dataset=[absolute_spec(s, here) for s in cfg.dataset],
        val_dataset=[absolute_spec(s, here) for s in cfg.val_dataset],
        output_dir=str(run.root.absolute().parent),
        resume_from_checkpoint=str(Path(resumed).expanduser().absolute()) if resumed else "",
    )


def read_run_config(run: RunPaths) -> dict[str, Any]:
    """The run's config.json as written ({} when missing or unreadable: a resume then keeps
    this launch's batch settings)."""
    try:
        payload = orjson.loads(run.config.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return payload if isinstance(payload, dict) else {}


# ------------------------------------------------------------------ the data


def dataset_hashes(cfg: TrainConfig) -> dict[str, str]:
    """sha256 of each dataset file the config trains on, by the file's absolute path: what a
    resume compares to tell that the data changed under the run."""
    from ..core.data import parse_dataset_spec
    from ..core.errors import DataError

    hashes = {}
    for spec in (*cfg.dataset, *cfg.val_dataset):
        try:
            path = parse_dataset_spec(spec).path.absolute()
            hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        except (DataError, OSError):
            continue  # reading the data says what is wrong with it
    return hashes


def data_changed_warning(recorded: dict[str, str], now: dict[str, str]) -> str:
    """The warning for a resume on data other than the run's (empty when the same, or when the
    run recorded no hashes: runs made before they were recorded)."""
    if not recorded or sorted(recorded.values()) == sorted(now.values()):
        return ""
    changed = [name for name, digest in now.items() if recorded.get(name) not in (None, digest)]
    new = [name for name in now if name not in recorded]
    gone = [name for name in recorded if name not in now]
    parts = [
        f"{', '.join(names)} {what}"
        for names, what in (
            (changed, "changed since the run trained on it"),
            (new, "is new to the run"),
            (gone, "is no longer in it"),
        )
        if names
    ]
    return (
        "warning: resuming on different data: " + "; ".join(parts) + ". The steps before the "
        "checkpoint trained on the old data, and the order of what follows differs from an "
        "uninterrupted run"
    )
