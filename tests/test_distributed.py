"""Training on several processes: torchrun ranks joined by gloo on the CPU, a tiny model.

Two ranks give the loss curve of one with the same global batch; a checkpoint of either resumes
on the other; a killed rank ends the run with a message naming it; and the launch settings are
read as ms-swift reads them (NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import orjson
import psutil
import pytest
from tiny import QWEN25_7B
from tunebench.engine.cli.main import main
from tunebench.engine.core.config import ConfigError, TrainConfig
from tunebench.engine.core.errors import UserError
from tunebench.engine.core.launch import Launch, launch_from
from tunebench.engine.core.metrics_log import truncate_metrics
from tunebench.engine.core.workspace import list_checkpoints
from tunebench.engine.train.recipe import run_training

# The same global batch of 4 samples a step: one process accumulating 2 micro-batches of 2, or
# two processes with one each.
SETTINGS = dict(
    per_device_train_batch_size=2,
    lora_dropout=0.0,  # dropout draws differ per rank; without it the curves must agree
    learning_rate=5e-3,
    max_steps=4,
    logging_steps=1,
    save_steps=2,
    save_total_limit=0,
    gradient_checkpointing=False,
)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "identity.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Who are you? ({i})"},
                {"role": "assistant", "content": "I am robot, made by us." * (1 + i % 3)},
            ]
        }
        for i in range(12)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def flags(settings: dict) -> list[str]:
    out = []
    for name, value in settings.items():
        out += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def launch(args: list[str], nproc: int = 2, **popen) -> subprocess.Popen:
    """`tunebench train` in its own process, as a person starts it, with ms-swift's NPROC_PER_NODE."""
    env = {**os.environ, "NPROC_PER_NODE": str(nproc), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tunebench.engine.cli.main", "train", "--probe_after", "false", *args]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    _out, err = process.communicate(timeout=timeout)
    return process.returncode, err


def curve(run_dir) -> list[tuple[int, float, float]]:
    records = [orjson.loads(line) for line in (run_dir / "metrics.jsonl").read_bytes().splitlines() if line]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if r.get("type") == "TrainStep"]


def as_if_stopped(run_dir, step: int) -> None:
    """The run's record cut back as if it had stopped at `step`: a complete run is not resumed
    (it would train its last steps again), and these tests replay its last steps on purpose."""
    truncate_metrics(run_dir, step)


def assert_same_curve(a, b) -> None:
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(a, b, strict=True):
        assert loss_a == pytest.approx(loss_b, rel=1e-4)
        assert norm_a == pytest.approx(norm_b, rel=1e-3)


@pytest.fixture(scope="module")
def one_rank_run(tiny_model_dir, data_file, tmp_path_factory):
    """A run in this process: accumulation 2, the global batch the two-rank runs get from 2 ranks."""
    out = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        dataset=[str(data_file)],
        output_dir=str(out),
        run_name="one",
        gradient_accumulation_steps=2,
        **SETTINGS,
    )
    result = run_training(cfg, lambda _e: None)
    assert result.status == "completed"
    return out / "one"


def test_two_ranks_train_as_one_and_resume_on_one(tiny_model_dir, data_file, one_rank_run, tmp_path):
    args = ["--model", str(tiny_model_dir), "--dataset", str(data_file), "--output_dir", str(tmp_path)]
    process = launch([*args, "--run_name", "two", *flags(SETTINGS)])
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err
    assert "PyTorch DDP all-reduces only the adapter's gradients, overlapped with each step's last" in out
    two = tmp_path / "two"
    # rank 0 alone wrote: each step once, the adapter and the checkpoints
    assert_same_curve(curve(two), curve(one_rank_run))
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    assert [c.name for c in list_checkpoints(two)] == ["step-2", "step-4"]  # every 2 steps and the last
    recorded = orjson.loads((two / "config.json").read_bytes())
    assert recorded["processes"] == 2 and recorded["micro_batches_per_step"] == 2
    assert recorded["config"]["nproc_per_node"] == 2

    # the two-rank checkpoint, resumed in one process: the same steps 3 and 4
    as_if_stopped(two, 2)
    events = []
    cfg = TrainConfig(**{**recorded["config"], "resume_from_checkpoint": str(two / "checkpoints" / "step-2")})
    cfg.nproc_per_node = 1
    result = run_training(cfg, events.append)
    assert result.status == "completed"
    notes = [e.message for e in events if e.type == "Log"]
    assert any("resumed on 1 process(es); the run trained on 2" in n and "global batch 4" in n for n in notes)
    assert_same_curve(curve(two), curve(one_rank_run))


