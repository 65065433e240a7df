"""Knowledge the TUI, the engine process and the commands share: each reads a dataset spec, a model
path, a run's checkpoints, an adapter's base and a training plan by the one function in engine/core, so
they cannot give two answers. Each case here is one where two copies used to differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import QWEN25_7B
from tunebench.engine.core import protocol as P
from tunebench.engine.core.config import TrainConfig
from tunebench.engine.core.data import parse_dataset_spec
from tunebench.engine.core.errors import DataError, UserError
from tunebench.engine.core.estimate import CUDA_CONTEXT_BYTES, ModelShape, read_model_info, training_plan
from tunebench.engine.core.memory_model import FAST_MAX_TOKENS, GIB, lora_parameters
from tunebench.engine.core.targets import ADAPTER_CONFIG, ADAPTER_FILES, BASE, adapters_base, resolve_target
from tunebench.engine.core.workspace import CHECKPOINT_STATE_FILE, Workspace, list_checkpoints, read_run
from tunebench.engine.process.jobs import Jobs
from tunebench.tui.widgets.chat.column_choices import ColumnChoice, columns_problem, discover_columns
from tunebench.tui.widgets.dataset.light_tokenizer import tokenizer_folder
from tunebench.tui.widgets.params.settings_store import TrainSettings
from tunebench.tui.workspace_setup import first_dataset


@pytest.fixture
def ws(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "ws").ensure()
    for name in ("a.jsonl", "b.jsonl", "v#2.jsonl"):
        (ws.datasets_dir / name).write_text('{"query": "q", "response": "r"}\n')
    return ws


# ================================================================ path#N


@pytest.mark.parametrize(
    ("spec", "path", "count"),
    [
        ("datasets/a.jsonl#5", "datasets/a.jsonl", 5),
        (" datasets/a.jsonl#5 ", "datasets/a.jsonl", 5),  # the engine kept the spaces in the path
        ("datasets/a.jsonl# 5", "datasets/a.jsonl", 5),  # the TUI took "# 5" as part of the name
        ("datasets/v#2.jsonl", "datasets/v#2.jsonl", None),  # a '#' in the workspace's file name
    ],
)
def test_the_engine_and_the_tui_read_a_spec_as_training_does(ws, spec, path, count):
    want = parse_dataset_spec(spec, ws.root)
    assert want == (ws.root / path, count)
    resolved = Jobs(ws).resolve_train_paths({"dataset": [spec]})["dataset"][0]
    assert parse_dataset_spec(resolved) == want
    settings = TrainSettings(ws)
    settings.update({"dataset": [spec]})
    assert first_dataset(ws, settings) == ws.root / path


def test_other_sources_train_as_typed_and_the_pane_opens_only_json(ws):
    """A hub id stays a hub id on the way to the engine (not a path in the workspace); a .parquet
    trains, but the Dataset pane, which edits JSON lines, opens a JSON file instead of it."""
    (ws.datasets_dir / "table.parquet").write_bytes(b"PAR1")
    specs = ["tatsu-lab/alpaca#50", "datasets/table.parquet#3"]
    resolved = Jobs(ws).resolve_train_paths({"dataset": specs})["dataset"]
    assert resolved == ["tatsu-lab/alpaca#50", f"{ws.datasets_dir / 'table.parquet'}#3"]
    assert (
        parse_dataset_spec(resolved[0])
        == parse_dataset_spec(specs[0], ws.root)
        == (Path("tatsu-lab/alpaca"), 50)
    )
    settings = TrainSettings(ws)
    settings.update({"dataset": specs})
    assert first_dataset(ws, settings) == ws.datasets_dir / "a.jsonl"


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("#5", "no file name before '#'"),
        ("datasets/a.jsonl#0", "'0' after '#'"),
        ("datasets/a.jsonl#x", "'x' after '#'"),
    ],
)
def test_a_bad_spec_reaches_training_to_be_named(ws, spec, said):
    resolved = Jobs(ws).resolve_train_paths({"dataset": [spec]})["dataset"][0]
    assert resolved == (spec if spec.startswith("#") else str(ws.root / spec))
    with pytest.raises(DataError, match=said):
        parse_dataset_spec(resolved)


def test_a_home_relative_spec_is_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_dataset_spec("~/d.jsonl#3", "/elsewhere") == (tmp_path / "d.jsonl", 3)
    assert str(parse_dataset_spec("~/d.jsonl#3")) == f"{tmp_path / 'd.jsonl'}#3"


# ============================================================ checkpoints


def _checkpoint(run: Path, name: str, *files: str) -> Path:
    folder = run / "checkpoints" / name
    folder.mkdir(parents=True)
    for file in files:
        (folder / file).write_bytes(b"")
    return folder


def test_the_chat_columns_offer_the_checkpoints_the_engine_can_load(ws):
    run = ws.runs_dir / "0612-1530"
    resumable = _checkpoint(run, "step-10", *ADAPTER_FILES, CHECKPOINT_STATE_FILE)
    adapter_only = _checkpoint(run, "step-2", *ADAPTER_FILES)
    _checkpoint(run, "step-20", ADAPTER_CONFIG)  # its weights still being copied
    _checkpoint(run, "step-x", *ADAPTER_FILES)
    state_only = _checkpoint(run, "step-30", CHECKPOINT_STATE_FILE)

    assert list_checkpoints(run) == [resumable, state_only]
    assert list_checkpoints(run, ADAPTER_FILES) == [adapter_only, resumable]
    columns = discover_columns(ws.runs_dir)
    assert [c.path for c in columns] == ["base", str(resumable), str(adapter_only)]
    assert [c.label for c in columns] == ["base", "0612-1530 step 10", "0612-1530 step 2"]
    assert read_run(run).steps == 30


# ============================================================ model paths


@pytest.mark.parametrize("typed", ["models/tiny", " models/tiny ", "demo"])
def test_a_model_typed_in_the_form_is_the_one_the_estimate_and_the_tui_read(ws, typed):
    for folder in (ws.root / "models" / "tiny", ws.root / "demo"):  # a folder named demo too
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 99}')
        (folder / "tokenizer.json").write_text("{}")
    engine = Jobs(ws).resolve_model(typed)
    info = read_model_info(typed, ws.root)
    if typed == "demo":  # the built-in model, whatever the workspace holds
        assert engine == "demo" and info == read_model_info("demo")
        assert tokenizer_folder(typed, ws.root) != ws.root / "demo"
    else:
        assert engine == str(ws.root / "models" / "tiny")
        assert info is not None and info["vocab_size"] == 99
        assert tokenizer_folder(typed, ws.root) == Path(engine)


# ============================================================ GPU memory


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all-linear"]])
@pytest.mark.parametrize("budget", [0.0, 22.0])
def test_the_gpu_path_plans_what_the_estimate_plans(targets, budget, monkeypatch):
    """The CUDA path and the TUI's estimate choose their plan by the one planner, with the same
    techniques and budget: the same plan, on a card that leaves the budget to the plan."""
    torch = pytest.importorskip("torch")
    from tunebench.engine.cuda import path as accel

    card = 40 * GIB
    context = CUDA_CONTEXT_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (card - context, card))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d=None: 1.0, raising=False)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: None)
    monkeypatch.setenv("TUNEBENCH_ACCEL", "")
    cfg = TrainConfig(
        target_modules=targets,
        max_length=2048,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=8,
        max_memory=budget,
    )
    estimate = training_plan(ModelShape.from_config(QWEN25_7B), cfg, card, longest=2048)
    path = accel.cuda_path(cfg, torch.device("cuda"), QWEN25_7B, longest=2048)
    assert path.notes[0] == estimate.line()
    assert estimate.plan.parts["lora_and_optimizer"] == 16 * lora_parameters(
        QWEN25_7B, cfg.lora_rank, targets
    )
    assert 2048 <= estimate.plan.tokens <= FAST_MAX_TOKENS


# ============================================================ adapters' base


def _run_on(root: Path, run_id: str, base: Path) -> Path:
    """A run folder whose adapter was trained on `base` (a model folder on this machine)."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text("{}")
    adapter = root / run_id / "adapter"
    adapter.mkdir(parents=True)
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    run = {"config": {"model": str(base)}, "base_model_path": str(base)}
    (root / run_id / "config.json").write_text(json.dumps(run))
    return root / run_id


