"""Are training runs of the same settings identical on this device, and is a resume exact?

    python bench/check_determinism.py [--steps 40] [--resume-at 10]

Trains the test suite's tiny model (tests/tiny.py) with one seed, data and settings, and compares
each of these loss curves with the first run's, step by step:

- the same settings again, in this process;
- the same settings in a fresh process (with an empty compile cache);
- a resume from the first run's step-N checkpoint, in this process;
- that resume in a fresh process (with an empty compile cache).

Each line says how many steps are bit-identical and the largest relative difference. Where only
the fresh processes differ, what differs is a choice made when the code is compiled (inductor's
on-device benchmarking of kernel configurations), not the resume; TORCHINDUCTOR_DETERMINISTIC=1
(set around this script) turns that benchmarking off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def losses(model_dir: Path, data: Path, out: Path, steps: int, resume: str = "") -> dict[int, float]:
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
        resume_from_checkpoint=resume,
    )
    seen: dict[int, float] = {}
    run_training(cfg, lambda e: e.type == "TrainStep" and seen.update({e.step: e.loss}))
    return seen


def in_fresh_process(args: list[str], cache: Path) -> dict[int, float]:
    """The same function in a new interpreter whose compile caches start empty."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TUNEBENCH_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"the fresh process failed:\n{done.stderr[-4000:]}")
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def resumable_copy(first_out: Path, to: Path, at: int) -> Path:
    """A copy of the first run's folder holding only its step-`at` checkpoint; returns that checkpoint."""
    (run,) = [p for p in first_out.iterdir() if p.is_dir()]
    copy = to / run.name
    shutil.copytree(run, copy)
    for checkpoint in (copy / "checkpoints").iterdir():
        if checkpoint.name != f"step-{at}":
            shutil.rmtree(checkpoint)
    return copy / "checkpoints" / f"step-{at}"


def compare(name: str, got: dict[int, float], want: dict[int, float]) -> None:
    steps = sorted(got)
    if steps != sorted(s for s in want if s >= steps[0]):
        print(f"{name}: steps {steps[0]}..{steps[-1]} do not match the first run's")
        return
    same = sum(got[s] == want[s] for s in steps)
    worst = max(abs(got[s] - want[s]) / max(abs(want[s]), 1e-12) for s in steps)
    first_diff = next((s for s in steps if got[s] != want[s]), None)
    where = f", first at step {first_diff}" if first_diff else ""
    print(
        f"  {name}: {same}/{len(steps)} steps bit-identical, largest relative difference {worst:.3g}{where}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resume-at", type=int, default=10, help="a multiple of save_steps (10)")
    parser.add_argument(
        "--child", nargs=5, metavar=("MODEL", "DATA", "OUT", "STEPS", "RESUME"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        model_dir, data, out, steps, resume = args.child
        got = losses(Path(model_dir), Path(data), Path(out), int(steps), "" if resume == "-" else resume)
        print(json.dumps(got))
        return 0
    import torch
    from tiny import make_tiny_model_dir, write_identity_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_tiny_model_dir(root / "model")
        data = root / "identity.jsonl"
        questions = ["Who are you?", "What is your name?", "Who made you?", "你是谁？"]
        write_identity_dataset(data, 8, questions, "I am {{NAME}}, made by {{AUTHOR}}.")
        steps = str(args.steps)
        first = losses(model_dir, data, root / "a", args.steps)
        where = "cuda " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        flag = os.environ.get("TORCHINDUCTOR_DETERMINISTIC", "0")
        print(f"{where}, torch {torch.__version__}, TORCHINDUCTOR_DETERMINISTIC={flag}, {args.steps} steps:")
        compare("again, this process", losses(model_dir, data, root / "b", args.steps), first)
        fresh = in_fresh_process([str(model_dir), str(data), str(root / "c"), steps, "-"], root / "cache-c")
        compare("again, a fresh process", fresh, first)
        resume = resumable_copy(root / "a", root / "r1", args.resume_at)
        compare(
            f"resumed at {args.resume_at}, this process",
            losses(model_dir, data, root / "r1", args.steps, str(resume)),
            first,
        )
        resume = resumable_copy(root / "a", root / "r2", args.resume_at)
        fresh = in_fresh_process(
            [str(model_dir), str(data), str(root / "r2"), steps, str(resume)], root / "cache-r2"
        )
        compare(f"resumed at {args.resume_at}, a fresh process", fresh, first)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
