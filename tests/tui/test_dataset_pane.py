"""The Dataset pane, driven by keys: edit and save, delete and undo, search, conflicts on disk."""

from __future__ import annotations

import orjson
from textual.widgets import TabbedContent, TextArea
from tui_helpers import MINI_RECORDS, no_start, wait_until
from tunebench.tui.app import TuneBenchApp
from tunebench.tui.screens.confirm import Choice
from tunebench.tui.screens.sample_editor import SampleEditor
from tunebench.tui.widgets.dataset import dataset_pane
from tunebench.tui.widgets.dataset.dataset_pane import DatasetPane
from tunebench.tui.widgets.dataset.sample_table import SampleTable


def records(path):
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


async def test_edit_a_sample_and_save(workspace, fake_engine, monkeypatch):
    monkeypatch.setattr(dataset_pane, "AUTOSAVE_DELAY_S", 60)  # this test saves by key
    path = workspace / "datasets" / "mini.jsonl"
    before = path.read_bytes()
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports, what="row checks")
        await pilot.press("down")  # the alpaca sample
        await pilot.press("e")
        assert isinstance(app.screen, SampleEditor)
        assert app.screen.showing_fields  # a single-turn sample opens as text fields
        await pilot.press("f8")  # the JSON view
        editor = app.screen.query_one("#editor-text", TextArea)
        assert editor.has_focus
        await pilot.press("f7")  # select all
        await pilot.press(*'{"instruction":"2+3?","output":"5"}')
        assert "no problems" in str(app.screen.query_one("#editor-problems").render())
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: pane.store.dirty, what="the edit to apply")
        assert not isinstance(app.screen, SampleEditor)
        assert "unsaved" in str(app.query_one("#dataset-title").render())
        assert "●" in str(app.query_one(TabbedContent).get_tab("dataset").label)
        assert editor.text  # the editor had the text typed into it
        await pilot.press("ctrl+s")
        assert not pane.store.dirty
        assert "●" not in str(app.query_one(TabbedContent).get_tab("dataset").label)
    saved = records(path)
    assert saved[1] == {"instruction": "2+3?", "output": "5"}
    assert saved[0] == MINI_RECORDS[0] and len(saved) == len(MINI_RECORDS)  # the rest untouched
    assert (path.parent / "mini.jsonl.bak").read_bytes() == before  # the previous version is kept


async def test_edit_the_answer_as_a_text_field(workspace, fake_engine, monkeypatch):
    monkeypatch.setattr(dataset_pane, "AUTOSAVE_DELAY_S", 60)
    path = workspace / "datasets" / "mini.jsonl"
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports, what="row checks")
        await pilot.press("e")  # the messages sample
        editor = app.screen
        assert isinstance(editor, SampleEditor) and editor.showing_fields
        answer = editor.query_one("#field-assistant", TextArea)
        assert answer.has_focus and answer.text == "I am {{NAME}}."
        await pilot.press("f7", *"I am {{NAME}}, made by {{AUTHOR}}.")
        await pilot.press("shift+tab")  # back to the question
        assert editor.query_one("#field-user", TextArea).has_focus
        await pilot.press("escape")  # unapplied changes: the first escape only warns
        assert app.screen is editor
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: pane.store.dirty, what="the edit to apply")
        await pilot.press("ctrl+s")
    saved = records(path)
    assert saved[0] == {
        "messages": [
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am {{NAME}}, made by {{AUTHOR}}."},
        ]
    }
    assert saved[1:] == MINI_RECORDS[1:]


async def test_delete_undo_duplicate_and_search(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        table = app.query_one(SampleTable)
        await wait_until(pilot, lambda: pane.reports)
        await pilot.press("d")
        assert len(pane.store.rows) == len(MINI_RECORDS) - 1
        await pilot.press("u")
        assert [r.record for r in pane.store.rows] == MINI_RECORDS
        await pilot.press("c")
        assert len(pane.store.rows) == len(MINI_RECORDS) + 1
        assert pane.store.rows[1].record == MINI_RECORDS[0]
        await pilot.press("slash", *"colour")
        assert table.row_count == 2
        await pilot.press("escape")
        assert table.row_count == len(MINI_RECORDS) + 1
        # autosave writes the duplicate shortly after the last edit
        await wait_until(pilot, lambda: not pane.store.dirty, what="autosave")
    assert len(records(workspace / "datasets" / "mini.jsonl")) == len(MINI_RECORDS) + 1


async def test_rows_are_checked(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports)
        reports = [pane.reports[row.key] for row in pane.store.rows]
        assert reports[0].problems == []  # {{NAME}} is filled from the name field
        assert any("duplicate" in p for p in reports[2].problems)
        assert reports[5].problems  # empty instruction and output
        # clear the name: the placeholder is flagged as unfilled
        await pilot.click("#identity-model_name")
        await pilot.press("home", "ctrl+k")
        await wait_until(pilot, lambda: pane.reports[pane.store.rows[0].key].problems, what="recheck")
        assert "NAME" in pane.reports[pane.store.rows[0].key].problems[0]
        assert app.settings.config.model_name == []


async def test_file_changed_on_disk_is_not_overwritten(workspace, fake_engine):
    path = workspace / "datasets" / "mini.jsonl"
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports)
        await pilot.press("d")  # an unsaved edit here...
        theirs = b'{"instruction": "theirs", "output": "x"}\n'
        path.write_bytes(theirs)  # ...while something else rewrites the file
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, Choice), what="the conflict question")
        assert path.read_bytes() == theirs
        await pilot.press("r")  # reload theirs
        assert [r.record for r in pane.store.rows] == [{"instruction": "theirs", "output": "x"}]
        assert not pane.store.dirty


