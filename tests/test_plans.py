"""Plans by memory budget: the planner's choices across budgets, its refusals, the --max_memory
flag and form field, and the plan line a run prints before step 1."""

from __future__ import annotations

import json
import types

import pytest
from tiny import QWEN25_7B
from tunebench.engine.core import plans
from tunebench.engine.core.config import ConfigError, TrainConfig, parse_value, to_command
from tunebench.engine.core.estimate import ModelShape, estimate_training_memory, training_plan
from tunebench.engine.core.memory_model import FAST_MAX_TOKENS, GIB, estimate_peak_bytes

# The bench's fixed workload: 2048-token samples, micro-batch 1 x accumulation 4, LoRA r8.
FIXED = dict(max_length=2048, per_device_train_batch_size=1, gradient_accumulation_steps=4, lora_dropout=0.0)
SHAPE = ModelShape.from_config(QWEN25_7B)
H200 = 143_771 * 1024**2


def choose(budget_gib: float, **settings):
    cfg = TrainConfig(**(FIXED | {"max_memory": float(budget_gib)} | settings))
    return training_plan(SHAPE, cfg, H200)


def ends(**settings) -> tuple[plans.Plan, plans.Plan]:
    cfg = TrainConfig(**(FIXED | settings))
    facts = plans.path_facts(cfg, QWEN25_7B, plans.techniques_for(cfg, ""))
    work = plans.Workload.of(cfg)
    return plans.fast_plan(QWEN25_7B, facts, work), plans.lean_plan(QWEN25_7B, facts, work)


@pytest.mark.parametrize("train_type", ["lora", "qlora"])
def test_more_memory_never_gives_a_slower_plan_and_the_ends_are_fast_and_lean(train_type):
    fast, lean = ends(train_type=train_type)
    steps = [b / 2 for b in range(2, 2 * 80) if b / 2 > lean.peak / GIB]
    budgets = [lean.peak / GIB + 0.001, *steps, fast.peak / GIB + 0.01]
    chosen = [choose(b, train_type=train_type).plan for b in sorted(budgets)]
    for budget, plan in zip(sorted(budgets), chosen, strict=True):
        if plan.peak > budget * GIB:
            pytest.fail(f"{plan.line()} is over the budget {budget}")
    costs = [p.cost for p in chosen]
    assert costs == sorted(costs, reverse=True)  # never slower with more memory
    assert len({p.recomputed_layers for p in chosen}) > 5  # the range between the ends is used
    # the ends: all the memory there is gives the fast end; lean's own peak at least lean's speed
    assert chosen[-1] == fast
    assert fast.recomputed_layers == 0 and not fast.embedding_on_host and not fast.inputs_on_host
    assert fast.tokens == 4 * 2048  # the whole step in one forward
    at_lean = choose(lean.peak / GIB + 0.001, train_type=train_type).plan
    assert at_lean.cost <= lean.cost and at_lean.peak <= lean.peak + 0.001 * GIB
    assert lean.recomputed_layers == 28 and lean.embedding_on_host and lean.inputs_on_host
    assert 2048 <= lean.tokens < 4096


def test_the_ends_keep_the_measured_peaks_and_sizes():
    fast, lean = ends()
    # measured on an H200 (bench/RESULTS.md, tests/test_memory.py): fast 50.00 GiB, lean 14.49
    assert abs(fast.peak / GIB / 50.00 - 1) < 0.05 and abs(lean.peak / GIB / 14.49 - 1) < 0.05
    long_steps = TrainConfig(**(FIXED | {"gradient_accumulation_steps": 64}))
    facts = plans.path_facts(long_steps, QWEN25_7B, plans.techniques_for(long_steps, ""))
    assert plans.fast_plan(QWEN25_7B, facts, plans.Workload.of(long_steps)).tokens == FAST_MAX_TOKENS
    qfast, qlean = ends(train_type="qlora")
    # fast QLoRA measured 53.1 GiB: its compiled layers keep their dequantised weights
    assert qlean.peak < 6 * GIB and abs(qfast.peak / GIB / 53.1 - 1) < 0.05


def test_the_issue_budgets_get_plans_between_the_ends():
    """A 24 GB card for LoRA, 12 and 8 GB cards for QLoRA (bench/bench_train.py's budgets)."""
    lora_22 = choose(22).plan
    assert 0 < lora_22.recomputed_layers and lora_22.peak <= 22 * GIB
    assert lora_22.cost < ends()[1].cost  # faster than lean, which leaves 7.5 GiB unused there
    qlora_10 = choose(10.5, train_type="qlora").plan
    assert qlora_10.tokens > 2048 and qlora_10.peak <= 10.5 * GIB
    assert qlora_10.cost < ends(train_type="qlora")[1].cost
    qlora_6 = choose(6, train_type="qlora").plan
    assert qlora_6.peak <= 6 * GIB


