"""What the Chat pane can talk to: the base model, and every adapter and checkpoint in runs/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BASE = "base"


@dataclass(frozen=True)
class Target:
    path: str  # "base", or an adapter / checkpoint folder as the engine's Generate takes it
    label: str  # short column title


def target_label(path: str) -> str:
    """ "base", "0612-1530 final", "0612-1530 step 50": enough to tell columns apart at 80 cols."""
    if path == BASE:
        return BASE
    p = Path(path)
    if p.name == "adapter":
        return f"{p.parent.name} final"
    if p.name.startswith("step-") and p.parent.name == "checkpoints":
        return f"{p.parent.parent.name} step {p.name.removeprefix('step-')}"
    return p.name


def discover_targets(runs_dir: Path) -> list[Target]:
    """Base first, then each run's final adapter and checkpoints, newest run first."""
    found = [Target(BASE, BASE)]
    try:
        runs = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)
    except OSError:
        return found
    for run in runs:
        if (run / "adapter" / "adapter_config.json").is_file():
            found.append(Target(str(run / "adapter"), target_label(str(run / "adapter"))))
        checkpoints = sorted(
            (run / "checkpoints").glob("step-*"),
            key=lambda p: int(p.name.removeprefix("step-")) if p.name[5:].isdigit() else -1,
            reverse=True,
        )
        for ckpt in checkpoints:
            if (ckpt / "adapter_config.json").is_file():
                found.append(Target(str(ckpt), target_label(str(ckpt))))
    return found


def default_targets(runs_dir: Path) -> list[Target]:
    """Base plus the newest final adapter: the A/B a person most likely wants."""
    found = discover_targets(runs_dir)
    adapters = [t for t in found if t.path.endswith("adapter")]
    return [found[0], *adapters[:1]]