def test_one_rank_checkpoint_resumes_on_two(one_rank_run, tmp_path):
    import shutil

    run = tmp_path / "one"
    shutil.copytree(one_rank_run, run)
    shutil.rmtree(run / "adapter")
    as_if_stopped(run, 2)
    code, err = finish(launch(["--resume_from_checkpoint", str(run / "checkpoints" / "step-2")], nproc=2))
    assert code == 0, err
    assert_same_curve(curve(run), curve(one_rank_run))
    assert orjson.loads((run / "config.json").read_bytes())["processes"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_killed_rank_ends_the_run_with_its_rank_and_the_last_checkpoint(
    tiny_model_dir, data_file, tmp_path
):
    settings = {**SETTINGS, "max_steps": 2000, "save_steps": 1, "save_total_limit": 2, "logging_steps": 100}
    args = ["--model", str(tiny_model_dir), "--dataset", str(data_file), "--output_dir", str(tmp_path)]
    process = launch([*args, "--run_name", "k", *flags(settings)])
    deadline = time.monotonic() + 180
    while not list_checkpoints(tmp_path / "k"):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    ranks = [
        p
        for p in psutil.Process(process.pid).children(recursive=True)
        if "tunebench.engine.cli.main" in " ".join(p.cmdline()) and "RANK" in p.environ()
    ]
    rank1 = [p for p in ranks if p.environ()["RANK"] == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGKILL)
    code, err = finish(process, timeout=120)
    assert code == 2
    assert "error: rank 1 of 2 was killed by SIGKILL; the other 1 rank(s) were ended" in err
    kept = list_checkpoints(tmp_path / "k")
    assert kept and f"the last checkpoint is kept: {kept[-1]}" in err
    assert "--resume_from_checkpoint" in err
    assert "Traceback" not in err
    gone, alive = psutil.wait_procs(ranks, timeout=5)
    assert len(gone) == 2 and not alive  # no rank is left running


# ------------------------------------------------------------ launch settings


def test_launch_settings_read_as_ms_swift_reads_them():
    assert launch_from(None, {}) is None  # nothing asked: train in this process
    assert launch_from(None, {"NPROC_PER_NODE": "4"}) == Launch(4)
    assert launch_from(3, {"NPROC_PER_NODE": "4"}) == Launch(3)  # the flag wins
    assert launch_from(1, {}) == Launch(1)  # torchrun with one rank: the same path as N
    env = {
        "NPROC_PER_NODE": "8",
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    found = launch_from(None, env)
    assert found == Launch(8, 2, 1, "10.0.0.1", 29500)
    assert found.world_size == 16
    # ms-swift's torchrun flags, in its order
    assert found.torchrun_args() == [
        "--nproc_per_node", "8", "--master_port", "29500", "--nnodes", "2", "--node_rank", "1",
        "--master_addr", "10.0.0.1",
    ]  # fmt: skip
    assert launch_from(None, {"NNODES": "1"}) == Launch(1)  # NNODES alone starts torchrun too
    # a torchrun rank trains; it does not launch again
    assert launch_from(2, {"NPROC_PER_NODE": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}) is None


def test_torchrun_takes_the_launch_flags():
    from torch.distributed.run import config_from_args, get_args_parser

    launch = Launch(2, 2, 1, "10.0.0.1", 29501)
    args = get_args_parser().parse_args([*launch.torchrun_args(), "--module", "tunebench.engine.cli.main"])
    config, _cmd, _args = config_from_args(args)
    assert (config.nproc_per_node, config.min_nodes, config.max_nodes) == (2, 2, 2)
    assert config.rdzv_endpoint == "10.0.0.1:29501"
    assert config.rdzv_configs["rank"] == 1


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"NPROC_PER_NODE": "two"}, "--nproc_per_node: NPROC_PER_NODE: 'two' is not a whole number"),
        ({"NPROC_PER_NODE": "0"}, "--nproc_per_node: NPROC_PER_NODE: must be at least 1 (got 0)"),
        ({"NPROC_PER_NODE": "1.5"}, "'1.5' is not a whole number"),
        ({"NNODES": "2", "NPROC_PER_NODE": "2"}, "NNODES=2 needs MASTER_ADDR"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 with NNODES=2"),
        ({"NPROC_PER_NODE": "2", "MASTER_PORT": "99999"}, "MASTER_PORT='99999': must be a whole number"),
    ],
)
def test_bad_launch_settings_say_what_to_change(env, said):
    with pytest.raises((ConfigError, UserError)) as caught:
        launch_from(None, env)
    assert said in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--nproc_per_node", "0"], "--nproc_per_node: must be at least 1 (got 0)"),
        (["--nproc_per_node", "x"], "--nproc_per_node: 'x' is not a whole number"),
    ],
)
def test_bad_nproc_flag_is_a_message(argv, said, capsys):
    assert main(["train", "--dataset", "d.jsonl", *argv]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    import torch
    from tunebench.engine.train.distributed import check_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError) as caught:
        check_devices(Launch(4))
    assert "4 processes, one per GPU, but this machine shows 2 GPU(s) (CUDA_VISIBLE_DEVICES=0,1)" in str(
        caught.value
    )
    assert "on 2 of 2 GPU(s)" in check_devices(Launch(2))
    # the one-GPU check of the data-parallel CUDA code (bench_multi_gpu.py --ranks-on-one-gpu)
    monkeypatch.setenv("TUNEBENCH_RANKS_ON_ONE_GPU", "1")
    assert "on one GPU shared by 4 processes (gloo" in check_devices(Launch(4))


