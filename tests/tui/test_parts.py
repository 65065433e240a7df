"""The TUI's parts without a running app: stores, checks, the chart, the light tokenizer."""

from __future__ import annotations

import math

import orjson
import pytest
from tunebench.engine.core import encoding
from tunebench.engine.core.workspace import Workspace
from tunebench.tui.engine_client import decode_events
from tunebench.tui.widgets.dataset.dataset_store import ConflictError, DatasetStore, Row, UnsavableError
from tunebench.tui.widgets.dataset.light_tokenizer import LightTokenizer, load_for_model
from tunebench.tui.widgets.dataset.row_checks import CheckSettings, RowChecker
from tunebench.tui.widgets.params.settings_store import TrainSettings
from tunebench.tui.widgets.train.loss_chart import BrailleCanvas
from tunebench.tui.widgets.train.run_state import RunState


def test_dataset_store_edits_undo_and_keeps_the_format(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"conversations": []}\n')
    store = DatasetStore(path)
    store.load()
    assert [row.line for row in store.rows] == [1, 3]
    store.replace(0, Row.from_record({"instruction": "a2", "output": "b"}))
    store.delete(1)
    assert store.undo() == ("delete", 1) and len(store.rows) == 2
    store.save()
    assert path.read_text().splitlines()[0] == '{"instruction":"a2","output":"b"}'
    assert (tmp_path / "d.jsonl.bak").read_text().startswith('{"instruction": "a"')


