"""The demo's settings: the identity fine-tune of the built-in demo model, tuned to learn its new
name in a minute on a CPU. `tunebench demo` runs it; a fresh TUI workspace starts its form
from it, so it is torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import UserError
from .sample_data import find_sample_data


def sample_data_dir() -> Path:
    """find_sample_data(), or a UserError that says where it is looked for."""
    found = find_sample_data()
    if found is not None:
        return found
    raise UserError(
        "sample_data/self_cognition.jsonl not found", "run from the TuneBench checkout, or pass --dataset"
    )


def demo_config(output_dir: str = "runs", **overrides: Any) -> TrainConfig:
    """The settings the README's demo uses: tuned so a 135M model learns its name in ~1 minute on CPU."""
    settings: dict[str, Any] = dict(
        model="demo",
        dataset=[str(sample_data_dir() / "self_cognition.jsonl")],
        model_name=["小蜂", "TuneBee"],
        model_author=["TuneBench团队", "the TuneBench team"],
        torch_dtype="bfloat16",
        num_train_epochs=3.0,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=2e-3,
        lora_rank=8,
        lora_alpha=32,
        lora_dropout=0.0,
        warmup_ratio=0.05,
        gradient_checkpointing=False,  # activations of a 135M model are tiny; recompute only costs time
        logging_steps=2,
        # A few held-out samples and a checkpoint per epoch, so the demo shows the eval curve and
        # the checkpoint list too (eval costs a forward over 7 samples; a save about 0.3 s).
        val_ratio=0.1,
        eval_steps=4,
        save_steps=8,
        save_total_limit=2,
        output_dir=output_dir,
    )
    settings.update(overrides)
    return TrainConfig(**settings)