def test_adapters_of_two_bases_are_refused_by_every_caller_before_anything_loads(ws, tmp_path):
    from tunebench.engine.deploy.served import AdapterSpec, plan_deployment
    from tunebench.engine.infer.export import base_model_of
    from tunebench.engine.process.jobs import Job

    first = _run_on(ws.runs_dir, "r1", tmp_path / "base-a")
    second = _run_on(ws.runs_dir, "r2", tmp_path / "base-b")
    same = _run_on(ws.runs_dir, "r3", tmp_path / "base-a")
    assert adapters_base([resolve_target(str(first)), resolve_target(str(same))]) == str(tmp_path / "base-a")

    def refused(call) -> str:
        with pytest.raises(UserError) as err:
            call()
        assert "different base models" in err.value.message
        assert "r1" in err.value.message and "r2" in err.value.message
        assert str(tmp_path / "base-a") in err.value.message and str(tmp_path / "base-b") in err.value.message
        return err.value.message

    targets = [resolve_target(BASE), resolve_target(str(first)), resolve_target(str(second))]
    message = refused(lambda: adapters_base(targets))
    assert refused(lambda: base_model_of(targets)) == message  # export and tunebench chat
    assert refused(lambda: plan_deployment("", [AdapterSpec("a", str(first)), AdapterSpec("b", str(second))]))
    events = []
    request = P.Generate(targets=["base", "runs/r1", "runs/r2"], messages=[{"role": "user", "content": "hi"}])
    assert refused(lambda: Jobs(ws).generate(Job("generate", "1", "test"), request, events.append)) == message
    assert events == []  # nothing loaded: the TUI's chat used to load r1's base and fail on r2
    columns = [ColumnChoice(BASE, BASE), ColumnChoice(str(first / "adapter"), "r1 final")]
    assert columns_problem(columns) == ""
    assert columns_problem([*columns, ColumnChoice(str(second / "adapter"), "r2 final")]) == message
