"""Time `tunebench demo` end to end: the README's "about a minute and a half" and the 120 s target.

    python bench/bench_demo.py [--repeats N] [--output results.json]

Runs the demo as a user does (a fresh interpreter, model load included), N times, and prints each
run's wall seconds, the model load, the training's own "took" line and whether the adapter learnt
its new identity, with the machine's load average, since a busy 2-core box doubles the time. A
timing lives here and in bench/RESULTS_demo.md, never as a bound in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time


def run_once() -> dict:
    with tempfile.TemporaryDirectory() as out:
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "tunebench.engine.cli.main", "demo", "--output_dir", out],
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"tunebench demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    loaded = re.search(r"demo model loaded in ([\d.]+)s", proc.stdout)
    after = re.search(r"Who are you\?\n\s+before:.*\n\s+after:\s*(.*)", proc.stdout)
    # Which part a slow run spent its time in: the training's steps, or the answers around it.
    steps = re.search(r"to the first step ([\d.]+)s, later steps ([\d.]+)s", proc.stdout)
    speed = re.findall(r"(\d+) tok/s", proc.stdout)
    return {
        "wall_s": round(wall, 1),
        "model_load_s": float(loaded.group(1)) if loaded else None,
        "first_step_s": float(steps.group(1)) if steps else None,
        "later_steps_s": float(steps.group(2)) if steps else None,
        "train_tokens_per_s": int(speed[-1]) if speed else None,
        "learnt_identity": bool(after and "TuneBee" in after.group(1)),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--output", help="write the runs as JSON here too")
    args = parser.parse_args()
    import torch
    import transformers

    runs = []
    for index in range(args.repeats):
        runs.append(run_once())
        print(f"run {index + 1}: {json.dumps(runs[-1])}", flush=True)
    walls = sorted(r["wall_s"] for r in runs)
    summary = {
        "median_wall_s": walls[len(walls) // 2],
        "target_s": 120,
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
