"""The training recipe on a tiny model: loss falls, files land, resume is exact, adapters are plain PEFT."""

from __future__ import annotations

import json
import math

import orjson
import pytest
import torch
from tunebench.engine.core.config import TrainConfig
from tunebench.engine.core.errors import UserError
from tunebench.engine.core.workspace import list_checkpoints
from tunebench.engine.train.recipe import StopSignal, run_training
from tunebench.engine.train.schedule import build_plan, lr_lambda

QUESTIONS = [
    "Who are you?",
    "What is your name?",
    "Who made you?",
    "Introduce yourself.",
    "你是谁？",
    "你叫什么名字？",
]


@pytest.fixture(scope="module")
def identity_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "identity.jsonl"
    lines = []
    for i in range(12):
        q = QUESTIONS[i % len(QUESTIONS)]
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": f"{q} ({i})"},
                    {"role": "assistant", "content": "I am {{NAME}}, made by {{AUTHOR}}."},
                ]
            }
        )
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    return path


def make_cfg(model_dir, data, out, **over) -> TrainConfig:
    settings = dict(
        model=str(model_dir),
        dataset=[str(data)],
        model_name=["robot"],
        model_author=["us"],
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        num_train_epochs=3,
        logging_steps=1,
        save_steps=2,
        save_total_limit=2,
        eval_steps=2,
        lora_dropout=0.1,
        gradient_checkpointing=False,
        output_dir=str(out),
    )
    settings.update(over)
    return TrainConfig(**settings)


def run(cfg, stop=None):
    events = []
    result = run_training(cfg, events.append, stop)
    return result, events


def losses(events):
    return [(e.step, e.loss) for e in events if e.type == "TrainStep"]


def test_loss_falls_and_run_files_are_written(tiny_model_dir, identity_file, tmp_path):
    result, events = run(make_cfg(tiny_model_dir, identity_file, tmp_path, val_ratio=0.2, run_name="r1"))
    assert result.status == "completed"
    steps = losses(events)
    assert len(steps) == result.steps == 9  # 10 train samples / (2 x 2) -> 3 steps per epoch
    assert all(math.isfinite(loss) for _, loss in steps)
    assert steps[-1][1] < steps[0][1] * 0.9
    assert any(e.type == "EvalResult" for e in events)

    run_dir = tmp_path / "r1"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["config"]["lora_rank"] == 8 and saved["command"].startswith("tunebench train")
    assert saved["base_model_path"] == str(tiny_model_dir)
    records = [orjson.loads(line) for line in (run_dir / "metrics.jsonl").read_bytes().splitlines()]
    assert {r["type"] for r in records} == {"TrainStep", "EvalResult", "CheckpointSaved", "TrainFinished"}
    # The time to the first step, from the model loaded, is said right after that step and kept
    # with the other stages' seconds in the run's TrainFinished.
    first = "time to first step"
    notes = [i for i, e in enumerate(events) if e.type == "Log" and e.message.startswith(first)]
    step_events = [i for i, e in enumerate(events) if e.type == "TrainStep"]
    assert len(notes) == 1 and step_events[0] - 1 <= notes[0] < step_events[1], notes
    compiles = torch.cuda.is_available()  # the CUDA path compiles its layers, the CPU path nothing
    assert ("compiling" in events[notes[0]].message) == compiles
    stages = records[-1]["stage_s"]
    expected = {"load", "to_first_step", "first_step", "steps", "save"} | ({"compile"} if compiles else set())
    assert set(stages) == expected, stages
    assert 0 < stages["first_step"] <= stages["to_first_step"] and min(stages.values()) > 0
    # the first step's seconds and the compile's lie inside to_first_step and steps
    apart = sum(v for name, v in stages.items() if name not in ("first_step", "compile"))
    assert apart <= records[-1]["seconds"] + 0.1
    assert {p.name for p in (run_dir / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    # save_steps=2 over 9 steps saves 2, 4, 6, 8 and the last step, 9 (a resume with more steps
    # goes on from there); the limit keeps the newest two.
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-8", "step-9"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask-022", "umask-077"])
def test_the_adapter_and_checkpoint_files_follow_the_umask(
    umask, mode, tiny_model_dir, identity_file, tmp_path
):
    """adapter_model.safetensors was written 0600 (safetensors' save_file) in adapter/ and in each
    checkpoint while the run's other files followed the umask: other users of a shared box could
    not load the adapter."""
    import os
    import stat

    previous = os.umask(umask)
    try:
        run(make_cfg(tiny_model_dir, identity_file, tmp_path, run_name="m", max_steps=2, save_steps=1))
    finally:
        os.umask(previous)
    run_dir = tmp_path / "m"
    files = [*(run_dir / "adapter").iterdir(), *(run_dir / "checkpoints").glob("step-*/*")]
    assert {p.name for p in files} >= {"adapter_model.safetensors", "adapter_config.json", "trainer_state.pt"}
    assert {p.relative_to(run_dir).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files} == {
        p.relative_to(run_dir).as_posix(): mode for p in files
    }


