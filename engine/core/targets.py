"""What a chat column points at: the base model, or an adapter and the run that trained it.

Targets are "base", or a run folder (its adapter/, else its newest checkpoint), an adapter
folder, or a checkpoint folder. An adapter's files are checked when it is found, so a damaged or
half-copied one is named here rather than met as a loader's traceback. The run's config.json (in
the same folder, its parent or its grandparent) supplies the base model, the chat template and
the system prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .errors import UserError
from .files import reading
from .workspace import list_checkpoints

BASE = "base"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)  # what a checkpoint holds once its adapter is saved
TARGET_HINT = (
    "give a run folder (runs/<run-id>), its adapter/ folder, or a checkpoint folder "
    "(runs/<run-id>/checkpoints/step-<n>)"
)


@dataclass(frozen=True)
class Target:
    """One column: the base model, or an adapter folder and what its run recorded."""

    spec: str  # as the caller wrote it; results are keyed by this
    adapter_dir: Path | None = None  # None for the base model
    run: dict[str, Any] = field(default_factory=dict)  # the run's config.json, {} if none found
    run_dir: Path | None = None

    @property
    def is_base(self) -> bool:
        return self.adapter_dir is None

    @property
    def train_config(self) -> dict[str, Any]:
        config = self.run.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def label(self) -> str:
        """A short column title: base, <run-id>, <run-id>/step-<n> or the folder name."""
        if self.adapter_dir is None:
            return BASE
        if self.run_dir is not None and self.adapter_dir.parent == self.run_dir:
            return self.run_dir.name
        if self.run_dir is not None and self.adapter_dir.parent.parent == self.run_dir:
            return f"{self.run_dir.name}/{self.adapter_dir.name}"
        return self.adapter_dir.name


def resolve_target(spec: str) -> Target:
    """The base model for "base", else the adapter a path points at and its run's settings."""
    if spec == BASE:
        return Target(spec)
    adapter_dir = find_adapter_dir(spec)
    run, run_dir = find_run_config(adapter_dir)
    return Target(spec, adapter_dir, run, run_dir)


def find_adapter_dir(spec: str) -> Path:
    """The PEFT adapter folder for a run folder, an adapter folder or a checkpoint folder."""
    with reading(spec):
        return _find_adapter_dir(Path(spec).expanduser())


def _find_adapter_dir(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"adapter not found: {path} does not exist", TARGET_HINT)
    if path.is_file():
        if path.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            raise UserError(f"{path} is a file, not an adapter folder", TARGET_HINT)
        path = path.parent
    path = path.resolve()
    if (path / ADAPTER_CONFIG).is_file():
        return _checked_adapter(path)
    if (path / "adapter" / ADAPTER_CONFIG).is_file():
        return _checked_adapter(path / "adapter")
    # A run still training has no adapter/ yet: its newest checkpoint is the latest adapter.
    checkpoints = list_checkpoints(path.parent if path.name == "checkpoints" else path, ADAPTER_FILES)
    if checkpoints:
        return _checked_adapter(checkpoints[-1])
    if (path / "config.json").is_file():  # a whole model, given where an adapter goes
        raise UserError(
            f"{path} is a model, not an adapter: it holds config.json and no {ADAPTER_CONFIG}",
            f"pass it as the base with --model {path}; --adapters takes a run or adapter folder",
        )
    runs = _runs_inside(path)
    if runs:  # ms-swift's --output_dir given where one of its runs goes
        listed = ", ".join(str(r) for r in runs[-3:])
        raise UserError(
            f"{path} is a folder of runs, not a run: it holds {len(runs)} ({listed})",
            f"pass one of them, e.g. --adapters {runs[-1]} (the last by name)",
        )
    raise UserError(
        f"{path} holds no adapter: no {ADAPTER_CONFIG}, no adapter/ folder and no saved checkpoint",
        TARGET_HINT,
    )


def _runs_inside(path: Path) -> list[Path]:
    """Run folders directly inside `path` (each with an adapter or a saved checkpoint), by name."""
    try:
        children = sorted(p for p in path.iterdir() if p.is_dir())
    except OSError:
        return []
    return [
        c
        for c in children
        if (c / "adapter" / ADAPTER_CONFIG).is_file() or list_checkpoints(c, ADAPTER_FILES)
    ]


def _checked_adapter(path: Path) -> Path:
    if (path / ADAPTER_WEIGHTS).is_file():
        _check_adapter_files(path)
        return path
    if (path / "adapter_model.bin").is_file():
        raise UserError(
            f"{path} holds its adapter as a pickle file (adapter_model.bin), which can run code when loaded",
            "re-save it as safetensors (PeftModel.save_pretrained does by default)",
        )
    raise UserError(
        f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}",
        "the adapter is incomplete: wait for the save to finish, or copy the whole folder",
    )