def test_dataset_store_refuses_to_drop_bad_lines_or_overwrite_others(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{broken\n\xff\xfe\n')
    store = DatasetStore(path)
    store.load()
    assert [row.valid_json for row in store.rows] == [True, False, False]
    with pytest.raises(UnsavableError, match="2, 3"):
        store.save()
    store.delete(2)
    store.delete(1)
    path.write_text('{"instruction": "theirs", "output": "x"}\n')
    with pytest.raises(ConflictError):
        store.save()
    store.save(force=True)
    assert orjson.loads(path.read_bytes()) == {"instruction": "a", "output": "b"}


def test_a_json_list_is_saved_as_jsonl_beside_it(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "a", "output": "b"}]')
    store = DatasetStore(path)
    store.load()
    assert store.save() == tmp_path / "d.jsonl"
    assert path.read_text() == '[{"instruction": "a", "output": "b"}]'


def test_row_checks_flag_placeholders_duplicates_and_length(tiny_model_dir):
    tokenizer = LightTokenizer.from_dir(tiny_model_dir)
    rows = [
        Row.from_record({"instruction": "Who are you?", "output": "I am {{NAME}}."}),
        Row.from_record({"instruction": "Who are you?", "output": "I am {{NAME}}."}),
        Row.from_record({"instruction": "x " * 80, "output": "y"}),
        Row.from_text("{nope"),
    ]
    checker = RowChecker(tokenizer, CheckSettings(64, (), (), "", ""))
    reports = [checker.check_all(rows)[row.key] for row in rows]
    assert any("{{NAME}}" in p for p in reports[0].problems)
    assert any("duplicate" in p for p in reports[1].problems)
    assert any("max_length 64" in p for p in reports[2].problems)
    assert "not valid JSON" in reports[3].problems[0]
    assert checker.reconfigure(tokenizer, CheckSettings(64, ("Bee",), (), "", ""))
    assert checker.check(rows[0]).problems == []


def test_light_tokenizer_counts_what_training_counts(tiny_model_dir, tiny_tokenizer):
    """The TUI's torch-free tokenizer gives the same ids and labels as the real one."""
    light = load_for_model(str(tiny_model_dir), tiny_model_dir.parent)
    messages = [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am swift-robot, an AI assistant."},
    ]
    assert encoding.encode_messages(messages, light) == encoding.encode_messages(messages, tiny_tokenizer)


def test_settings_store_keeps_what_it_cannot_parse(tmp_path):
    ws = Workspace(tmp_path).ensure()
    ws.settings_file.write_text("[train]\nlora_rank = 16\n[other]\nkeep = 1\n")
    settings = TrainSettings(ws)
    assert settings.load()
    assert settings.config.lora_rank == 16
    settings.set("lora_rank", "0")  # invalid: the saved value stays
    settings.set("learning_rate", "3e-4")
    settings.save()
    saved = ws.read_settings()
    assert saved["train"] == {"lora_rank": 16, "learning_rate": 3e-4}
    assert saved["other"] == {"keep": 1}
    ws.settings_file.write_text("[train\nbroken")
    broken = TrainSettings(ws)
    broken.load()
    assert "tunebench.toml" in broken.load_problem
    broken.save()
    assert (tmp_path / "tunebench.toml.broken").read_text() == "[train\nbroken"


def test_run_state_folds_a_resumed_run_and_nan_loss():
    run = RunState()
    events = decode_events(
        [
            b'{"type": "TrainStarted", "run_id": "r", "total_steps": 4}',
            b'{"type": "TrainStep", "step": 1, "total_steps": 4, "loss": null}',
            b'{"type": "TrainStep", "step": 2, "total_steps": 4, "loss": 1.5}',
            b'{"type": "TrainStep", "step": 2, "total_steps": 4, "loss": 1.4}',  # re-logged after resume
            b'{"type": "TrainStep", "step": 3, "tot',  # cut short by a kill mid-write
        ]
    )
    for event in events:
        run.apply(event)
    assert run.status == "training" and run.step == 2
    assert math.isnan(run.train_points[0][1]) and run.train_points[1:] == [(2.0, 1.4)]


def test_braille_canvas_draws_lines():
    canvas = BrailleCanvas(2, 1)
    canvas.line(0, 0, 3, 3, "cyan")
    assert "".join(t.plain for t in canvas.rows()) == "⡠⠊"


def test_the_preview_marks_only_the_answers_and_fills_the_identity():
    from tunebench.tui.widgets.dataset.sample_preview import TRAINED, render_sample

    record = {
        "messages": [
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am {{NAME}}."},
            {"role": "user", "content": "Who made you?"},
            {"role": "assistant", "content": "{{AUTHOR}} did."},
        ]
    }
    settings = CheckSettings(64, ("TuneBee",), ("Ada",), "Be brief.", "")
    text = render_sample(Row.from_record(record), LightTokenizer(None), settings)
    trained = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == TRAINED)
    assert "I am TuneBee." in trained and "Ada did." in trained  # the identity is filled in
    assert "Who are you?" not in trained and "Be brief." not in trained  # prompts are not trained
    assert "Be brief." in text.plain  # the form's system prompt is part of the rendering
    last_round = CheckSettings(64, ("TuneBee",), ("Ada",), "Be brief.", "", "", "last_round")
    text = render_sample(Row.from_record(record), LightTokenizer(None), last_round)
    trained = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == TRAINED)
    assert "I am TuneBee." not in trained and "Ada did." in trained  # --loss_scale last_round
    record["messages"][1]["loss"] = False  # ms-swift's mark: context, not trained
    text = render_sample(Row.from_record(record), LightTokenizer(None), settings)
    trained = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == TRAINED)
    assert "I am TuneBee." in text.plain and "I am TuneBee." not in trained and "Ada did." in trained
    # with no name set, the placeholder is left and marked
    unnamed = CheckSettings(64, (), ("Ada",), "", "")
    text = render_sample(Row.from_record(record), LightTokenizer(None), unnamed)
    assert "{{NAME}}" in text.plain
    assert any(text.plain[s.start : s.end] == "{{NAME}}" and "yellow" in str(s.style) for s in text.spans)


def test_the_preview_shows_the_tools_and_marks_the_calls():
    """A glaive record: the tools in the prompt, the call and the answer trained, the result not."""
    from tunebench.tui.widgets.dataset.sample_preview import TRAINED, render_sample

    record = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"sky": "clear"}'},
            {"from": "gpt", "value": "Clear skies."},
        ],
        "tools": '[{"name": "get_weather", "parameters": {"type": "object"}}]',
    }
    settings = CheckSettings(64, (), (), "", "qwen")
    text = render_sample(Row.from_record(record), LightTokenizer(None), settings)
    trained = [text.plain[s.start : s.end] for s in text.spans if s.style == TRAINED]
    assert "<tools>" in text.plain and '"name": "get_weather", "parameters"' in text.plain
    assert trained == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "Clear skies.<|im_end|>",
    ]


def test_a_row_that_cannot_be_parsed_shows_its_json_not_a_python_repr():
    """Issue 16 item 11: rows of an unknown shape showed `{'prompt': 'hi', 'ok': True}`."""
    from tunebench.tui.widgets.dataset.dataset_file import Row
    from tunebench.tui.widgets.dataset.row_checks import row_summary

    row = Row.from_text('{"prompt": "你好", "ok": true, "n": null}')
    first, last = row_summary(row)
    assert first == '{"prompt": "你好", "ok": true, "n": null}' and last == ""