def test_plan_line_says_what_the_plan_does_and_its_predicted_peak():
    choice = choose(22)
    plan = choice.plan
    line = choice.line()
    assert line == (
        f"plan: {plan.recomputed_layers} of 28 layers recompute, {plan.where()}, {plan.tokens:,} tokens "
        f"per forward: predicted peak {plan.peak / GIB:.1f} GiB of 22.0"
    )
    fast = ends()[0].line()
    assert fast == "plan: 0 of 28 layers recompute, inputs on the GPU, 8,192 tokens per forward: " + (
        f"predicted peak {ends()[0].peak / GIB:.1f} GiB"
    )
    assert "embedding and layer inputs in host memory" in ends()[1].line()
    # the predicted peak is the memory model's for that plan
    assert (
        plan.peak
        == estimate_peak_bytes(
            QWEN25_7B,
            tokens=plan.tokens,
            recomputed_layers=plan.recomputed_layers,
            embedding_on_host=plan.embedding_on_host,
            inputs_on_host=plan.inputs_on_host,
        )["total"]
    )


def test_a_budget_nothing_fits_is_refused_with_the_smallest_peak_and_what_to_change():
    with pytest.raises(plans.NoPlanFits) as refused:
        choose(10.5)  # LoRA on a 12 GB card: the bf16 weights alone are 14 GiB
    error = refused.value
    assert "--max_memory 10.5 GiB" in error.message and "14.5 GiB" in error.message
    assert "train_type qlora" in error.hint and "raise --max_memory to 14.5" in error.hint
    with pytest.raises(plans.NoPlanFits) as refused:
        choose(5.5, train_type="qlora")
    hint = refused.value.hint
    assert "max_length" in hint and "qlora" not in hint.split("raise")[0].replace("max_length", "")
    shorter = int(hint.split("max_length ")[1].split()[0])
    assert choose(5.5, train_type="qlora", max_length=shorter).plan.peak <= 5.5 * GIB
    with pytest.raises(plans.NoPlanFits):
        choose(5.5, train_type="qlora", max_length=shorter + 1)
    # a pinned end over the budget is refused too, pointing at auto
    with pytest.raises(plans.NoPlanFits, match="profile fast") as pinned:
        choose(30, profile="fast")
    assert "--profile auto" in pinned.value.hint
    assert choose(30, profile="lean").plan == ends()[1]


def test_without_a_cap_the_card_is_the_budget_and_without_a_gpu_the_fast_end():
    cfg = TrainConfig(**FIXED)
    on_24gb = training_plan(SHAPE, cfg, 24 * 10**9)
    assert on_24gb.budget is not None and on_24gb.plan.peak <= on_24gb.budget < 22 * GIB
    assert not on_24gb.capped and "card" in on_24gb.why
    no_gpu = training_plan(SHAPE, cfg, None)
    assert no_gpu.plan == ends()[0] and no_gpu.budget is None
    # a cap above the card is held to the card
    over = training_plan(SHAPE, TrainConfig(**FIXED, max_memory=500.0), 24 * 10**9)
    assert over.budget == 24 * 10**9 - plans.CUDA_CONTEXT_BYTES and over.capped


def test_the_estimate_shows_the_plan_or_the_refusal():
    shown = estimate_training_memory(TrainConfig(**FIXED, max_memory=22.0), QWEN25_7B, card_bytes=H200)
    assert shown.plan == choose(22).line() and not shown.refused
    assert shown.total_gib == round(choose(22).plan.peak / GIB, 3)
    refused = estimate_training_memory(TrainConfig(**FIXED, max_memory=8.0), QWEN25_7B, card_bytes=H200)
    assert not refused.plan and "no training plan fits" in refused.refused
    assert any("qlora" in a for a in refused.advice)


def test_max_memory_is_a_flag_and_a_form_field_and_empty_means_no_cap(tmp_path):
    from tunebench.engine.cli.flags import flag_values
    from tunebench.engine.cli.train import build_train_parser

    args = build_train_parser().parse_args(["--dataset", "d.jsonl", "--max_memory", "10.5"])
    cfg = TrainConfig(**flag_values(args))
    assert cfg.max_memory == 10.5 and "--max_memory 10.5" in to_command(cfg)
    assert TrainConfig().max_memory == 0.0 and "--max_memory" not in to_command(TrainConfig())
    assert parse_value(TrainConfig, "max_memory", "") == 0.0
    with pytest.raises(ConfigError, match="max_memory"):
        TrainConfig(max_memory=-1.0)
    with pytest.raises(ValueError, match="not a number"):
        parse_value(TrainConfig, "max_memory", "lots")

    from tunebench.engine.core.workspace import Workspace
    from tunebench.tui.widgets.params.settings_store import TrainSettings

    ws = Workspace(tmp_path / "ws").ensure()
    settings = TrainSettings(ws)
    settings.load()
    assert settings.text["max_memory"] == "" and settings.config.max_memory == 0.0  # no GPU known
    # a GPU seen: its free memory (less the CUDA context and margin) becomes the default
    free = 24 * GIB
    assert settings.set_default("max_memory", f"{plans.default_budget_gib(free):.1f}")
    assert 20 < settings.config.max_memory < 23.5
    settings.save()  # a default is not a setting: nothing written for it
    assert "max_memory" not in ws.read_settings().get("train", {})
    settings.set("max_memory", "10.5")
    settings.save()
    assert ws.read_settings()["train"]["max_memory"] == 10.5
    again = TrainSettings(ws)
    again.load()
    assert not again.set_default("max_memory", "21.0")  # the person's value stays
    assert again.config.max_memory == 10.5
    again.set("max_memory", "")  # emptied: no cap, and saved as such
    again.save()
    assert ws.read_settings()["train"]["max_memory"] == 0.0
    third = TrainSettings(ws)
    third.load()
    assert third.text["max_memory"] == "" and third.config.max_memory == 0.0


