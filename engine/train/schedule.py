"""The run's steps: which samples each optimizer step takes (fixed up front by the seed, so a
resume replays them), how many steps that makes, and the learning rate at each."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from ..core.config import TrainConfig
from ..core.errors import UserError
from ..core.limits import MAX_SAMPLE_PASSES, MAX_STEPS
from .types import IGNORE as IGNORE_LABEL


def build_plan(num_samples: int, cfg: TrainConfig, per_step: int = 0) -> list[list[list[int]]]:
    """Every optimizer step's micro-batches of sample indices, fixed by the seed: `per_step` of
    them (all ranks' together; default: --gradient_accumulation_steps, one process).

    Each epoch is its own seeded permutation and steps never straddle epochs, so resuming at step
    k replays exactly the batches an uninterrupted run would have seen.
    """
    bs, ga = cfg.per_device_train_batch_size, per_step or cfg.gradient_accumulation_steps
    check_plan_size(num_samples, cfg, ga)
    total = planned_steps(num_samples, cfg, ga)
    plan: list[list[list[int]]] = []
    epoch = 0
    while len(plan) < total:
        order = list(range(num_samples))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        micro = [order[i : i + bs] for i in range(0, num_samples, bs)]
        plan.extend(micro[i : i + ga] for i in range(0, len(micro), ga))
        epoch += 1
    return plan[:total]


def planned_steps(num_samples: int, cfg: TrainConfig, per_step: int = 0) -> int:
    """Optimizer steps the run takes: --max_steps, or --num_train_epochs passes over the data."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch(num_samples, cfg, per_step)))


def check_plan_size(num_samples: int, cfg: TrainConfig, per_step: int = 0) -> None:
    """Refuse a run whose step plan would not fit in memory (engine/core/limits.py), before it is
    built: the plan is made whole up front, so resuming replays it exactly."""
    steps = planned_steps(num_samples, cfg, per_step)
    micro = per_step or cfg.gradient_accumulation_steps
    per_step = min(cfg.per_device_train_batch_size * micro, num_samples)
    fewer = "lower --num_train_epochs" if cfg.max_steps <= 0 else "lower --max_steps"
    if steps > MAX_STEPS:
        raise UserError(
            f"this run would take {steps:,} optimizer steps ({num_samples:,} samples, "
            f"{cfg.num_train_epochs:g} epochs); one run takes at most {MAX_STEPS:,}",
            f"{fewer}, or raise gradient_accumulation_steps (more samples per step)",
            code="config",
        )
    if steps * per_step > MAX_SAMPLE_PASSES:
        raise UserError(
            f"this run would feed {steps * per_step:,} samples ({steps:,} steps of {per_step:,}); "
            f"one run takes at most {MAX_SAMPLE_PASSES:,}",
            f"{fewer}, or take fewer samples (path#N)",
            code="config",
        )


def steps_per_epoch(num_samples: int, cfg: TrainConfig, per_step: int = 0) -> int:
    """Optimizer steps in one pass over the data; the last step of an epoch may be short."""
    batches = math.ceil(num_samples / cfg.per_device_train_batch_size)
    return math.ceil(batches / (per_step or cfg.gradient_accumulation_steps))


def micro_batches_per_step(cfg: TrainConfig, world: int, recorded_run: dict[str, Any]) -> int:
    """Micro-batches in one optimizer step, over all ranks: accumulation x ranks, as in ms-swift.
    A resume keeps its run's, on any number of ranks, so its steps take the samples an
    uninterrupted run would have; unless it changes the batch settings, which start afresh."""
    before = recorded_run.get("config") or {}
    kept = recorded_run.get("micro_batches_per_step", before.get("gradient_accumulation_steps"))
    batch = ("per_device_train_batch_size", "gradient_accumulation_steps")
    same = all(before.get(k) == getattr(cfg, k) for k in batch)
    if same and isinstance(kept, int) and kept > 0:
        return kept
    return cfg.gradient_accumulation_steps * world


def loss_tokens(sample: Any) -> int:
    """The tokens a sample's loss counts: its labels after the first that are not ignored (as
    the plain collate and the CUDA path's packing both count them)."""
    return sum(1 for label in sample.labels[1:] if label != IGNORE_LABEL)


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    # --warmup_steps over --warmup_ratio, as in transformers' Trainer
    warmup = (
        min(cfg.warmup_steps, total_steps) if cfg.warmup_steps else math.ceil(cfg.warmup_ratio * total_steps)
    )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
