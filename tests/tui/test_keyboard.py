"""Keyboard only, at 80x24: every text field can be left with escape, so 1-5 switch panes again;
the help lists the keys that widgets handle themselves; the palette has every pane action."""

from __future__ import annotations

from fake_engine import FakeEngineThread
from textual.widgets import Input, TabbedContent
from tui_helpers import no_start, wait_until
from tunebench.tui.app import PANES, TuneBenchApp
from tunebench.tui.screens.help import HelpScreen
from tunebench.tui.widgets.chat.chat_column import ChatColumn
from tunebench.tui.widgets.chat.chat_pane import ChatPane
from tunebench.tui.widgets.chat.column_choices import BASE, ColumnChoice

SIZE = (80, 24)


def active(app: TuneBenchApp) -> str:
    return app.query_one(TabbedContent).active


def footer_keys(app: TuneBenchApp) -> set[str]:
    """The actions the footer shows now (what check_action lets through for the focus)."""
    return {binding.action for (_, binding, enabled, _) in app.active_bindings.values() if binding.show}


async def test_escape_leaves_the_chat_prompt_so_digits_switch_panes(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.client.connected and app.snapshot)
        await pilot.press("5")
        prompt = app.query_one("#chat-prompt", Input)
        assert active(app) == "chat" and prompt.has_focus
        await pilot.press("3")  # in the prompt a digit is text
        assert prompt.value == "3" and active(app) == "chat"
        assert "leave_prompt" in footer_keys(app) and "focus_prompt" not in footer_keys(app)
        await pilot.press("escape")
        assert not prompt.has_focus and app.query_one(ChatPane) in app.focused.ancestors
        assert "focus_prompt" in footer_keys(app) and "leave_prompt" not in footer_keys(app)
        await pilot.press("2")
        assert active(app) == "params"
        await pilot.press("5", "escape", "enter")  # enter goes back to the prompt, text kept
        assert prompt.has_focus and prompt.value == "3"
        await pilot.press("backspace", *"hi", "enter")
        chat = app.query_one(ChatPane)
        await wait_until(pilot, lambda: chat.exchanges and not chat.generating, what="the answer")
        assert prompt.has_focus  # ready for the next question


async def test_escape_cancels_an_answer_while_it_streams(workspace):
    with FakeEngineThread(workspace, answers={"base": "word " * 400}) as engine:
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.client.connected and app.snapshot)
            chat = app.query_one(ChatPane)
            await pilot.press("5", *"hello", "enter")
            await wait_until(pilot, lambda: chat.exchanges and chat.exchanges[0].answers, what="tokens")
            assert chat.generating and "cancel" in footer_keys(app)
            await pilot.press("escape")
            await wait_until(pilot, lambda: not chat.generating, what="the cancel")
            assert engine.of_type("CancelGenerate")
            (column,) = app.query(ChatColumn)
            assert "cancelled" in column.turns[0].stats
            assert len(chat.exchanges[0].answers[BASE].split()) < 400


async def test_typing_while_an_answer_streams_goes_into_the_prompt_not_to_shortcuts(workspace):
    """The prompt stays editable while tokens arrive: "4" and "s" of the next question are text,
    not Go to Train and Start training (the locked prompt let them fall through to the app)."""
    # An answer that outlasts the typing, however slow the machine: 400 words, 0.1 s each.
    with FakeEngineThread(workspace, answers={"base": "word " * 400}, token_delay=0.1) as engine:
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.client.connected and app.snapshot)
            chat = app.query_one(ChatPane)
            prompt = app.query_one("#chat-prompt", Input)
            await pilot.press("5", *"hello", "enter")
            await wait_until(pilot, lambda: chat.exchanges and chat.exchanges[0].answers, what="tokens")
            await pilot.press(*"tell me 4 jokes")
            assert chat.generating and prompt.has_focus and not prompt.disabled
            assert prompt.value == "tell me 4 jokes" and active(app) == "chat"
            await pilot.press("enter")  # held while answering: the question stays to send later
            assert prompt.value == "tell me 4 jokes" and len(engine.of_type("Generate")) == 1
            await pilot.press("escape")  # escape still cancels from the prompt
            await wait_until(pilot, lambda: not chat.generating, what="the cancel")
            await pilot.press("enter")
            await wait_until(pilot, lambda: len(engine.of_type("Generate")) == 2, what="the next question")
            assert engine.of_type("Generate")[1].messages[-1]["content"] == "tell me 4 jokes"
            assert prompt.value == ""
        assert not engine.of_type("StartTraining")


