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


# ================================================================= out of memory: which memory


CPU_ALLOCATOR_FAILURE = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
    "you tried to allocate 4294967296 bytes."
)


@pytest.mark.parametrize(
    "exc",
    [RuntimeError(CPU_ALLOCATOR_FAILURE), MemoryError(), OSError(12, "Cannot allocate memory")],
    ids=["cpu-allocator", "memory-error", "enomem"],
)
def test_host_memory_exhausted_reads_as_ram_with_ram_advice(exc, tmp_path):
    """Issue 14: RAM exhausted on a CPU box was shown as "Out of GPU memory ... close other
    programs using the GPU" (or as an internal error, for torch's CPU allocator)."""
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.process.jobs import RunProgress, describe_failure

    cfg = TrainConfig(dataset=["d.jsonl"], per_device_train_batch_size=8)
    run = tmp_path / "run"
    run.mkdir()
    for progress, words in (
        (RunProgress(), "while loading the model"),
        (RunProgress(run_dir=str(run)), "in its first step"),
        (RunProgress(run_dir=str(run), last_step=3), "after step 3"),
    ):
        error, _ = describe_failure(exc, "train", cfg, progress=progress)
        text = f"{error.message} {error.hint}"
        assert error.code == "oom" and "ran out of the machine's RAM" in error.message, text
        assert words in error.message
        assert "GPU" not in text and "QLoRA" not in text and "nvidia-smi" not in text, text
        assert "torch_dtype bfloat16" in error.hint  # float32 on a CPU: twice the RAM
    if isinstance(exc, RuntimeError):
        assert "(it asked for 4.00 GiB more)" in error.message
    first, _ = describe_failure(exc, "train", cfg, progress=RunProgress())
    assert "close other programs using RAM" in first.hint
    for job in ("generate", "export", "load"):
        error, _ = describe_failure(exc, job, cfg)
        assert error.code == "oom" and f"{job} ran out of the machine's RAM" in error.message
        assert "GPU" not in error.hint, error.hint


def test_gpu_memory_exhausted_still_reads_as_gpu():
    import torch
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.process.jobs import RunProgress, describe_failure

    cfg = TrainConfig(dataset=["d.jsonl"])
    for exc in (
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"),
    ):
        error, _ = describe_failure(exc, "train", cfg, progress=RunProgress())
        assert error.code == "oom" and "ran out of GPU memory" in error.message
        assert "nvidia-smi" in error.hint and "RAM" not in error.hint
