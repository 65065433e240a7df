"""Data-parallel scaling: `tunebench train` on 1, 2, 4 ... GPUs with torchrun, as a person runs it.

The same randomly initialised Qwen2.5 architecture as bench_train.py (its weights written once to
a local folder), the same fixed-length synthetic samples, LoRA r8 on the seven projections. Each
count of GPUs is its own `NPROC_PER_NODE=N CUDA_VISIBLE_DEVICES=0..N-1 tunebench train` (ms-swift's
variables), with the per-device batch and accumulation fixed, so the global batch grows with N as
in ms-swift (weak scaling): the speed-up is tokens/s over all ranks against one GPU's. tokens/s is
the recipe's own (real tokens of the last steps, all ranks summed). Run from the repository root:

    # one H200: the world of one, in-process and under torchrun (the same code path as N ranks)
    python bench/bench_multi_gpu.py --size 7b --gpus 1 --out bench/results/
    # one GPU, two ranks sharing it through gloo (TUNEBENCH_RANKS_ON_ONE_GPU=1): DDP and the CUDA
    # fast path together; the 2-rank loss curve against one process with the same global batch
    python bench/bench_multi_gpu.py --size 0.5b --ranks-on-one-gpu 2 --out bench/results/
    # a box of 4 GPUs: the scaling rows (targets: >= 1.9x on 2, >= 3.6x on 4)
    python bench/bench_multi_gpu.py --size 7b --gpus 1,2,4 --out bench/results/

The all-reduce overlapped with backward (DDP, issue 18), against the one flat all-reduce after
backward it replaced: accumulation 1, so every backward communicates, at the commit before DDP
(018463b) and at DDP's (3e18574), on the same box:

    git checkout 018463b
    python bench/bench_multi_gpu.py --size 7b --gpus 1,2,4 --accumulation 1 --out bench/results/flat/
    git checkout 3e18574
    python bench/bench_multi_gpu.py --size 7b --gpus 1,2,4 --accumulation 1 --out bench/results/ddp/

`--size tiny` checks the bench's plumbing on a CPU (gloo ranks). Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import make_model  # noqa: E402  (bench/ is not a package)

WORDS = ("a", "b", "c")


def make_data(path: Path, samples: int, tokens: int) -> None:
    """Samples of about `tokens` words each: the bench tokenizer maps each word to one token."""
    rows = []
    for i in range(samples):
        answer = " ".join(WORDS[(i + j) % 3] for j in range(tokens - 16))
        rows.append(
            {"messages": [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": answer}]}
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def run_one(
    args, gpus: int, model: Path, data: Path, out: Path, torchrun: bool, one_gpu: bool = False
) -> dict:
    env = dict(os.environ)
    if torchrun:
        env["NPROC_PER_NODE"] = str(gpus)
        if one_gpu:
            env["TUNEBENCH_RANKS_ON_ONE_GPU"] = "1"
        elif args.size != "tiny":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    label = (f"{gpus} ranks on one GPU" if one_gpu else f"{gpus} GPU(s)") + (
        " torchrun" if torchrun else " in-process"
    )
    command = [
        sys.executable, "-m", "tunebench.engine.cli.main", "train",
        "--model", str(model), "--dataset", str(data), "--template", "chatml",
        "--max_length", str(args.tokens), "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch),
        "--gradient_accumulation_steps", str(args.accumulation),
        "--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0",
        "--learning_rate", "1e-4", "--lr_scheduler_type", "constant",
        "--logging_steps", "1", "--save_steps", "100000", "--output_dir", str(out / "runs"),
        "--run_name", f"n{gpus}-{'torchrun' if torchrun else 'plain'}-{int(time.time())}",
        "--probe_after", "false", "--json",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stderr[-4000:]}")
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    steps = [e for e in events if e.get("type") == "TrainStep"]
    # each row as it ends, so a call cut off by its time limit keeps the rows it finished
    print(f"--> {label}: {steps[-1]['tokens_per_s']:,.0f} tokens/s, final loss {steps[-1]['loss']:.4f}, "
          f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    return {
        "label": label,
        "gpus": gpus,
        "tokens_per_s": steps[-1]["tokens_per_s"],
        "global_batch": args.batch * args.accumulation * (gpus if torchrun else 1),
        "final_loss": steps[-1]["loss"],
        "losses": [step["loss"] for step in steps],
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="7b", choices=("tiny", "0.5b", "7b"))
    parser.add_argument("--gpus", default="1", help="comma-separated counts of GPUs, e.g. 1,2,4")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per sample")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps (tokens/s over the last ones)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--ranks-on-one-gpu", type=int, default=0, help="N ranks sharing GPU 0 against one process"
    )
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = out / f"qwen25-{args.size}-random"
    make_model(args.size, model)
    data = out / f"multi-gpu-{args.tokens}.jsonl"
    make_data(data, args.samples, args.tokens)

    if args.ranks_on_one_gpu:
        check_ranks_on_one_gpu(args, model, data, out)
        return
    counts = [int(n) for n in args.gpus.split(",")]
    results = []
    if 1 in counts:  # the one-GPU baseline in-process, and the same world of one under torchrun
        results.append(run_one(args, 1, model, data, out, torchrun=False))
    results += [run_one(args, n, model, data, out, torchrun=True) for n in counts]
    base = results[0]["tokens_per_s"]
    print(f"\n{args.size}, {args.tokens}-token samples, per-device batch {args.batch} x accumulation "
          f"{args.accumulation}, {args.steps} steps\n")  # fmt: skip
    print("| run | global batch | tokens/s | speed-up | final loss | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['label']} | {r['global_batch']} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / base:.2f}x | {r['final_loss']:.4f} | {r['wall_s']} |"
        )
    (out / f"multi_gpu_{args.size}.json").write_text(json.dumps(results, indent=2))


def check_ranks_on_one_gpu(args, model: Path, data: Path, out: Path) -> None:
    """N ranks sharing one GPU, each with 1/N of the accumulation, against one process: the same
    global batch, so the same loss curve up to the order of the sums."""
    n = args.ranks_on_one_gpu
    one = run_one(args, 1, model, data, out, torchrun=False)
    per_rank = argparse.Namespace(**{**vars(args), "accumulation": args.accumulation // n})
    ranks = run_one(per_rank, n, model, data, out, torchrun=True, one_gpu=True)
    worst = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], ranks["losses"], strict=True))
    print(
        f"\n{args.size}: 1 process, accumulation {args.accumulation}, against {n} ranks on one GPU, "
        f"accumulation {args.accumulation // n} each (global batch {args.batch * args.accumulation})"
    )
    print("| step | 1 process | " + f"{n} ranks | relative difference |\n|---:|---:|---:|---:|")
    for step, (a, b) in enumerate(zip(one["losses"], ranks["losses"], strict=True), 1):
        print(f"| {step} | {a:.6f} | {b:.6f} | {abs(a - b) / abs(a):.2e} |")
    print(f"largest relative difference: {worst:.2e}")
    (out / f"ranks_on_one_gpu_{args.size}.json").write_text(json.dumps([one, ranks], indent=2))


if __name__ == "__main__":
    main()
