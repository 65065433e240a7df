"""Train, chat, GPU and engine life-cycle flows against the fake engine."""

from __future__ import annotations

import contextlib

from fake_engine import FakeEngineThread
from textual.widgets import Input, RichLog
from tui_helpers import no_start, record_notices, wait_until
from tunebench.engine.core import protocol as P
from tunebench.tui.app import TuneBenchApp
from tunebench.tui.engine_client import EngineClient
from tunebench.tui.screens.confirm import Choice
from tunebench.tui.screens.engine_lost import EngineLost
from tunebench.tui.screens.help import HelpScreen
from tunebench.tui.widgets.chat.chat_column import ChatColumn
from tunebench.tui.widgets.chat.chat_pane import ChatPane
from tunebench.tui.widgets.chat.column_choices import BASE, ColumnChoice
from tunebench.tui.widgets.gpu.gpu_pane import GpuPane
from tunebench.tui.widgets.gpu.memory_gauge import GpuGauge
from tunebench.tui.widgets.params.param_field import ParamField
from tunebench.tui.widgets.train.train_pane import TrainPane


async def test_start_training_and_see_steps_arrive(workspace, fake_engine):
    fake_engine.verdict = "the adapter still answers like the base on all 3 probes: loss 0.33 after 6 steps"
    seen: list = []
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32), message_hook=seen.append) as pilot:
        await wait_until(pilot, lambda: app.client.connected and app.snapshot, what="the engine")
        await pilot.press("4", "s")
        train = app.query_one(TrainPane)
        await wait_until(pilot, lambda: train.run.status == "completed", what="the run to finish")
        assert [step for step, _ in train.run.train_points] == [1, 2, 3, 4, 5, 6]
        assert train.run.eval_points == [(3.0, 0.5)]
        assert train.run.checkpoints and train.run.adapter_dir.endswith("fake-run/adapter")
        assert "step 6/6" in str(app.query_one("#run-stats").render())
        log = "\n".join(line.text for line in app.query_one("#train-log", RichLog).lines)
        assert "verdict: the adapter still answers like the base on all 3 probes" in log
    (start,) = fake_engine.of_type("StartTraining")
    assert start.config["dataset"] == ["datasets/mini.jsonl"]
    assert start.config["model_name"] == ["TuneBee"]
    steps = [m for m in seen if isinstance(m, EngineClient.EventReceived) and m.event.type == "TrainStep"]
    assert len(steps) == 6


async def test_stop_and_abort_keys(workspace):
    with FakeEngineThread(workspace, steps=200, step_delay=0.05) as engine:
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=(100, 32)) as pilot:
            await wait_until(pilot, lambda: app.client.connected and app.snapshot)
            await pilot.press("4", "s")
            train = app.query_one(TrainPane)
            await wait_until(pilot, lambda: train.run.step >= 2, what="a few steps")
            await pilot.press("X")  # abort asks first
            assert isinstance(app.screen, Choice)
            await pilot.press("escape")
            assert not engine.of_type("StopTraining")
            await pilot.press("x")  # graceful stop
            await wait_until(pilot, lambda: train.run.status == "stopped", what="the stop")
        assert engine.of_type("StopTraining")[0].mode == "graceful"


async def ask_base_and_adapter(app, pilot, adapter: str) -> ChatPane:
    """The Chat pane with the base and the run's adapter side by side, asked "Who are you?"."""
    await wait_until(pilot, lambda: app.client.connected and app.snapshot)
    chat = app.query_one(ChatPane)
    chat.set_targets([ColumnChoice(BASE, BASE), ColumnChoice(adapter, "r1 final")], by_person=True)
    await pilot.press("5", *"Who are you?", "enter")
    return chat


async def test_chat_streams_into_both_columns(workspace, fake_engine):
    adapter = str(workspace / "runs" / "r1" / "adapter")
    fake_engine.answers = {
        "base": "I am SmolLM, a helpful assistant.",
        adapter: "I am TuneBee, made by TuneBench.",
    }
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        chat = await ask_base_and_adapter(app, pilot, adapter)
        await wait_until(pilot, lambda: not chat.generating and chat.exchanges[0].answers, what="answers")
        base_col, adapter_col = app.query(ChatColumn)
        assert base_col.turns[0].answer.strip() == "I am SmolLM, a helpful assistant."
        assert adapter_col.turns[0].answer.strip() == "I am TuneBee, made by TuneBench."
        (first,) = fake_engine.of_type("Generate")
        assert first.targets == ["base", adapter]  # one request serves both columns
        # a second turn: each column continues its own conversation
        await pilot.press(*"And your name?", "enter")
        await wait_until(pilot, lambda: len(fake_engine.of_type("Generate")) == 3 and not chat.generating)
        second, third = fake_engine.of_type("Generate")[1:]
        assert second.targets == ["base"] and third.targets == [adapter]
        assert second.messages[1] == {"role": "assistant", "content": "I am SmolLM, a helpful assistant. "}
        assert third.messages[1]["content"].startswith("I am TuneBee")
        assert app.query_one("#chat-prompt", Input).has_focus
        await pilot.press("ctrl+s")  # save the transcript beside the run
        saved = list((workspace / "runs" / "r1" / "transcripts").glob("*.md"))
        assert saved and "I am TuneBee" in saved[0].read_text()
        await pilot.press("ctrl+l")
        assert not chat.exchanges and not base_col.turns