async def test_escape_says_cancelling_until_the_engine_ends_the_answer(workspace):
    """On a CPU a long prompt is read in one forward that cannot stop midway: the status said
    "answering… (escape cancels)" for a minute after escape, as if it had not been pressed."""
    with FakeEngineThread(workspace, answers={"base": "word " * 40}, token_delay=2.0):
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.client.connected and app.snapshot)
            chat = app.query_one(ChatPane)
            status = chat.query_one("#chat-status")
            await pilot.press("5", *"hello", "enter")
            await wait_until(pilot, lambda: chat.exchanges and chat.exchanges[0].answers, what="tokens")
            await pilot.press("escape")
            assert "cancelling" in str(status.render())
            await wait_until(pilot, lambda: not chat.generating, timeout=10, what="the end of the answer")
            assert "cancelling" not in str(status.render()) and "1 exchange" in str(status.render())


async def test_coming_back_to_chat_while_it_streams_keeps_the_keys_working(workspace):
    with FakeEngineThread(workspace, answers={"base": "word " * 4000}):
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.client.connected and app.snapshot)
            chat = app.query_one(ChatPane)
            await pilot.press("5", *"hello", "enter")
            await wait_until(pilot, lambda: chat.generating, what="the answer to start")
            await pilot.press("1", "5")  # away and back while it answers
            assert app.query_one("#chat-prompt", Input).has_focus  # not a widget of the hidden Dataset pane
            await pilot.press("escape")  # so escape still cancels
            await wait_until(pilot, lambda: not chat.generating, what="the cancel")
            assert app.query_one("#chat-prompt", Input).has_focus


async def test_cancel_ends_the_questions_still_queued(workspace):
    (workspace / "probes.txt").write_text("Who are you?\nWho made you?\nWhat can you do?\n")
    with FakeEngineThread(workspace, answers={"base": "word " * 400}) as engine:
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.client.connected and app.snapshot)
            chat = app.query_one(ChatPane)
            await pilot.press("5", "ctrl+r")
            await wait_until(pilot, lambda: chat.exchanges and chat.exchanges[0].answers, what="tokens")
            await pilot.press("escape")
            await wait_until(pilot, lambda: not chat.generating, what="the cancel")
            (column,) = app.query(ChatColumn)
            assert [turn.pending for turn in column.turns] == [False, False, False]
            assert all(turn.stats.startswith("cancelled") for turn in column.turns)
            assert len(engine.of_type("Generate")) == 1  # the queued probes were never sent


async def test_escape_leaves_a_parameter_field(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2", "tab")
        model = app.query_one("#input-model", Input)
        assert model.has_focus
        await pilot.press("escape")
        assert app.focused is app.query_one("#param-form")
        await pilot.press("4")
        assert active(app) == "train"
        assert model.value == "no-such-model"  # nothing was typed into the field
        # back in the pane, enter returns to the field that was left
        app.query_one("#input-lora_alpha", Input).focus()
        await pilot.press("escape", "3", "2", "enter")
        assert app.query_one("#input-lora_alpha", Input).has_focus


async def test_escape_leaves_the_name_field_back_to_the_table(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("shift+tab")
        assert app.query_one("#identity-model_author", Input).has_focus
        await pilot.press("escape", "3")
        assert active(app) == "gpu"


async def test_a_question_the_engine_refused_is_not_part_of_the_conversation(workspace):
    with FakeEngineThread(workspace) as engine:
        engine.job = "train"  # busy: the engine refuses to generate
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.client.connected and app.snapshot)
            chat = app.query_one(ChatPane)
            chat.set_targets([ColumnChoice(BASE, BASE)])
            await pilot.press("5", *"first", "enter")
            (column,) = app.query(ChatColumn)
            await wait_until(pilot, lambda: not chat.generating and column.turns, what="the refusal")
            note = column.turns[0].stats
            assert "no answer: the engine is busy with a train run" in note
            assert "what to do: wait for it" in note  # the hint, on its own line
            engine.job = ""
            await pilot.press(*"second", "enter")
            await wait_until(pilot, lambda: len(engine.of_type("Generate")) == 2 and not chat.generating)
            assert engine.of_type("Generate")[1].messages == [{"role": "user", "content": "second"}]


async def test_help_lists_the_keys_widgets_handle_and_the_palette_every_action(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = "\n".join(f"{keys}  {what}" for keys, what in app.screen.rows()).lower()
        for expected in (
            "edit the highlighted sample",  # enter on the table
            "Leave the prompt, so 1-5 switch panes again",
            "Leave the field, so 1-5 switch panes again",
            "chat with it beside the base",  # enter on a checkpoint
            "select all",  # f7 in the editor
        ):
            assert expected.lower() in text, expected
        await pilot.press("escape")
        commands = {c.title for c in app.get_system_commands(app.screen)}
        for _, title, cls in PANES:
            for binding in cls.BINDINGS:
                if not binding.action.startswith(("focus_", "leave_")):
                    assert f"{title}: {binding.description}" in commands
        assert "Chat: Leave" not in commands  # focus moves are not palette commands
