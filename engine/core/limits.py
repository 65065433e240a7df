"""How large a training plan may grow: each limit past which a dataset or a setting is refused
before anything is read into memory, defined here once and named in the refusal.

Each holds any real fine-tune with room to spare. Past them the engine's memory would grow for
minutes until the machine killed it (`--max_steps 10000000000`, `file.jsonl#100000000`, a dataset
that is a symlink to /dev/zero). Standard library only: the TUI reads these too.
"""

from __future__ import annotations

# One dataset file, read whole into memory to parse it; the largest public SFT sets are a few GiB.
MAX_DATASET_BYTES = 4 * 2**30
# Samples in --dataset (or --val_dataset), path#N repeats counted: the sample list and its tokens.
MAX_SAMPLES = 1_000_000
# Optimizer steps in one run: the step plan holds each step's micro-batches (~150 bytes a step).
MAX_STEPS = 1_000_000
# Samples fed over the whole run (steps x samples per step): the plan holds one index for each.
MAX_SAMPLE_PASSES = 10_000_000


def gib(size: int) -> str:
    """A byte count in GiB, as the refusals write it."""
    return f"{size / 2**30:.1f} GiB"