def test_zero3_shards_with_fsdp2_trains_as_one_and_resumes_on_one(tiny_model_dir, data_file, tmp_path):
    """--deepspeed zero3 as FSDP2 over 2 ranks: the curve of one process, with a step whose single
    micro-batch leaves one rank idle (10 samples in micro-batches of 2: steps of 2, 2, 1), and a
    checkpoint whose gathered adapter and optimizer resume unsharded."""
    data = f"{data_file}#10"
    reference = TrainConfig(
        model=str(tiny_model_dir),
        dataset=[data],
        output_dir=str(tmp_path),
        run_name="one",
        gradient_accumulation_steps=2,
        **SETTINGS,
    )
    assert run_training(reference, lambda _e: None).status == "completed"
    args = ["--model", str(tiny_model_dir), "--dataset", data, "--output_dir", str(tmp_path)]
    code, err = finish(launch([*args, "--run_name", "z3", "--deepspeed", "zero3", *flags(SETTINGS)]))
    assert code == 0, err
    z3 = tmp_path / "z3"
    assert_same_curve(curve(z3), curve(tmp_path / "one"))
    recorded = orjson.loads((z3 / "config.json").read_bytes())
    cfg = TrainConfig(**{**recorded["config"], "resume_from_checkpoint": str(z3 / "checkpoints" / "step-2")})
    as_if_stopped(z3, 2)
    events = []
    assert run_training(cfg, events.append).status == "completed"
    assert any("nothing is sharded" in e.message for e in events if e.type == "Log")
    assert_same_curve(curve(z3), curve(tmp_path / "one"))


def test_the_failure_named_is_the_rank_that_failed_first_not_its_echo(tmp_path):
    from types import SimpleNamespace

    from tunebench.engine.train.distributed import failure_error

    def failure(exitcode, timestamp, message="", **extra):
        data = {"message": {"message": message, "extraInfo": extra}} if message else {}
        return SimpleNamespace(
            exitcode=exitcode, timestamp=timestamp, message=data.get("message", ""), error_file_data=data
        )

    echo = failure(1, 100, "DistBackendError: Connection closed by peer", peer=True)
    oom = failure(2, 101, "the GPU ran out of memory", code="oom", hint="lower --max_length")
    error = failure_error({0: echo, 1: oom}, 2, "")
    assert error.message.startswith(
        "rank 1 of 2 failed: the GPU ran out of memory; the other 1 rank(s) were ended"
    )
    assert error.code == "oom" and error.hint.startswith("lower --max_length; then fix what")
    killed = failure_error({0: echo, 3: failure(-9, 101)}, 4, "")
    assert killed.message.startswith("rank 3 of 4 was killed by SIGKILL")


