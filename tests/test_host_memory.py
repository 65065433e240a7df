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
    try:
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
    finally:
        engine.kill()  # the engine this test started, whatever happened
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


# ================================================================= the estimate and the refusal

GIB = 2**30


def host_estimate(available: float = 64, longest: int | None = None, **settings):
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.core.estimate import DEMO_MODEL_INFO, estimate_host_memory

    return estimate_host_memory(
        TrainConfig(**settings), DEMO_MODEL_INFO, longest=longest, available=int(available * GIB)
    )


# Peak RSS growth of one plain-path step on the CPU (bench/host_memory.py, bench/RESULTS_host_memory.md):
# (hidden, intermediate, layers, heads, kv heads, vocab), dtype, gradient_checkpointing,
# lora_dropout -> MiB, for micro-batches of 8 x 1024 tokens.
MEASURED_HOST_PEAKS = {
    ((256, 512, 4, 4, 2, 512), "float32", False, 0.0): 1165,
    ((256, 512, 8, 4, 2, 512), "float32", False, 0.0): 2240,
    ((256, 1024, 4, 4, 2, 512), "float32", False, 0.0): 1356,
    ((512, 512, 4, 8, 4, 512), "float32", False, 0.0): 1889,
    ((256, 512, 4, 4, 2, 8192), "float32", False, 0.0): 1819,
    ((256, 512, 4, 4, 2, 512), "float32", True, 0.0): 796,
    ((256, 512, 8, 4, 2, 512), "float32", True, 0.0): 1144,
    ((256, 512, 4, 4, 2, 512), "bfloat16", False, 0.0): 935,
    ((256, 512, 8, 4, 2, 512), "bfloat16", False, 0.0): 1619,
    ((256, 512, 4, 4, 2, 512), "float32", False, 0.05): 1617,
}


@pytest.mark.parametrize("case", list(MEASURED_HOST_PEAKS), ids=str)
def test_the_host_memory_model_matches_the_measured_peaks(case):
    from tunebench.engine.core.memory_model import HOST_RUNTIME_BYTES, estimate_host_peak_bytes

    (h, i, layers, heads, kv, vocab), dtype, recompute, dropout = case
    model = {
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
    }
    parts = estimate_host_peak_bytes(
        model,
        tokens=8 * 1024,
        dtype_bytes=4 if dtype == "float32" else 2,
        recompute=recompute,
        lora_dropout=dropout,
    )
    modelled = (parts["total"] - HOST_RUNTIME_BYTES) / MIB  # the runtime was resident before the step
    assert abs(modelled - MEASURED_HOST_PEAKS[case]) / MEASURED_HOST_PEAKS[case] < 0.2, modelled


def test_the_host_estimate_follows_the_settings():
    plan = dict(per_device_train_batch_size=8, max_length=2048, gradient_checkpointing=False)
    base = host_estimate(**plan)
    assert base.memory == "host" and base.available_gib == 64
    assert set(base.parts) == {"weights", "lora_and_optimizer", "activations", "loss", "runtime"}
    assert abs(sum(base.parts.values()) - base.total_gib) < 0.01
    smaller = (
        dict(per_device_train_batch_size=4),
        dict(max_length=1024),
        dict(gradient_checkpointing=True),
        dict(torch_dtype="bfloat16"),
        dict(lora_dropout=0.0),
    )
    for change in smaller:
        assert host_estimate(**{**plan, **change}).total_gib < base.total_gib, change
    # micro-batches are padded to their longest sample: short data needs less than max_length says
    short = host_estimate(longest=100, **plan)
    assert short.total_gib < base.total_gib / 5
    assert any("8 samples x 100 tokens (the data's longest sample)" in n for n in short.notes)


def test_a_plan_that_does_not_fit_names_settings_that_do():
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.core.errors import UserError
    from tunebench.engine.core.estimate import DEMO_MODEL_INFO, check_host_memory

    settings = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_length=2048)
    need = host_estimate(**settings).total_gib
    roomy = host_estimate(available=need + 0.1, **settings)
    assert roomy.advice == []
    tight = need / 3
    estimate = host_estimate(available=tight, **settings)
    assert estimate.advice, estimate
    batch, length = estimate.advice[0], estimate.advice[1]
    assert batch.startswith("per_device_train_batch_size ") and "gradient_accumulation_steps" in batch
    assert length.startswith("max_length ")
    # every suggestion fits, and is the most that fits
    new_batch = int(batch.split()[1])
    new_accumulation = int(batch.split("gradient_accumulation_steps ")[1].split()[0])
    assert new_batch * new_accumulation >= 16  # the same samples per step
    assert host_estimate(**{**settings, "per_device_train_batch_size": new_batch}).total_gib <= tight
    assert host_estimate(**{**settings, "per_device_train_batch_size": new_batch + 1}).total_gib > tight
    new_length = int(length.split()[1])
    assert host_estimate(**{**settings, "max_length": new_length}).total_gib <= tight
    assert host_estimate(**{**settings, "max_length": new_length + 1}).total_gib > tight
    with pytest.raises(UserError) as refused:
        check_host_memory(TrainConfig(**settings), DEMO_MODEL_INFO, available=int(tight * GIB))
    text = str(refused.value)
    assert f"training needs about {need:.1f} GiB of RAM at its peak" in text
    assert f"{tight:.1f} GiB is free" in text and batch in text and length in text
    check_host_memory(TrainConfig(**settings), DEMO_MODEL_INFO, available=int((need + 0.1) * GIB))