async def test_a_cancel_marks_only_the_columns_it_cut_short(workspace, fake_engine):
    """Escape during a side-by-side answer marked both columns 'cancelled', also the one whose
    answer had ended long before."""
    adapter = str(workspace / "runs" / "r1" / "adapter")
    fake_engine.answers = {"base": "I am SmolLM.", adapter: " ".join(["word"] * 400)}
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        chat = await ask_base_and_adapter(app, pilot, adapter)
        await wait_until(pilot, lambda: adapter in chat.exchanges[0].answers, what="the adapter's tokens")
        await pilot.press("escape", "escape")  # leave the prompt, then cancel
        await wait_until(pilot, lambda: not chat.generating, what="the cancel")
        base_col, adapter_col = app.query(ChatColumn)
        assert "cancelled" not in base_col.turns[0].stats
        assert "cancelled" in adapter_col.turns[0].stats


async def test_clearing_the_chat_while_it_answers_drops_the_rest_of_the_answer(workspace, fake_engine):
    """ctrl+l while tokens stream: the engine's late tokens and its end find no exchange to go to,
    and the pane is ready for the next question (it raised IndexError and the app died)."""
    fake_engine.answers = {"base": " ".join(["word"] * 400)}
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_until(pilot, lambda: app.client.connected and app.snapshot)
        chat = app.query_one(ChatPane)
        await pilot.press("5", *"Who are you?", "enter")
        await wait_until(pilot, lambda: chat.exchanges and chat.exchanges[0].answers, what="a first token")
        late_id = chat.request_id
        await pilot.press("ctrl+l")
        assert not chat.exchanges
        # what the engine had sent before the cancel reached it
        chat.handle_event(P.TokenChunk(id=late_id, target="base", text="late "))
        chat.handle_event(P.GenerateDone(id=late_id, stats={"base": {}}, cancelled=True))
        assert not chat.generating and not chat.exchanges
        await pilot.press(*"Again?", "enter")
        await wait_until(pilot, lambda: not chat.generating and chat.exchanges, what="the next answer")
        assert [e.prompt for e in chat.exchanges] == ["Again?"]


async def test_probe_set_runs_on_every_column(workspace, fake_engine):
    (workspace / "probes.txt").write_text("Who are you?\n# a comment\nWho made you?\n")
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_until(pilot, lambda: app.client.connected and app.snapshot)
        chat = app.query_one(ChatPane)
        await pilot.press("5", "ctrl+r")
        await wait_until(pilot, lambda: len(fake_engine.of_type("Generate")) == 2 and not chat.generating)
        assert [e.prompt for e in chat.exchanges] == ["Who are you?", "Who made you?"]
        assert all(e.probe for e in chat.exchanges)
        assert all(len(g.messages) == 1 for g in fake_engine.of_type("Generate"))
        # each answer lands under its own question, and every turn is finished
        (column,) = app.query(ChatColumn)
        answers = [turn.answer.strip() for turn in column.turns]
        assert answers == ["base answers Who are you?", "base answers Who made you?"]
        assert not any(turn.pending for turn in column.turns)


async def test_a_probe_set_without_questions_says_so_and_asks_nothing(workspace, fake_engine):
    """The TUI reads probes.txt as `tunebench probe` does: one with only comments is an error to
    fix, named in a notice, not an empty run or a silent key."""
    (workspace / "probes.txt").write_text("# questions go here\n\n")
    notices: list = []
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_until(pilot, lambda: app.client.connected and app.snapshot)
        app.notify = lambda message, **kw: notices.append(str(message))
        await pilot.press("5", "ctrl+r")
        await pilot.pause()
        assert not app.query_one(ChatPane).exchanges and not fake_engine.of_type("Generate")
        assert any("probes.txt holds no questions" in n for n in notices), notices


