"""--report_to: the run's train and eval curves also go to TensorBoard, SwanLab or W&B, offline.

metrics.jsonl is always written; a tracker is a second copy in the format its viewer reads.
TensorBoard's event files go under the run folder (`tensorboard --logdir runs/<run-id>`); W&B and
SwanLab write offline runs there too unless WANDB_MODE / SWANLAB_MODE say otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.config import TrainConfig, to_dict

# what TrainStep / EvalResult fields become, per tracker: the same names in all three
CURVES = {
    "TrainStep": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm"},
    "EvalResult": {"eval_loss": "eval/loss"},
}


class Tracker:
    """No tracker (--report_to none): the interface the recipe calls."""

    def log(self, event: dict[str, Any]) -> None:
        curves = CURVES.get(event.get("type", ""))
        if curves:
            self.write({tag: float(event[key]) for key, tag in curves.items()}, int(event["step"]))

    def write(self, values: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, cfg: TrainConfig, run_root: Path) -> None:
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the box unless asked
        self.run = wandb.init(project="tunebench", name=run_root.name, dir=str(run_root), config=to_dict(cfg))

    def write(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class SwanLabTracker(Tracker):
    def __init__(self, cfg: TrainConfig, run_root: Path) -> None:
        import swanlab

        self.run = swanlab.init(
            project="tunebench",
            experiment_name=run_root.name,
            logdir=str(run_root / "swanlog"),
            mode=os.environ.get("SWANLAB_MODE", "local"),  # nothing leaves the box unless asked
            config=to_dict(cfg),
        )

    def write(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(cfg: TrainConfig, run_root: Path) -> Tracker:
    """The tracker --report_to names (its package was checked with the settings)."""
    if cfg.report_to == "tensorboard":
        return TensorBoardTracker(run_root / "tensorboard")
    if cfg.report_to == "wandb":
        return WandbTracker(cfg, run_root)
    if cfg.report_to == "swanlab":
        return SwanLabTracker(cfg, run_root)
    return Tracker()