def _check_adapter_files(path: Path) -> None:
    """A damaged or half-copied adapter is named here, not met as a loader's traceback later."""
    hint = "the adapter is damaged or was not copied completely: copy or save it again"
    try:
        config = orjson.loads((path / ADAPTER_CONFIG).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise UserError(f"{path / ADAPTER_CONFIG} is not valid JSON: {exc}", hint) from None
    if not isinstance(config, dict):
        raise UserError(f"{path / ADAPTER_CONFIG} is not a JSON object", hint)
    # PEFT picks the adapter's class by peft_type: without it, a KeyError is all it says.
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise UserError(
            f"{path / ADAPTER_CONFIG} has no 'peft_type': it is not the config of a PEFT adapter",
            "point --adapters at a folder saved by PEFT (its save_pretrained writes adapter_config.json "
            'with "peft_type": "LORA"), such as a run\'s adapter/ folder',
        )
    if peft_type != "LORA":  # what training makes, merging merges and vLLM serves
        raise UserError(
            f"{path / ADAPTER_CONFIG} is a {peft_type} adapter: TuneBench loads LoRA adapters "
            '("peft_type": "LORA") only',
            "point --adapters at a LoRA adapter, such as a run's adapter/ folder",
        )
    weights = path / ADAPTER_WEIGHTS
    try:  # safetensors: an 8-byte header length, a JSON header, then the tensors' bytes
        size = weights.stat().st_size
        with open(weights, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if size < 8 or length > size - 8:
                raise ValueError
            header = orjson.loads(fh.read(length))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if 8 + length + max(ends, default=0) > size:
            raise ValueError
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise UserError(f"{weights} is not a complete safetensors file", hint) from None


def find_run_config(adapter_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """The run's config.json (same folder, parent or grandparent) and the run folder; ({}, None) if none."""
    for folder in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent):
        path = folder / "config.json"
        if not path.is_file():
            continue
        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        # A model folder's config.json sits here too sometimes; only a run's has the "config" dict.
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            return data, folder
    return {}, None


def adapters_base(targets: Sequence[Target]) -> str | None:
    """The base model the adapters among `targets` were trained on, as their runs recorded it (a
    spec load_model accepts); None when no adapter records one. Adapters of different bases are
    refused here, naming each, before any weights load: one loaded base cannot answer for both."""
    bases: dict[str, list[str]] = {}
    for target in targets:
        base = None if target.is_base else recorded_base_model(target.run, target.adapter_dir)
        if base:
            bases.setdefault(base, []).append(target.label)
    if len(bases) > 1:
        raise UserError(
            "these adapters were trained on different base models: "
            + "; ".join(f"{', '.join(labels)} on {base}" for base, labels in sorted(bases.items())),
            "compare adapters of one base at a time, or name the base with --model",
        )
    return next(iter(bases), None)


def check_trained_on(target: Target, base_path: str | Path, named: str) -> None:
    """Refuse an adapter whose run recorded another base than the model at `base_path` (`named`
    says which, in the message). A recorded base that is not on this machine (the run was copied
    from another) cannot be compared and passes."""
    recorded = str(target.run.get("base_model_path") or "")
    if recorded and Path(recorded).exists() and Path(recorded).resolve() != Path(base_path).resolve():
        raise UserError(
            f"{target.spec} was trained on {recorded}, not on {named}",
            "leave --model out so the run's own base model is used, or pass that base",
        )


def recorded_base_model(run: dict[str, Any], adapter_dir: Path | None = None) -> str | None:
    config: dict[str, Any] = run["config"] if isinstance(run.get("config"), dict) else {}
    spec = str(config.get("model") or "")
    path = str(run.get("base_model_path") or "")
    if spec == "demo":  # the cache folder it resolved to is an implementation detail
        return spec
    if path and (Path(path) / "config.json").is_file():
        return path
    if spec:
        return spec
    if adapter_dir is not None:  # no run config: PEFT's own record of the base
        try:
            adapter_config = orjson.loads((adapter_dir / ADAPTER_CONFIG).read_bytes())
            recorded = adapter_config.get("base_model_name_or_path")
        except (OSError, orjson.JSONDecodeError, AttributeError):
            recorded = None
        if recorded and isinstance(recorded, str):
            return recorded  # a hub id loads from the local cache, or its load says it is not there
    return path or None


def export_name(adapter: Path) -> str:
    """The export folder's name for an adapter: <run-id> for runs/<run-id>/adapter,
    <run-id>-step-<n> for a checkpoint, else the adapter folder's own name."""
    if adapter.name == "adapter":
        return adapter.parent.name
    if adapter.parent.name == "checkpoints":
        return f"{adapter.parent.parent.name}-{adapter.name}"
    return adapter.name or "model"
