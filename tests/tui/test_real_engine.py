"""The main flows against the real engine (engine/process/server.py) on a tiny model built in code."""

from __future__ import annotations

import json

import pytest
from tiny import write_identity_dataset
from tui_helpers import wait_until

server = pytest.importorskip("tunebench.engine.process.server")

from textual.containers import VerticalScroll  # noqa: E402
from tunebench.tui.app import TuneBenchApp  # noqa: E402
from tunebench.tui.widgets.chat.chat_column import ChatColumn  # noqa: E402
from tunebench.tui.widgets.chat.chat_pane import ChatPane  # noqa: E402
from tunebench.tui.widgets.train.train_pane import TrainPane  # noqa: E402


@pytest.fixture
def real_workspace(tmp_path, tiny_model_dir):
    ws = tmp_path / "ws"
    write_identity_dataset(ws / "datasets" / "identity.jsonl", 6)
    (ws / "tunebench.toml").write_text(
        f"""[train]
model = "{tiny_model_dir}"
dataset = ["datasets/identity.jsonl"]
model_name = ["robot"]
model_author = ["us"]
max_length = 64
per_device_train_batch_size = 2
learning_rate = 0.005
max_steps = 3
logging_steps = 1
save_steps = 2
gradient_checkpointing = false
"""
    )
    return ws


@pytest.fixture
def real_engine(real_workspace):
    """The real engine, serving from a thread of this process (torch loads once)."""
    import torch
    from threaded_engine import ThreadedEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train fastest on one thread; the app needs the other
    running = ThreadedEngine(real_workspace)
    yield running.server
    running.stop()
    torch.set_num_threads(threads)


async def test_edit_set_train_and_chat_with_the_real_engine(real_workspace, real_engine):
    """The four main flows in one session: edit a sample and save, change a parameter and see the
    command, train and see steps arrive, chat with base and adapter side by side."""
    data = real_workspace / "datasets" / "identity.jsonl"
    app = TuneBenchApp(real_workspace)  # the default starter finds the live engine
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_until(pilot, lambda: app.client.connected and app.snapshot, timeout=20, what="the engine")
        # edit the first sample and save it
        await wait_until(pilot, lambda: app.dataset_pane.reports, what="row checks")
        await pilot.press(
            "e",
            "f8",  # a single-turn sample opens as text fields: switch to its JSON
            "f7",  # select all
            *'{"messages":[{"role":"user","content":"Hi"},',
            *'{"role":"assistant","content":"Yo"}]}',
        )
        await pilot.press("ctrl+s")  # apply; the save (ctrl+s again, or autosave) writes it
        await pilot.press("ctrl+s")

        def first_answer() -> str:
            return json.loads(data.read_text().splitlines()[0])["messages"][1]["content"]

        await wait_until(pilot, lambda: first_answer() == "Yo", timeout=15, what="the saved edit")
        assert (data.parent / "identity.jsonl.bak").exists()
        # change a parameter: the command follows
        await pilot.press("2")
        app.query_one("#input-lora_rank").focus()
        await pilot.press("ctrl+a", "ctrl+k", "4")
        assert "--lora_rank 4" in app.query_one("#param-command").command
        # train
        await pilot.press("f5", "s")
        train = app.query_one(TrainPane)
        await wait_until(pilot, lambda: train.run.status == "completed", timeout=90, what="training")
        assert [step for step, _ in train.run.train_points] == [1, 2, 3]
        assert train.run.checkpoints and train.run.checkpoints[0][0] == 2
        adapter = train.run.adapter_dir
        run_config = json.loads((real_workspace / "runs" / train.run.run_id / "config.json").read_text())
        assert run_config["config"]["lora_rank"] == 4  # the form's value reached the engine
        chat = app.query_one(ChatPane)
        # the finished run's adapter became the second column on its own
        await wait_until(pilot, lambda: [t.path for t in chat.targets] == ["base", adapter], what="columns")
        await pilot.press("5", *"Who are you?", "enter")
        await wait_until(pilot, lambda: chat.exchanges and not chat.generating, timeout=90, what="answers")
        columns = list(app.query(ChatColumn))
        assert len(columns) == 2
        assert all(column.turns[0].answer for column in columns)
        assert set(chat.exchanges[0].answers) == {"base", adapter}


async def test_a_prompt_longer_than_the_context_is_refused_at_once_in_the_chat(real_workspace, real_engine):
    """The engine counts the prompt's tokens before it decodes anything: past the model's context
    (512 for the tiny model) the column says so and what to do, instead of "loading model…" for
    minutes."""
    app = TuneBenchApp(real_workspace)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_until(pilot, lambda: app.client.connected and app.snapshot, timeout=20, what="the engine")
        chat = app.query_one(ChatPane)
        prompt = app.query_one("#chat-prompt")
        await pilot.press("5")
        prompt.value = "Who are you? " * 400
        await pilot.press("enter")
        (column,) = app.query(ChatColumn)
        await wait_until(pilot, lambda: not chat.generating, timeout=60, what="the refusal")
        note = column.turns[0].stats
        assert "maximum context length is 512 tokens, but the prompt has" in note
        assert "clear the chat" in note and "ctrl+l" in note
        assert not column.turns[0].answer
        assert prompt.value == ("Who are you? " * 400).strip(), "the question is back, to be shortened"
        scroll = column.query_one(VerticalScroll)
        at_end = lambda: scroll.scroll_offset.y >= scroll.max_scroll_y - 1  # noqa: E731
        await wait_until(pilot, at_end, what="the end shown")
        assert scroll.max_scroll_y > 0, "the question is taller than the column: the refusal is below it"