def steps_of(events: list[list]) -> list[list[list[float]]]:
    """rank_probe's events as optimizer steps, each the gradients after each of its backwards."""
    steps: list[list[list[float]]] = [[]]
    for event in events:
        if event[0] == "step":
            steps.append([])
        else:
            steps[-1].append(event[1])
    return steps[:-1]


def test_gradients_are_all_reduced_in_the_last_backward_of_a_step_only(
    tiny_model_dir, data_file, tmp_path, monkeypatch
):
    """DDP's all-reduce runs inside each step's last backward: its gradients are the same on both
    ranks when it returns, while the backwards before it (accumulation) stay each rank's own.
    Steps of 3 micro-batches on 2 ranks give one rank 2 and the other 1; the last step has one,
    and leaves a rank with nothing of its own (it runs one with its loss times zero)."""
    import numpy as np
    from rank_probe import record_gradients
    from tunebench.engine.train.distributed import Ranks, data_parallel

    assert data_parallel(None, None, Ranks(launched=True)) is None  # a world of one: no DDP at all

    # one process, 3 micro-batches of 1 a step: 7 samples make steps of 3, 3, 1, then 3
    settings = {**SETTINGS, "per_device_train_batch_size": 1, "save_steps": 1}
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        dataset=[f"{data_file}#7"],
        output_dir=str(tmp_path),
        run_name="one",
        gradient_accumulation_steps=3,
        **settings,
    )
    events: list[list] = []
    hook = record_gradients(events, monkeypatch.setattr)
    try:
        assert run_training(cfg, lambda _e: None).status == "completed"
    finally:
        hook.remove()
        monkeypatch.undo()
    one = steps_of(events)
    assert [len(s) for s in one] == [3, 3, 1, 3]

    # its step-1 checkpoint resumed on 2 ranks, which keep its steps of 3 micro-batches
    import shutil

    shutil.copytree(tmp_path / "one", tmp_path / "two")
    as_if_stopped(tmp_path / "two", 1)
    recorded = orjson.loads((tmp_path / "two" / "config.json").read_bytes())["config"]
    config = tmp_path / "probe.json"
    resume = str(tmp_path / "two" / "checkpoints" / "step-1")
    config.write_text(json.dumps({**recorded, "resume_from_checkpoint": resume}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    probe = os.path.join(os.path.dirname(__file__), "rank_probe.py")
    done = subprocess.run(
        [*command, probe, str(config), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = (steps_of(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in (0, 1))
    for step, mine, theirs in zip(one[1:], rank0, rank1, strict=True):
        # the last backward returned with the gradients summed over the ranks: one process's, but
        # for float32 sums taken in another order and on other threads (the tolerance is 1e-4 of
        # the largest gradient; a micro-batch more or less changes them by far more)
        assert mine[-1] == theirs[-1]
        close = {"rtol": 1e-5, "atol": 1e-4 * np.abs(step[-1]).max()}
        np.testing.assert_allclose(mine[-1], step[-1], **close)
        if len(mine) == 2:
            # the backward before it kept rank 0's own: its first micro-batch's alone (the loss
            # counted twice, as DDP then averages the 2 ranks), nothing from rank 1
            np.testing.assert_allclose(mine[0], 2 * np.asarray(step[0]), **close)
            assert not np.allclose(mine[0], mine[-1], **close)
    # rank 0 took micro-batches 1 and 3 of a step, rank 1 the 2nd; in step 3 rank 1 had none
    assert [len(s) for s in rank0] == [2, 1, 2] and [len(s) for s in rank1] == [1, 1, 1]
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "one"))


# A Qwen2.5-72B-sized decoder: about 145 GB of bf16 weights, more than one card holds.
QWEN25_72B = dict(
    QWEN25_7B,
    hidden_size=8192,
    num_hidden_layers=80,
    intermediate_size=29568,
    num_attention_heads=64,
    num_key_value_heads=8,
)
H100 = 85_021_163_520


def test_a_base_too_big_for_one_gpu_is_sharded_with_fsdp2_and_the_estimate_says_so():
    """Data parallel while a plan fits one card; zero3 when only each GPU's share of the sharded
    run fits; nothing picked for one process, a stage given, or QLoRA (FSDP2 refuses it)."""
    from tunebench.engine.core.estimate import ModelShape, estimate_training_memory, sharding_stage

    big, small = ModelShape.from_config(QWEN25_72B), ModelShape.from_config(QWEN25_7B)

    def run(**over) -> TrainConfig:
        return TrainConfig(**({"model": "m", "max_length": 2048, "nproc_per_node": 4} | over))

    stage, why = sharding_stage(big, run(), H100, 2048)
    assert stage == "zero3" and "does not fit one GPU for data parallel" in why and "per GPU" in why
    assert sharding_stage(small, run(), H100, 2048) == ("", "")  # the 7B fits: data parallel
    assert sharding_stage(big, run(nproc_per_node=1), H100, 2048) == ("", "")
    assert sharding_stage(big, run(deepspeed="zero2"), H100, 2048) == ("", "")
    assert sharding_stage(big, run(train_type="qlora"), H100, 2048) == ("", "")
    assert sharding_stage(big, run(), None, 2048) == ("", "")  # no GPU seen
    # the GPU pane's estimate: each GPU's share and why, where it used to refuse the run
    shared = estimate_training_memory(run(), QWEN25_72B, H100, 2048)
    assert not shared.refused and shared.total_gib < 79 and shared.notes[0] == why
    assert shared.sharding == f"zero3: {why}"  # the Parameters form says it under deepspeed
    one = estimate_training_memory(run(nproc_per_node=1), QWEN25_72B, H100, 2048)
    assert one.refused and one.total_gib > 100
    # QLoRA: FSDP2 cannot shard the 4-bit base: data parallel, and the estimate says what is replicated
    qlora = estimate_training_memory(run(train_type="qlora", deepspeed="zero3"), QWEN25_7B, H100, 2048)
    assert "every GPU holds all of it (4-bit)" in qlora.notes[0] and not qlora.refused
    too_few = estimate_training_memory(run(nproc_per_node=2, deepspeed="zero3"), QWEN25_72B, 40 * 10**9, 2048)
    assert "even sharded over 2 GPUs" in too_few.refused and too_few.advice


def test_the_launcher_adds_zero3_when_the_base_does_not_fit_one_gpu(
    tiny_model_dir, data_file, tmp_path, monkeypatch, capsys
):
    """The ranks get --deepspeed zero3 as if typed, and the note says why; with no card that
    forces it, the flags are left as they were."""
    from tunebench.engine.core.estimate import (
        CUDA_CONTEXT_BYTES,
        ModelShape,
        read_model_info,
        sharded_peak,
        smallest_plan_of,
    )
    from tunebench.engine.train import distributed, preflight

    cfg = TrainConfig(model=str(tiny_model_dir), dataset=[str(data_file)], nproc_per_node=2, max_length=64)
    shape = ModelShape.from_config(read_model_info(str(tiny_model_dir)))
    # a card just too small for one process's whole plan, and big enough for a half share
    huge = 2**50
    assert preflight.sharding_for_launch(cfg, None, huge) == ("", "")
    whole = smallest_plan_of(cfg, shape).peak
    share = sharded_peak(dataclasses.replace(cfg, deepspeed="zero3"), shape)
    assert share < whole
    card = CUDA_CONTEXT_BYTES + (share + whole) // 2
    assert preflight.sharding_for_launch(cfg, None, card)[0] == "zero3"

    launched = []
    monkeypatch.setattr(distributed, "launch_ranks", lambda launch, argv: launched.append(argv) or 0)
    argv = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data_file),
        "--output_dir",
        str(tmp_path),
    ]
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setattr(
        preflight, "sharding_for_launch", lambda cfg, longest: ("zero3", "the base does not fit")
    )
    assert main(argv) == 0
    assert launched[-1][-2:] == ["--deepspeed", "zero3"]
    assert "note: the base does not fit" in capsys.readouterr().err
    monkeypatch.setattr(preflight, "sharding_for_launch", lambda cfg, longest: ("", ""))
    assert main(argv) == 0
    assert "--deepspeed" not in launched[-1]