async def test_checkpoints_removed_from_disk_are_not_offered_to_chat(tmp_path):
    """save_total_limit deletes older checkpoints; the list kept offering them, and choosing one
    opened a Chat column that failed with 'adapter not found' on both sides."""
    from textual.app import App, ComposeResult
    from tunebench.tui.widgets.train.checkpoint_list import CheckpointList

    kept, removed_later = tmp_path / "step-16", tmp_path / "step-24"
    kept.mkdir(), removed_later.mkdir()
    run = RunState()
    run.checkpoints = [(8, str(tmp_path / "step-8")), (16, str(kept)), (24, str(removed_later))]
    chosen = []

    class Host(App):
        def compose(self) -> ComposeResult:
            yield CheckpointList()

        def on_checkpoint_list_chosen(self, event: CheckpointList.Chosen) -> None:
            chosen.append(event.path)

    async with Host().run_test() as pilot:
        listed = pilot.app.query_one(CheckpointList)
        listed.show(run)
        assert [str(listed.get_option_at_index(i).prompt) for i in range(listed.option_count)] == [
            "step 16",
            "step 24",
        ]
        removed_later.rmdir()
        listed.focus()
        listed.highlighted = 1
        await pilot.press("enter")
        await pilot.pause()
        assert chosen == [] and listed.option_count == 1
        listed.highlighted = 0
        await pilot.press("enter")
        await pilot.pause()
        assert chosen == [str(kept)]


@pytest.mark.parametrize("width", [80, 120])
async def test_the_train_log_wraps_at_its_width_whenever_its_lines_were_written(width):
    """Lines written while the Train pane was hidden wrapped at 78 columns at any terminal width,
    and at 80 columns a full line ran under the scrollbar."""
    from textual.app import App, ComposeResult
    from textual.widgets import Label, TabbedContent, TabPane
    from tunebench.tui.widgets.train.train_log import TrainLog

    line = "verdict: the adapter answers differently from the base on 3 of 3 probes " * 4

    class Host(App):
        def compose(self) -> ComposeResult:
            with TabbedContent():
                with TabPane("other", id="other"):
                    yield Label("another pane")
                with TabPane("train", id="train"):
                    yield TrainLog(wrap=True, max_lines=50)

    async with Host().run_test(size=(width, 30)) as pilot:
        log = pilot.app.query_one(TrainLog)
        log.write(line)  # while its pane is hidden
        await pilot.pause()
        pilot.app.query_one(TabbedContent).active = "train"
        await pilot.pause()
        log.write(line)  # and while shown
        await pilot.pause()
        room = log.scrollable_content_region.width
        rendered = [strip.text.rstrip() for strip in log.lines]
        assert room >= width - 4
        assert max(len(text) for text in rendered) <= room
        assert max(len(text) for text in rendered) > min(room, len(line)) - 20  # not wrapped short
        assert "".join(rendered).replace(" ", "") == (line + line).replace(" ", "")


async def test_a_chat_column_keeps_its_end_in_view_unless_the_reader_scrolled_up():
    """A question taller than the column, refused at once, left the column above its end: the
    scroll to the end ran before the layout knew the question's height (a CI failure). The end
    stays in view through every layout, and someone who scrolled up to read is not pulled down."""
    from textual.app import App, ComposeResult
    from textual.containers import VerticalScroll
    from tunebench.tui.widgets.chat.chat_column import ChatColumn

    class Host(App):
        def compose(self) -> ComposeResult:
            yield ChatColumn("base", "base")

    async with Host().run_test(size=(60, 16)) as pilot:
        column = pilot.app.query_one(ChatColumn)
        scroll = column.query_one(VerticalScroll)

        def at_end() -> bool:
            return scroll.max_scroll_y > 0 and scroll.scroll_offset.y >= scroll.max_scroll_y - 1

        column.add_turn("Who are you? " * 200)
        column.finish(0, note="the maximum context length is 512 tokens")  # before any layout
        await pilot.pause()
        assert at_end()
        column.add_turn("and now?")
        await pilot.pause()
        for _ in range(30):
            column.append(1, "word " * 10)
        await pilot.pause()
        assert at_end()
        scroll.scroll_home(animate=False)  # the reader goes up to read the first answer
        await pilot.pause()
        column.append(1, "more " * 40)
        column.finish(1, stats="12.0 tok/s")
        await pilot.pause()
        assert scroll.scroll_offset.y == 0
        column.add_turn("one more")  # a new question is followed, from wherever the reader was
        column.append(2, "answer " * 60)
        await pilot.pause()
        assert at_end()