def test_final_loss_is_the_last_logged_window(tiny_model_dir, identity_file, tmp_path):
    """Logged losses average the steps since the last log; the final loss must be the number the
    last progress line showed, not the last step's alone."""
    result, events = run(make_cfg(tiny_model_dir, identity_file, tmp_path, logging_steps=4, max_steps=8))
    assert [step for step, _ in losses(events)] == [1, 4, 8]  # the last window is steps 5-8
    (finished,) = [e for e in events if e.type == "TrainFinished"]
    assert finished.final_loss == losses(events)[-1][1]


def test_adapter_loads_with_plain_peft_and_disabled_adapter_is_the_base(
    tiny_model_dir, identity_file, tmp_path
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, _ = run(make_cfg(tiny_model_dir, identity_file, tmp_path, num_train_epochs=1))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, result.adapter_dir)
        tuned_logits = tuned(ids).logits
        with tuned.disable_adapter():
            disabled_logits = tuned(ids).logits
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-4)
    torch.testing.assert_close(disabled_logits, base_logits, atol=1e-6, rtol=0)


def test_resume_gives_exactly_the_losses_of_an_uninterrupted_run(tiny_model_dir, identity_file, tmp_path):
    _, full_events = run(make_cfg(tiny_model_dir, identity_file, tmp_path, run_name="full"))

    stop = StopSignal()
    events = []

    def emit(event):
        events.append(event)
        if event.type == "TrainStep" and event.step == 3:
            stop.request("graceful")

    first = run_training(make_cfg(tiny_model_dir, identity_file, tmp_path, run_name="part"), emit, stop)
    assert first.status == "stopped" and first.steps == 3
    assert (tmp_path / "part" / "checkpoints" / "step-3").is_dir()  # graceful stop saved
    # As if the first attempt had taken 1000 s up to its checkpoint: the run's time counts it
    # (issue 16 item 11: "took 0:41" after a resume counted only the resumed part).
    metrics = tmp_path / "part" / "metrics.jsonl"
    records = [orjson.loads(line) for line in metrics.read_bytes().splitlines()]
    for record in records:
        if record["type"] == "TrainStep":
            record["elapsed_s"] = 1000.0 * record["step"] / 3
    metrics.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))

    second, resumed = run(
        make_cfg(tiny_model_dir, identity_file, tmp_path, resume_from_checkpoint=str(tmp_path / "part"))
    )
    assert second.status == "completed"
    assert losses(resumed) == [x for x in losses(full_events) if x[0] > 3]
    # metrics.jsonl of the run holds each step once, before and after the resume
    steps = [
        orjson.loads(line)["step"]
        for line in (tmp_path / "part" / "metrics.jsonl").read_bytes().splitlines()
        if orjson.loads(line)["type"] == "TrainStep"
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 9
    assert all(e.elapsed_s >= 1000.0 for e in resumed if e.type == "TrainStep")
    assert second.seconds >= 1000.0


def test_abort_stops_without_saving_an_adapter(tiny_model_dir, identity_file, tmp_path):
    stop = StopSignal()
    stop.request("abort")
    result, _ = run(make_cfg(tiny_model_dir, identity_file, tmp_path, run_name="ab"), stop)
    assert result.status == "aborted" and result.steps == 0 and result.adapter_dir == ""
    assert not (tmp_path / "ab" / "adapter").exists()


def test_temporary_folders_of_a_killed_run_are_removed_at_the_next_start(
    tiny_model_dir, identity_file, tmp_path
):
    """A run killed while it wrote a checkpoint (or its adapter) leaves a temporary folder; the next
    run in the same output folder removes it, but not one that a live run is writing."""
    from tunebench.engine.train.checkpoints import writing_run

    killed = [tmp_path / "killed" / "checkpoints" / ".tmp-step-2", tmp_path / "killed" / ".adapter.tmp"]
    busy = tmp_path / "busy" / "checkpoints" / ".tmp-step-4"
    for folder in [*killed, busy]:
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"half")
    with writing_run(tmp_path / "busy"):  # another process training that run
        _, events = run(make_cfg(tiny_model_dir, identity_file, tmp_path, run_name="next", max_steps=1))
    assert not any(folder.exists() for folder in killed)
    assert (busy / "adapter_model.safetensors").read_bytes() == b"half"
    said = [e.message for e in events if e.type == "Log" and "removed" in e.message]
    assert len(said) == 2 and all(".tmp" in line for line in said), said


