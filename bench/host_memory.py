"""Measure the peak RSS growth of one training step on the CPU, the numbers the host memory model
(engine/core/memory_model.py, HOST_*) is fitted to.

    python bench/host_memory.py [--tokens 1024]

For each shape (hidden, intermediate, layers, heads, kv heads, vocab) and setting it builds a
random model in code, runs one step of the real recipe on micro-batches of 8 samples of
`--tokens` tokens, and prints the RSS growth against the model's estimate. Results and the
command live in bench/RESULTS_host_memory.md; tests/test_host_memory.py keeps the measured peaks
and checks the model against them.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# (hidden, intermediate, layers, heads, kv heads, vocab), torch_dtype, gradient_checkpointing, lora_dropout
CASES = [
    ((256, 512, 4, 4, 2, 512), "float32", False, 0.0),
    ((256, 512, 8, 4, 2, 512), "float32", False, 0.0),
    ((256, 1024, 4, 4, 2, 512), "float32", False, 0.0),
    ((512, 512, 4, 8, 4, 512), "float32", False, 0.0),
    ((256, 512, 4, 4, 2, 8192), "float32", False, 0.0),
    ((256, 512, 4, 4, 2, 512), "float32", True, 0.0),
    ((256, 512, 8, 4, 2, 512), "float32", True, 0.0),
    ((256, 512, 4, 4, 2, 512), "bfloat16", False, 0.0),
    ((256, 512, 8, 4, 2, 512), "bfloat16", False, 0.0),
    ((256, 512, 4, 4, 2, 512), "float32", False, 0.05),
]
BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sample (max_length)")
    parser.add_argument("--case", type=int, help="run this case only, in this process")
    parser.add_argument(
        "--demo",
        nargs=2,
        metavar=("BATCH", "DTYPE"),
        help="instead: one step of the demo model on sample_data/self_cognition.jsonl",
    )
    args = parser.parse_args()
    if args.demo:
        demo_step(int(args.demo[0]), args.demo[1])
        return
    if args.case is None:
        # Each case in a fresh interpreter: freed heap an earlier case left mapped would hide growth.
        print(f"micro-batches of {BATCH} x {args.tokens} tokens; MiB of RSS growth at the step's peak")
        for case in range(len(CASES)):
            command = [sys.executable, __file__, "--tokens", str(args.tokens), "--case", str(case)]
            subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
        return

    from tiny import make_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.core.memory_model import HOST_RUNTIME_BYTES, estimate_host_peak_bytes
    from tunebench.engine.train.recipe import run_training

    root = Path(tempfile.mkdtemp(prefix="tunebench-host-memory-"))
    tokenizer = make_tiny_tokenizer()
    words = "the capital of France is Paris and the sea is deep".split()
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {
                    "role": "assistant",
                    "content": " ".join(words[(i + j) % 11] for j in range(args.tokens * 3)),
                },
            ]
        }
        for i in range(4 * BATCH)
    ]
    data = root / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    process = psutil.Process()
    libc = ctypes.CDLL("libc.so.6")
    for (h, i, layers, heads, kv, vocab), dtype, recompute, dropout in CASES[args.case : args.case + 1]:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=h,
            intermediate_size=i,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=max(8192, args.tokens),
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model_dir = root / f"model-{h}-{i}-{layers}-{heads}-{kv}-{vocab}"
        if not model_dir.exists():
            LlamaForCausalLM(config).save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
        gc.collect()
        libc.malloc_trim(0)
        base = process.memory_info().rss
        peak = [base]
        done = threading.Event()

        def sample(peak: list[int] = peak, done: threading.Event = done) -> None:
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        run_training(
            TrainConfig(
                model=str(model_dir),
                dataset=[str(data)],
                max_steps=1,
                save_steps=1000,
                output_dir=str(root / "runs"),
                per_device_train_batch_size=BATCH,
                max_length=args.tokens,
                torch_dtype=dtype,
                gradient_checkpointing=recompute,
                lora_dropout=dropout,
            ),
            lambda event: None,
        )
        done.set()
        sampler.join()
        measured = (peak[0] - base) / 2**20
        modelled = estimate_host_peak_bytes(
            config.to_dict(),
            tokens=BATCH * args.tokens,
            dtype_bytes=4 if dtype == "float32" else 2,
            recompute=recompute,
            lora_dropout=dropout,
        )
        model_mib = (modelled["total"] - HOST_RUNTIME_BYTES) / 2**20
        print(
            f"{(h, i, layers, heads, kv, vocab)} {dtype:8} recompute={recompute!s:5} dropout={dropout}: "
            f"measured {measured:6.0f}  model {model_mib:6.0f}  ({(model_mib / measured - 1) * 100:+.0f}%)",
            flush=True,
        )


def demo_step(batch: int, dtype: str) -> None:
    """A real model's shape: one step of the demo's identity fine-tune, against the estimate for
    the data's longest sample (the first step's micro-batch may be shorter)."""
    import torch  # noqa: F401 - resident before the baseline, as in the engine
    from tunebench.engine.core.demo_config import demo_config
    from tunebench.engine.core.estimate import estimate_training_memory
    from tunebench.engine.train.preflight import longest_sample_tokens
    from tunebench.engine.train.recipe import run_training

    output = tempfile.mkdtemp(prefix="tunebench-host-memory-")
    cfg = demo_config(
        output, max_steps=1, per_device_train_batch_size=batch, val_ratio=0.0, torch_dtype=dtype
    )
    longest = longest_sample_tokens(cfg)
    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    run_training(cfg, lambda event: None)
    done.set()
    sampler.join()
    estimate = estimate_training_memory(cfg, None, None, longest=longest)
    modelled = estimate.total_gib - estimate.parts["runtime"]
    print(
        f"demo, micro-batch {batch} (longest sample {longest} tokens), {dtype}: "
        f"measured {(peak[0] - base) / 2**30:.2f} GiB, model {modelled:.2f} GiB"
    )


if __name__ == "__main__":
    main()