async def test_invalid_json_is_kept_until_fixed(workspace, fake_engine):
    path = workspace / "datasets" / "mini.jsonl"
    path.write_bytes(path.read_bytes() + b'{"instruction": "broken\n')
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports)
        assert not pane.store.rows[-1].valid_json
        await pilot.press("c")  # any edit; the save must refuse rather than drop the broken line
        assert not pane.save(quiet=True)
        assert path.read_bytes().endswith(b'"broken\n')


async def test_the_table_uses_the_width_it_is_given(workspace, fake_engine):
    path = workspace / "datasets" / "mini.jsonl"
    long_answer = "a long answer " * 12
    path.write_bytes(path.read_bytes() + orjson.dumps({"instruction": "Say a lot", "output": long_answer}))
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.query_one(DatasetPane)
        table = app.query_one(SampleTable)
        await wait_until(pilot, lambda: pane.reports, what="row checks")
        key = pane.store.rows[-1].key
        narrow = table.get_cell(key, "answer")
        assert narrow.endswith("…") and len(narrow) <= 30
        await pilot.resize_terminal(120, 40)
        await wait_until(pilot, lambda: len(table.get_cell(key, "answer")) > 40, what="the wider cut")
        assert table.get_cell(key, "answer").startswith(narrow[:-1])


async def test_open_dialog_opens_a_typed_absolute_path(workspace, fake_engine, tmp_path):
    """Issue 16 item 11: the Open dialog starts on the list of datasets/; a path typed there (with
    no Tab first) must open that path on Enter, not the highlighted list entry."""
    from tunebench.tui.screens.dataset_picker import DatasetPicker

    elsewhere = tmp_path / "elsewhere" / "real.jsonl"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b'{"instruction": "hi", "output": "hello"}\n')
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports, what="row checks")
        await pilot.press("o")
        assert isinstance(app.screen, DatasetPicker)
        await pilot.press(*str(elsewhere), "enter")
        await wait_until(pilot, lambda: pane.store.path == elsewhere, what="the typed path to open")


async def test_a_modal_swallows_the_pane_switch_keys(workspace, fake_engine):
    """Issue 16 item 11: F6 (or a digit on a list) inside the sample editor switched the pane
    behind it; a dialog keeps the pane it was opened over."""
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports, what="row checks")
        await pilot.press("e")
        assert isinstance(app.screen, SampleEditor)
        await pilot.press("f6", "f4")
        assert app.query_one(TabbedContent).active == "dataset"
        assert isinstance(app.screen, SampleEditor)
        await pilot.press("escape")
        assert not isinstance(app.screen, SampleEditor)
        await pilot.press("f4")  # and they work again once it is closed
        assert app.query_one(TabbedContent).active == "gpu"


async def test_an_unsaved_mark_arriving_as_the_app_closes_is_ignored(workspace, fake_engine):
    # An edit just before quitting: its "unsaved" message can reach the app after its screens
    # are gone (a traceback at exit, seen under load).
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports, what="row checks")
    assert not app.screen_stack
    app._dirty(DatasetPane.DirtyChanged(pane, True))


async def test_the_name_and_author_read_whole_at_80_columns(workspace, fake_engine):
    """Issue 16.11: at 80 columns the identity fields are not cut. Side by side while both values
    fit, each as wide as its value; a line each once they do not; a field left reads from its start."""
    from textual.widgets import Input
    from tunebench.tui.widgets.dataset.identity_bar import IdentityBar

    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(80, 24)) as pilot:
        bar = app.query_one(IdentityBar)
        name = app.query_one("#identity-model_name", Input)
        author = app.query_one("#identity-model_author", Input)
        await wait_until(pilot, lambda: author.size.width and app.dataset_pane.reports, what="the pane")

        def whole(field: Input) -> bool:
            return field.content_width <= field.content_size.width and field.scroll_offset.x == 0

        tail = " 'with the help of a long list of other people'"
        await pilot.press("shift+tab", "end", *tail[:10])  # still fits: nothing moves while typing
        assert not bar.has_class("-stacked") and bar.size.height == 1
        assert whole(name) and author.content_width <= author.content_size.width
        await pilot.press(*tail[10:])  # outgrows the line: a line each, the labels in a column
        await pilot.pause()
        assert bar.has_class("-stacked") and bar.size.height == 2
        assert name.region.y + 1 == author.region.y and name.region.x == author.region.x
        await pilot.press("escape")
        await pilot.pause()
        assert app.focused is app.query_one(SampleTable)
        assert whole(name) and whole(author) and author.value.endswith(tail)
        # shorter again: back on one line once the field is left
        await pilot.press("shift+tab", "ctrl+a", "ctrl+k", *"Ada", "escape")
        await pilot.pause()
        assert not bar.has_class("-stacked") and whole(name) and whole(author)
        assert app.settings.config.model_author == ["Ada"]