def test_without_a_gpu_the_estimate_is_in_ram():
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.core.estimate import DEMO_MODEL_INFO, estimate_training_memory

    estimate = estimate_training_memory(TrainConfig(), DEMO_MODEL_INFO, card_bytes=None)
    assert estimate.memory == "host" and estimate.available_gib > 0
    assert estimate_training_memory(TrainConfig(), DEMO_MODEL_INFO, card_bytes=80 * GIB).memory == "gpu"


def test_the_engine_estimates_ram_for_the_data_it_will_train_on(tmp_path, tiny_model_dir):
    """What the GPU pane shows on a CPU box: RAM for micro-batches padded to the data's longest
    sample (not max_length), next to the RAM free."""
    cpu_only()
    from threaded_engine import ThreadedEngine
    from tiny import write_identity_dataset

    workspace = tmp_path / "ws"
    write_identity_dataset(workspace / "datasets" / "identity.jsonl", 8, ["Who are you?"], "I am {{NAME}}.")
    config = {
        "model": str(tiny_model_dir),
        "dataset": ["datasets/identity.jsonl"],
        "model_name": ["robot"],
        "model_author": ["us"],
        "per_device_train_batch_size": 4,
        "max_length": 2048,
    }
    running = ThreadedEngine(workspace)
    try:
        with EngineConnection.open(workspace) as conn:
            conn.hello("test")
            answer = conn.request(P.EstimateMemory(config=config), "MemoryEstimate")
            worst = conn.request(
                P.EstimateMemory(config={**config, "dataset": ["none.jsonl"]}), "MemoryEstimate"
            )
            # the data is read again once its file changes (the estimate follows every form change)
            write_long_dataset(workspace / "datasets" / "identity.jsonl", 2, 300)
            longer = conn.request(P.EstimateMemory(config=config), "MemoryEstimate")
    finally:
        running.stop()
    assert longer.total_gib > answer.total_gib
    assert answer.memory == "host" and 0 < answer.available_gib and answer.total_gib > 0
    (micro_batch,) = [n for n in answer.notes if n.startswith("largest micro-batch")]
    assert "4 samples x" in micro_batch and "(the data's longest sample)" in micro_batch, micro_batch
    # data it cannot read yet: samples of max_length are assumed, which needs more
    assert any("4 samples x 2048 tokens (max_length)" in n for n in worst.notes), worst.notes
    assert worst.total_gib > answer.total_gib


def test_the_cli_says_which_memory_ran_out(tmp_path, monkeypatch, capfd, tiny_model_dir):
    """`tunebench train` out of RAM: the engine's diagnosis, not a traceback."""
    import tunebench.engine.train.recipe as recipe
    from tunebench.engine.cli.main import main

    def runs_out_of_ram(cfg, emit, stop):
        emit(P.TrainStarted(run_id="r", run_dir=str(tmp_path / "runs" / "r"), total_steps=10))
        emit(P.TrainStep(step=2, total_steps=10, loss=2.0))
        raise RuntimeError(CPU_ALLOCATOR_FAILURE)

    monkeypatch.setattr(recipe, "run_training", runs_out_of_ram)
    write_long_dataset(tmp_path / "data.jsonl", 4, 5)
    argv = ["train", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "data.jsonl")]
    code = main([*argv, "--output_dir", str(tmp_path / "runs"), "--per_device_train_batch_size", "4"])
    _out, err = capfd.readouterr()
    assert code == 2 and "Traceback" not in err, err
    assert "error: training ran out of the machine's RAM (it asked for 4.00 GiB more) after step 2" in err
    assert "per_device_train_batch_size (now 4) to 2" in err and "GPU" not in err


def test_past_the_tokenize_limit_the_longest_sample_is_still_found(tiny_model_dir):
    """A large dataset is not tokenised whole before training; its longest samples by characters are."""
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.core.data import Sample
    from tunebench.engine.models.loading import resolve_model
    from tunebench.engine.train import preflight

    def sample(words: int) -> Sample:
        turns = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "sea " * words}]
        return Sample(turns, "data.jsonl")

    samples = [sample(3) for _ in range(preflight.TOKENIZE_LIMIT)] + [sample(150)]
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=["data.jsonl"], max_length=2048)
    resolved = resolve_model(str(tiny_model_dir))
    longest = preflight._longest_sample(cfg, resolved, samples)
    assert longest == preflight._longest_sample(cfg, resolved, samples[-1:])  # the long one, alone
    assert longest > preflight._longest_sample(cfg, resolved, samples[:1]) + 100
