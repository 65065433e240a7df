"""What the Chat pane's columns can show: the base model, and every adapter and checkpoint in runs/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunebench.engine.core.errors import UserError
from tunebench.engine.core.targets import ADAPTER_CONFIG, ADAPTER_FILES, adapters_base, resolve_target
from tunebench.engine.core.workspace import checkpoint_step, list_checkpoints

BASE = "base"


@dataclass(frozen=True)
class ColumnChoice:
    """One column a person can pick: what it talks to and its title. The engine resolves `path`
    into its own Target (engine/core/targets.py) when the column is asked something."""

    path: str  # "base", or an adapter / checkpoint folder as the engine's Generate takes it
    label: str  # short column title


def column_label(path: str) -> str:
    """ "base", "0612-1530 final", "0612-1530 step 50": enough to tell columns apart at 80 cols."""
    if path == BASE:
        return BASE
    p = Path(path)
    if p.name == "adapter":
        return f"{p.parent.name} final"
    step = checkpoint_step(p)
    if step is not None and p.parent.name == "checkpoints":
        return f"{p.parent.parent.name} step {step}"
    return p.name


def discover_columns(runs_dir: Path) -> list[ColumnChoice]:
    """Base first, then each run's final adapter and checkpoints, newest run first."""
    found = [ColumnChoice(BASE, BASE)]
    try:
        runs = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)
    except OSError:
        return found
    for run in runs:
        if (run / "adapter" / ADAPTER_CONFIG).is_file():
            found.append(ColumnChoice(str(run / "adapter"), column_label(str(run / "adapter"))))
        for checkpoint in reversed(list_checkpoints(run, ADAPTER_FILES)):
            found.append(ColumnChoice(str(checkpoint), column_label(str(checkpoint))))
    return found


def default_columns(runs_dir: Path) -> list[ColumnChoice]:
    """Base plus the newest final adapter: the A/B a person most likely wants."""
    found = discover_columns(runs_dir)
    adapters = [t for t in found if t.path.endswith("adapter")]
    return [found[0], *adapters[:1]]


def columns_problem(choices: list[ColumnChoice]) -> str:
    """Why these columns cannot be asked together ("" if they can): an adapter the engine could not
    load, or adapters of different base models, which one loaded base cannot answer for."""
    try:
        adapters_base([resolve_target(c.path) for c in choices if c.path != BASE])
    except UserError as exc:
        return exc.message
    return ""
