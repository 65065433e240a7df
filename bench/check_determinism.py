"""Are two uninterrupted training runs of the same settings identical on this device?

    python bench/check_determinism.py [--steps 40]

Trains the test suite's tiny model (tests/tiny.py) twice with the same seed, data and settings
and prints the largest relative difference between the two loss curves. 0 on the CPU, and 0 on
an H200 too (torch 2.11): so where a resumed run's losses differ from an uninterrupted one's, the
resume is what differs, not the kernels (tests/test_server.py states the tolerance that holds).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def losses(model_dir: Path, data: Path, out: Path, steps: int) -> dict[int, float]:
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.train.recipe import run_training

    cfg = TrainConfig(
        model=str(model_dir),
        dataset=[str(data)],
        model_name=["robot"],
        model_author=["us"],
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        max_length=64,
        logging_steps=1,
        save_steps=10,
        gradient_checkpointing=False,
        max_steps=steps,
        output_dir=str(out),
    )
    seen: dict[int, float] = {}
    run_training(cfg, lambda e: e.type == "TrainStep" and seen.update({e.step: e.loss}))
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    import torch
    from tiny import make_tiny_model_dir, write_identity_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_tiny_model_dir(root / "model")
        data = root / "identity.jsonl"
        questions = ["Who are you?", "What is your name?", "Who made you?", "你是谁？"]
        write_identity_dataset(data, 8, questions, "I am {{NAME}}, made by {{AUTHOR}}.")
        first = losses(model_dir, data, root / "a", args.steps)
        second = losses(model_dir, data, root / "b", args.steps)
    worst = max(abs(first[s] - second[s]) / max(abs(first[s]), 1e-12) for s in first)
    where = "cuda " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    same = sum(first[s] == second[s] for s in first)
    print(f"{where}: {same}/{len(first)} steps bit-identical, largest relative difference {worst:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
