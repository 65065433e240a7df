"""What the recipe and the CUDA path share: the run's files, a micro-batch, and the train path that
builds batches and computes the loss. Below both, so the CUDA path never imports the recipe."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.encoding import IGNORE_INDEX

IGNORE = IGNORE_INDEX  # the label the loss skips; core/encoding.py writes it into the labels


@dataclass
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def initial_adapter(self) -> Path:
        """PiSSA / OLoRA's adapter before training: the final adapter is converted with it to a
        plain LoRA adapter for the unchanged base (those inits move part of the base into it)."""
        return self.root / "initial_adapter"


@dataclass
class Batch:
    input_ids: Any
    labels: Any
    attention_mask: Any
    tokens: int  # real (non-pad) tokens, for tokens/s
    target_tokens: int  # tokens that carry loss


@dataclass
class TrainPath:
    """How batches are built and the loss computed on this device: the plain path (plain.py) runs
    everywhere; engine/cuda/path.py supplies the CUDA fast path (packing, fused kernels, profiles)."""

    name: str
    gradient_checkpointing: bool
    collate: Callable[[list, int, Any], Batch]
    loss_sum: Callable[[Any, Batch], Any]
    prepare_base: Callable[[Any], Any] = lambda model: model  # kernel patches, before LoRA
    # A step's micro-batches of sample indices -> the forwards actually run (same samples, same
    # gradient); the CUDA path packs them to what memory allows.
    group: Callable[[list[list[int]], list], list[list[int]]] = lambda step, samples: step
    notes: list[str] = field(default_factory=list)
    # Its first step compiles the decoder layers: a stage of its own, shown as such.
    compiles: bool = False
    # () -> seconds spent compiling so far, and what the compile cache did in words
    compile_report: Callable[[], tuple[float, str]] = lambda: (0.0, "")