def test_a_checkpoint_write_that_fails_leaves_no_temporary_folder(
    tiny_model_dir, identity_file, tmp_path, monkeypatch
):
    import errno

    import torch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    from tunebench.engine.core.files import DiskWriteError

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskWriteError, match="trainer_state.pt: the disk is full"):
        run(make_cfg(tiny_model_dir, identity_file, tmp_path, run_name="full", save_steps=1, max_steps=2))
    assert (tmp_path / "full" / "checkpoints").is_dir()
    assert list((tmp_path / "full" / "checkpoints").iterdir()) == []


def test_accumulation_matches_one_big_batch(tiny_model_dir, identity_file, tmp_path):
    common = dict(lora_dropout=0.0, max_steps=2, logging_steps=1)
    _, big = run(
        make_cfg(
            tiny_model_dir,
            identity_file,
            tmp_path,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            **common,
        )
    )
    _, accumulated = run(
        make_cfg(
            tiny_model_dir,
            identity_file,
            tmp_path,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=4,
            **common,
        )
    )
    for (_, a), (_, b) in zip(losses(big), losses(accumulated), strict=True):
        assert a == pytest.approx(b, rel=1e-4)


def test_unknown_target_module_is_a_clear_error(tiny_model_dir, identity_file, tmp_path):
    with pytest.raises(UserError, match="no linear layer named qkv_proj") as info:
        run(make_cfg(tiny_model_dir, identity_file, tmp_path, target_modules=["qkv_proj"]))
    assert "q_proj" in info.value.hint


def test_qlora_without_cuda_is_refused(tiny_model_dir, identity_file, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="QLoRA needs an NVIDIA GPU"):
        run(make_cfg(tiny_model_dir, identity_file, tmp_path, quant_bits=4))


def test_plan_is_seeded_and_honours_epochs_and_max_steps():
    cfg = TrainConfig(
        dataset=["x"], per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2.5
    )
    plan = build_plan(10, cfg)
    assert len(plan) == 8  # 3 steps per epoch (5 micro-batches -> 2 + 2 + 1), 2.5 epochs -> ceil(7.5)
    assert plan == build_plan(10, cfg)
    assert sorted(i for step in plan[:3] for mb in step for i in mb) == list(range(10))
    assert len(build_plan(10, TrainConfig(dataset=["x"], max_steps=25))) == 25


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(dataset=["x"], warmup_ratio=0.1, lr_scheduler_type="cosine")
    f = lr_lambda(cfg, 100)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=0.02)
    assert f(99) < 0.01
    linear = lr_lambda(TrainConfig(dataset=["x"], lr_scheduler_type="linear"), 10)
    assert linear(5) == pytest.approx(0.5)
    # --warmup_steps (transformers' and ms-swift's flag) wins over the ratio
    steps = lr_lambda(TrainConfig(dataset=["x"], warmup_ratio=0.1, warmup_steps=20), 100)
    assert steps(19) < 1.0 and steps(20) == pytest.approx(1.0)


@pytest.mark.parametrize("before", ["as set up", "after an evaluation"])
def test_a_step_trains_in_training_mode_whoever_calls_it(before, tiny_model_dir, identity_file, tmp_path):
    """The longest-sample bench runs the recipe's step without the train loop. Its decoder layers
    ran in eval mode, so none recomputed and every activation and dequantised weight was kept (a
    7B QLoRA needed ~16 GiB more): from_pretrained leaves the model in eval mode, and the PeftModel
    around it starts in training mode, so asking the top module was not enough. Every module of
    the model trains in every step."""
    from tunebench.engine.train import recipe

    cfg = make_cfg(tiny_model_dir, identity_file, tmp_path, gradient_checkpointing=True, lora_dropout=0.0)
    setup = recipe._setup(cfg, lambda event: None, recipe.StopSignal(), recipe.Ranks(), None)
    if before == "after an evaluation":
        setup.model.eval()
    modes = []
    hooks = [
        module.register_forward_pre_hook(lambda module, args: modes.append(module.training))
        for module in setup.model.modules()
    ]
    try:
        assert recipe._train_step(cfg, setup, recipe._Progress(step=0), recipe.StopSignal())
    finally:
        for hook in hooks:
            hook.remove()
    assert modes and all(modes), f"{modes.count(False)} of {len(modes)} module calls in eval mode"


def test_a_run_name_taken_gets_the_next_free_folder(tmp_path):
    """Two runs with one --run_name (or started in the same second) keep separate folders."""
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.train.resume import new_run_dir

    cfg = TrainConfig(dataset=["d.jsonl"], output_dir=str(tmp_path), run_name="mine")
    assert new_run_dir(cfg) == tmp_path / "mine"
    (tmp_path / "mine").mkdir()
    assert new_run_dir(cfg) == tmp_path / "mine-2"
    (tmp_path / "mine-2").mkdir()
    assert new_run_dir(cfg) == tmp_path / "mine-3"