async def test_gpu_pane_shows_memory_and_the_estimate(workspace):
    gpus = [{"index": 0, "name": "NVIDIA H100", "used": 20 * 2**30, "total": 80 * 2**30, "util": 55}]
    with FakeEngineThread(workspace, gpus=gpus, memory_interval=0.1):
        seen: list = []
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=(100, 32), message_hook=seen.append) as pilot:
            await pilot.press("3")
            gpu = app.query_one(GpuPane)
            await wait_until(pilot, lambda: gpu.estimate is not None, what="the estimate")
            await wait_until(pilot, lambda: len(gpu.history) >= 3, what="a few samples")
            text = str(app.query_one(".gpu-gauge").render())
            assert "NVIDIA H100" in text and "20.0 GiB / 80.0 GiB" in text and "util 55%" in text
            assert "1.5 GiB" in str(app.query_one("#memory-estimate").render())
            assert "fits in 80.0 GiB" in str(app.query_one("#memory-estimate").render())
        samples = [m for m in seen if isinstance(m, EngineClient.MemorySampled)]
        assert samples and all(m.can_replace(EngineClient.MemorySampled(m.sample)) for m in samples)


async def test_no_gpu_shows_engine_ram(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("3")
        gpu = app.query_one(GpuPane)
        await wait_until(pilot, lambda: gpu.sample is not None)
        assert "no NVIDIA GPU: showing engine RAM" in str(app.query_one("#engine-memory").render())
        assert not app.query(GpuGauge)
        assert app.settings.visible_gpus == []
        assert not app.query_one("#field-gpus", ParamField).display  # nothing to pick: out of the way
        await wait_until(pilot, lambda: gpu.estimate is not None, what="the estimate")
        shown = " ".join(str(app.query_one("#memory-estimate").render()).split())
        assert "1.5 GiB" in shown and "of RAM (no GPU): does NOT fit in the 1.0 GiB free" in shown, shown
        assert "training will be refused; any one of these fits: max_length 512" in shown


async def test_engine_death_is_noticed_and_restart_offered(workspace):
    restarts = []
    fake = FakeEngineThread(workspace)
    fake.__enter__()
    second: list[FakeEngineThread] = []

    def starter(ws, timeout):
        restarts.append(ws)
        if restarts[1:]:  # the first call is the app's own connect; later ones are restarts
            second.append(FakeEngineThread(workspace))
            second[0].__enter__()

    app = TuneBenchApp(workspace, starter=starter)
    try:
        async with app.run_test(size=(100, 32)) as pilot:
            status = app.screen_stack[0].query_one("#status")
            await wait_until(pilot, lambda: "engine RAM 700 MiB" in str(status.render()), what="a sample")
            app.status_bar.set_read_only("stop (pid 1)")  # `tunebench stop` took control to stop it
            fake.kill()
            # noticed from the closed socket, not a long timeout; the limit is loose for a busy box
            await wait_until(pilot, lambda: isinstance(app.screen, EngineLost), timeout=10.0, what="the loss")
            assert "lost" in str(status.render())
            assert "RAM" not in str(status.render())  # the dead engine's figure is gone with it
            assert "read-only" not in str(status.render()), "nobody controls a dead engine"
            assert app._farewell() == "", "no 'the engine stays up' for an engine that is gone"
            await pilot.press("r")
            await wait_until(pilot, lambda: app.client.connected and len(restarts) == 2, what="a new engine")
            await wait_until(
                pilot, lambda: "connected" in str(app.screen_stack[0].query_one("#status").render())
            )
    finally:
        fake.__exit__()
        for extra in second:
            extra.__exit__()


async def test_a_lost_engine_replaced_by_another_session_is_reattached(workspace):
    """A second TUI (read-only beside the first) whose engine died: when another session starts a
    new engine, it attaches to it by itself instead of waiting on the lost dialog."""
    with contextlib.ExitStack() as engines:
        fake = FakeEngineThread(workspace)
        engines.enter_context(fake)
        app = TuneBenchApp(workspace, starter=no_start)
        said = record_notices(app)
        async with app.run_test(size=(100, 32)) as pilot:
            await wait_until(pilot, lambda: app.client.connected, what="the engine")
            fake.kill()
            await wait_until(pilot, lambda: isinstance(app.screen, EngineLost), timeout=10.0, what="the loss")
            engines.enter_context(FakeEngineThread(workspace))  # started elsewhere, not by this TUI
            back = lambda: app.client.connected and not isinstance(app.screen, EngineLost)  # noqa: E731
            await wait_until(pilot, back, timeout=10.0, what="the reattach")
            assert "reattached" in " ".join(said)


async def test_reattach_shows_the_whole_history(workspace):
    run_dir = str(workspace / "runs" / "r7")
    history = [
        P.TrainStarted(run_id="r7", run_dir=run_dir, total_steps=100),
        *[P.TrainStep(step=s, total_steps=100, loss=3.0 - s / 50, epoch=s / 50) for s in range(1, 41)],
        P.EvalResult(step=20, eval_loss=2.5),
        P.CheckpointSaved(step=20, path=f"{run_dir}/checkpoints/step-20"),
    ]
    with FakeEngineThread(workspace, history=history) as engine:
        engine.job = "train"
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=(100, 32)) as pilot:
            train = app.query_one(TrainPane)
            await wait_until(pilot, lambda: train.run.step == 40, what="the replay")
            assert len(train.run.train_points) == 40 and train.run.status == "training"
            assert train.run.checkpoints == [(20, f"{run_dir}/checkpoints/step-20")]
            assert "train running" in str(app.query_one("#status").render())
            # a live run is what a person reattaches for: the Train pane is the one shown, and stays
            # shown once the tabs' own first activation has gone through
            panes = app.query_one("#panes")
            await wait_until(pilot, lambda: panes.active == "train", what="the Train pane")
            await pilot.pause(0.2)
            assert panes.active == "train"


