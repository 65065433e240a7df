"""Host memory (RAM) on a machine without a GPU: what the estimate says, the plan a preflight
refuses, how an out-of-memory reads, and the memory a finished job gives back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest
from tunebench.engine.core import protocol as P
from tunebench.engine.process.client import EngineConnection, ensure_engine, start_engine

MIB = 2**20


def cpu_only() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU box training activations live on the GPU, not in the engine's RSS")


def write_long_dataset(path: Path, count: int, words: int) -> None:
    """Samples whose answers are `words` words long (about 1.3 tokens a word for the tiny tokenizer)."""
    vocabulary = "the capital of France is Paris and the sea is deep".split()
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Tell me something ({i})"},
                {"role": "assistant", "content": " ".join(vocabulary[(i + j) % 11] for j in range(words))},
            ]
        }
        for i in range(count)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_job(conn: EngineConnection, config: dict, abort_after_step: bool = False) -> tuple[str, int]:
    """Start a training job and wait for its end; the job's end state and the engine's largest
    RSS seen in the memory samples meanwhile."""
    conn.send(P.StartTraining(config=config))
    peak = 0
    deadline = time.monotonic() + 600  # a hang guard for a busy box, not a timing target
    while True:
        event = conn.recv(max(deadline - time.monotonic(), 0.01))
        assert event.type != "EngineError", event
        if event.type == "MemorySample":
            peak = max(peak, event.rss)
        elif event.type == "TrainStep" and abort_after_step:
            conn.send(P.StopTraining(mode="abort"))
            abort_after_step = False
        elif event.type == "JobStatus" and event.state != "started":
            return event.state, peak


def test_an_aborted_run_gives_its_memory_back(tmp_path):
    """The engine's RSS after an aborted CPU run returns near where it was before the run: freed
    activations must not stay in the C heap (issue 14: 13.3 GiB held after an abort)."""
    cpu_only()
    from tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model_dir = tmp_path / "model"
    # Wide enough that one step's activations are hundreds of MiB (8 x 512 tokens, 4 layers).
    make_tiny_model(tokenizer, hidden=256, layers=4).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    workspace = tmp_path / "ws"
    write_long_dataset(workspace / "datasets" / "long.jsonl", 16, 600)
    settings = {
        "model": str(model_dir),
        "dataset": ["datasets/long.jsonl"],
        "per_device_train_batch_size": 8,
        "max_length": 512,
        "gradient_checkpointing": False,
        "torch_dtype": "float32",
        "logging_steps": 1,
        "save_steps": 1000,
    }
    pid = start_engine(workspace, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ensure_engine(workspace, timeout=30)
    engine = psutil.Process(pid)
    with EngineConnection.open(workspace) as conn:
        conn.hello("test")
        # A short run first, so the baseline has torch, the model code and the tokenizer loaded.
        state, _ = run_job(
            conn, {**settings, "per_device_train_batch_size": 1, "max_length": 64, "max_steps": 1}
        )
        assert state == "done"
        before = engine.memory_info().rss
        state, peak = run_job(conn, {**settings, "max_steps": 1000}, abort_after_step=True)
        assert state == "done"
        after = engine.memory_info().rss
        conn.send(P.Shutdown())
    grown = peak - before
    assert grown > 200 * MIB, f"the run grew the engine by only {grown / MIB:.0f} MiB: nothing to give back"
    # Generous: a quarter of the growth may stay (allocator caches, a busy machine's sampling).
    kept = after - before
    assert kept < grown / 4, f"kept {kept / MIB:.0f} MiB of the {grown / MIB:.0f} MiB the run took"