# ------------------------------------------------------------------ the CUDA path's plumbing


def test_the_cuda_path_prints_its_plan_first_and_caps_the_allocator(monkeypatch):
    """cuda_path without a GPU: the card's numbers are stood in for; what it plans, notes and caps."""
    torch = pytest.importorskip("torch")
    from tunebench.engine.cuda import path as accel

    capped = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 15 * GIB)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def index_of(device):  # torch refuses torch.device("cuda") without an index here
        if not isinstance(device, int):
            raise ValueError(
                f"Expected a torch.device with a specified index or an integer, but got:{device}"
            )

    def get_fraction(device):
        index_of(device)
        return 1.0

    def set_fraction(fraction, device):
        index_of(device)
        capped.append(fraction)

    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", get_fraction, raising=False)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setenv("TUNEBENCH_ACCEL", "")
    cfg = TrainConfig(**FIXED, max_memory=22.0)
    path = accel.cuda_path(cfg, torch.device("cuda"), QWEN25_7B, longest=2048)
    assert path.notes[0] == choose(22).line()  # the same plan as the estimate's, printed first
    assert capped == [pytest.approx(22 * 1.1 / 80)]
    uncapped = accel.cuda_path(TrainConfig(**FIXED), torch.device("cuda"), QWEN25_7B, longest=2048)
    assert uncapped.notes[0].startswith("plan: 0 of 28 layers recompute") and len(capped) == 1
    with pytest.raises(plans.NoPlanFits):
        accel.cuda_path(TrainConfig(**FIXED, max_memory=8.0), torch.device("cuda"), QWEN25_7B)


def test_the_path_recomputes_the_plans_layers(monkeypatch):
    """On the CPU the fast path runs its math; with a plan, the last `recomputed_layers` layers
    recompute and the first keep their activations."""
    torch = pytest.importorskip("torch")
    from test_accel import lora_model, make_samples
    from tunebench.engine.cuda import path as accel

    cfg = TrainConfig(gradient_checkpointing=True)
    path = accel.FastPath(cfg, torch.device("cpu"), "fast")
    path.use.discard("compile")
    model, _ = lora_model(path, recompute=True)
    config = model.get_base_model().config
    facts = plans.path_facts(cfg, config, path.use, cuda=False)
    path.plan = plans.make_plan(config, facts, recomputed=1, embedding=False, inputs=False, tokens=64)
    loss = path.loss_sum(model, path.collate(make_samples([30, 20]), 0, torch.device("cpu")))
    loss.backward()
    assert [layer._tb_recompute for layer in path.prepared(model).layers] == [False, True]
    assert path.group([[0], [1]], make_samples([30, 20])) == [[0], [1]]  # merging is CUDA's


def test_preflight_refuses_a_budget_nothing_fits_before_the_model_loads(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from tunebench.engine.cli.main import main
    from tunebench.engine.models import loading
    from tunebench.engine.train import recipe

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"query": f"q{i}", "response": "r"}) for i in range(4)))
    monkeypatch.setattr(loading, "pick_device", lambda *a, **k: types.SimpleNamespace(type="cuda"))
    monkeypatch.setattr(recipe, "run_training", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(
        ["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--max_memory", "0.0001"]
        + ["--output_dir", str(tmp_path / "runs")]
    )
    err = capsys.readouterr().err
    assert code != 0 and "no training plan fits in --max_memory 0.0001 GiB" in err
    assert "raise --max_memory" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


# Budget rows measured on an H200, 7B random weights, the played card's cap
# (bench/RESULTS.md, session 22 call 1): (train_type, --max_memory) -> GiB allocated at the peak.
MEASURED_BUDGET_PEAKS = {("lora", 22.0): 21.05, ("qlora", 10.5): 9.29, ("qlora", 6.0): 5.78}


@pytest.mark.parametrize("case", sorted(MEASURED_BUDGET_PEAKS))
def test_each_budget_plan_predicts_its_measured_peak_within_10_percent(case):
    train_type, budget = case
    plan = choose(budget, train_type=train_type).plan
    assert abs(plan.peak / GIB / MEASURED_BUDGET_PEAKS[case] - 1) < 0.10, plan.line()