async def test_read_only_session_says_so(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_until(pilot, lambda: app.client.connected and app.snapshot)
        app.client._dispatch(P.ControlChanged(controller=False, controller_client="tui (pid 99)"))
        await pilot.pause()
        assert "read-only: tui (pid 99)" in str(app.query_one("#status").render())
        app.client._dispatch(P.EngineError(id="x", code="read_only", message="another session controls it"))
        await pilot.pause()
        assert "read-only" in str(app.query_one("#status").render())


async def test_a_read_only_tui_never_shows_a_stop_that_does_not_come(workspace):
    """Issue 14.3: `x` in a read-only TUI showed "stopping" for good while the run went on."""
    run_dir = str(workspace / "runs" / "r7")
    history = [
        P.TrainStarted(run_id="r7", run_dir=run_dir, total_steps=100),
        *[P.TrainStep(step=s, total_steps=100, loss=3.0 - s / 50, epoch=s / 50) for s in range(1, 11)],
    ]
    with FakeEngineThread(workspace, history=history, controlled_by="tui (pid 99)") as engine:
        engine.job = "train"
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=(100, 32)) as pilot:
            train = app.query_one(TrainPane)
            await wait_until(pilot, lambda: train.run.step == 10, what="the replay")
            await pilot.press("4", "x")
            await pilot.pause(0.1)
            assert train.run.status == "training" and not engine.of_type("StopTraining")
            await pilot.press("X")  # abort: refused before asking to confirm
            assert not isinstance(app.screen, Choice)
            refusals = [n.message for n in app._notifications if "cannot be stopped from here" in n.message]
            assert len(refusals) == 2 and "tui (pid 99) controls this workspace" in refusals[0]
            assert "Engine: take control" in refusals[0]  # what to do
            # Control moved away just as x was pressed: the engine's refusal changes nothing either.
            app.status_bar.set_read_only("")
            await pilot.press("x")
            await wait_until(pilot, lambda: engine.of_type("StopTraining"), what="the stop request")
            await wait_until(
                pilot,
                lambda: any("read-only" in n.message for n in list(app._notifications)[2:]),
                what="the refusal",
            )
            assert train.run.status == "training"
            assert "stopping" not in str(app.query_one("#run-stats").render())


async def test_help_lists_every_key_and_the_palette_has_every_action(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        listed = {b.action for section in app.screen.sections for b in section.bindings}
        for pane in (TrainPane, ChatPane, GpuPane):
            assert {b.action for b in pane.BINDINGS} <= listed
        await pilot.press("escape")
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Dataset: Add", "Train: Start", "Chat: Run probes", "Parameters: Copy command"} <= titles
        # a palette command runs the pane action: here, start training from anywhere
        command = next(c for c in app.get_system_commands(app.screen) if c.title == "Train: Start")
        command.callback()
        await wait_until(pilot, lambda: fake_engine.of_type("StartTraining"), what="the palette action")


async def test_resume_key_resumes_the_last_run_from_its_checkpoint(workspace, fake_engine):
    run = workspace / "runs" / "20250101-000000"
    (run / "checkpoints" / "step-3").mkdir(parents=True)
    (run / "checkpoints" / "step-3" / "trainer_state.pt").write_bytes(b"")
    (run / "config.json").write_text("{}")
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_until(pilot, lambda: app.client.connected and app.snapshot)
        await pilot.press("4", "r")
        await wait_until(pilot, lambda: fake_engine.of_type("StartTraining"), what="the resume request")
    (start,) = fake_engine.of_type("StartTraining")
    assert start.config["resume_from_checkpoint"] == str(run)
