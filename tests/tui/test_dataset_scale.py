"""The Dataset pane with large files: rows read in the background, saves that keep every untouched
line's bytes and run while edits go on, search done in slices, and keys that always reach the
widget the person focused. How fast is measured in bench/bench_dataset_pane.py, not here.
"""

from __future__ import annotations

import hashlib
import threading

import orjson
import pytest
from textual import events
from textual.widgets import Input
from tui_helpers import no_start, wait_until
from tunebench.engine.core import files
from tunebench.tui.app import TuneBenchApp
from tunebench.tui.screens.sample_editor import SampleEditor
from tunebench.tui.widgets.dataset import dataset_file, dataset_pane, row_filter
from tunebench.tui.widgets.dataset.dataset_pane import DatasetPane
from tunebench.tui.widgets.dataset.dataset_store import DatasetStore, Row
from tunebench.tui.widgets.dataset.sample_table import SampleTable

# Lines as people's tools write them: spaced, keys in their own order, escapes, a CRLF line, a
# trailing space. TuneBench would write each of them differently; untouched, each must stay.
HAND_WRITTEN = [
    b'\xef\xbb\xbf{"instruction": "caf\\u00e9?", "output": "yes"}',
    b'{ "output" : "2", "instruction" : "1+1?" }',
    b'{"instruction":"third","output":"3"}\r',
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]} ',
    b'{"instruction": "fifth", "output": "5.0"}',
]


def hand_written_file(path) -> bytes:
    data = b"\n".join(HAND_WRITTEN) + b"\n"
    path.write_bytes(data)
    return data


def many_records(count: int) -> list[dict]:
    return [{"instruction": f"question {i}", "output": f"Answer {i} in colour"} for i in range(count)]


def write_many(path, count: int) -> list[dict]:
    records = many_records(count)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return records


def type_ahead(app, keys) -> None:
    """Keys arriving faster than the app handles them (a busy box): all queued before any runs.
    A string is typed; a list holds key names ("enter", "down")."""
    for key in keys:
        name = {"/": "slash", " ": "space"}.get(key, key)
        event = events.Key(name, key if len(key) == 1 else None)
        event.set_sender(app)
        app._driver.send_message(event)


# ====================================================================== saving


def test_a_one_line_edit_is_a_one_line_diff(tmp_path):
    path = tmp_path / "d.jsonl"
    before = hand_written_file(path)
    store = DatasetStore(path)
    store.load()
    store.replace(1, Row.from_record({"instruction": "1+1?", "output": "two"}))
    store.save()
    old, new = before.split(b"\n"), path.read_bytes().split(b"\n")
    assert len(new) == len(old)
    assert [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b] == [1]
    assert orjson.loads(new[1]) == {"instruction": "1+1?", "output": "two"}


def test_deleting_and_undoing_keeps_the_file_byte_for_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    before = hand_written_file(path)
    store = DatasetStore(path)
    store.load()
    store.duplicate(2)  # the CRLF line, copied as it is
    store.save()
    assert path.read_bytes() == before.replace(HAND_WRITTEN[2] + b"\n", (HAND_WRITTEN[2] + b"\n") * 2)
    store.undo()
    store.save()
    assert path.read_bytes() == before


def test_a_save_writes_the_lines_read_and_only_the_edited_rows_anew(tmp_path, monkeypatch):
    # Blocks of a few lines: every block boundary, and the byte order mark, is crossed.
    monkeypatch.setattr(dataset_file, "SAVE_BLOCK", 60)
    path = tmp_path / "d.jsonl"
    hand_written_file(path)
    lines = [HAND_WRITTEN[0][len(dataset_file.BOM) :], *HAND_WRITTEN[1:]]  # what each row was read from
    store = DatasetStore(path)
    store.load()
    edited = {"instruction": "1+1?", "output": "two"}
    store.replace(1, Row.from_record(edited))
    store.delete(3)
    store.duplicate(2)  # the CRLF line, copied as it is
    store.insert(0, Row.from_text('{"instruction": "typed",\n "output": "over two lines"}'))
    store.save()
    # The file written by hand from the edits: untouched lines as read, edited rows compact.
    expected = [
        b'{"instruction":"typed","output":"over two lines"}',
        lines[0],
        orjson.dumps(edited),
        lines[2],
        lines[2],
        lines[4],
    ]
    written = path.read_bytes()
    assert written == dataset_file.BOM + b"\n".join(expected) + b"\n"
    assert store.disk_digest == hashlib.sha256(written).hexdigest()  # what a later load compares
    assert not store.changed_on_disk() and not store.journal_path.exists()
    again = DatasetStore(path)
    again.load()
    assert [row.record for row in again.rows] == [row.record for row in store.rows]


def test_a_save_of_no_rows_keeps_only_the_byte_order_mark(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(dataset_file.BOM + HAND_WRITTEN[1] + b"\n")
    store = DatasetStore(path)
    store.load()
    store.delete(0)
    store.save()
    assert path.read_bytes() == dataset_file.BOM


def test_a_save_that_fails_before_its_rename_replays_every_edit(tmp_path, monkeypatch):
    # The journal's mark of the save (its digest) is written just before the rename; a rename
    # that never happens leaves the old file, whose digest the mark does not hold.
    path = tmp_path / "d.jsonl"
    write_many(path, 3)
    store = DatasetStore(path)
    store.load()
    store.delete(0)
    store.duplicate(1)

    def no_rename(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "replace", no_rename)
    with pytest.raises(OSError):
        store.save()
    monkeypatch.undo()
    assert [orjson.loads(line)["instruction"] for line in path.read_bytes().splitlines()] == [
        "question 0",
        "question 1",
        "question 2",
    ]
    again = DatasetStore(path)
    again.load()
    recovery = again.recover()
    assert recovery is not None and recovery.replayed == 2
    assert [row.record for row in again.rows] == [row.record for row in store.rows]


def test_edits_made_while_a_save_is_written_survive_a_crash(tmp_path):
    path = tmp_path / "d.jsonl"
    write_many(path, 3)
    store = DatasetStore(path)
    store.load()
    store.delete(0)
    pending = store.begin_save()  # the UI takes the rows; a worker writes them...
    store.insert(0, Row.from_record({"instruction": "typed meanwhile", "output": "x"}))
    store.write_save(pending)
    store.finish_save(pending)
    assert store.dirty  # the insert is not in the file yet
    assert [orjson.loads(line)["instruction"] for line in path.read_bytes().splitlines()] == [
        "question 1",
        "question 2",
    ]
    expected = [row.record for row in store.rows]
    del store  # killed before the next autosave

    again = DatasetStore(path)
    again.load()
    recovery = again.recover()
    assert recovery is not None and recovery.replayed == 1  # only the edit the save did not hold
    assert [row.record for row in again.rows] == expected


async def test_edits_made_while_an_autosave_is_written_are_saved_when_it_lands(
    workspace, fake_engine, monkeypatch
):
    path = workspace / "datasets" / "mini.jsonl"
    write_many(path, 5)
    writing, release = threading.Event(), threading.Event()
    write_save = DatasetStore.write_save

    def slow_write(self, pending):
        writing.set()
        release.wait(10)  # a large file on a busy disk
        return write_save(self, pending)

    monkeypatch.setattr(DatasetStore, "write_save", slow_write)
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports and not pane.store.loading, what="the file")
        await pilot.press("d")  # question 0
        await wait_until(pilot, writing.is_set, what="the first autosave")
        await pilot.press("d", "d")  # questions 1 and 2, while it is written
        await pilot.pause(0.2)
        release.set()
        await wait_until(pilot, lambda: not pane.store.dirty, what="the second autosave")
    assert [orjson.loads(line)["instruction"] for line in path.read_bytes().splitlines()] == [
        "question 3",
        "question 4",
    ]


def test_rows_read_in_chunks_are_the_rows_of_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_file, "FIRST_READ", 7)
    monkeypatch.setattr(dataset_file, "READ_CHUNK", 13)  # every line cut somewhere
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(HAND_WRITTEN[:3]) + b"\n\n  \nnot json\n" + HAND_WRITTEN[4])  # no last \n
    reader = dataset_file.RowReader(path)
    rows = [row for batch in reader.batches() for row in batch]
    assert [row.line for row in rows] == [1, 2, 3, 6, 7]
    assert [row.record for row in rows[:3]] == [
        orjson.loads(line.lstrip(dataset_file.BOM)) for line in HAND_WRITTEN[:3]
    ]
    assert not rows[3].valid_json and rows[3].text == "not json"
    assert reader.bom and reader.done == reader.total == path.stat().st_size


# ====================================================================== search


def test_search_finds_every_matching_row_in_every_slice():
    rows = [Row.from_record(r) for r in many_records(3 * row_filter.SEARCH_SLICE + 5)]
    parts = row_filter.search_slices(row_filter.Numbered(rows), "QUESTION 1")
    found = [pair for part in parts for pair in part]
    expected = [(i, row) for i, row in enumerate(rows) if "question 1" in row.text]
    assert found == expected and len(found) > row_filter.SEARCH_SLICE // 4


async def test_typing_a_search_shows_the_rows_of_the_last_text(workspace, fake_engine):
    path = workspace / "datasets" / "mini.jsonl"
    records = write_many(path, 2 * row_filter.SEARCH_SLICE + 100)
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        table = app.query_one(SampleTable)
        await wait_until(pilot, lambda: pane.reports and not pane.store.loading, what="the file")
        await pilot.press("slash")
        type_ahead(app, "question 81")  # every keystroke starts a search that the next one cancels
        await wait_until(pilot, lambda: pane.search == "question 81" and not pane._searching, what="search")
        expected = [i for i, r in enumerate(records) if "question 81" in r["instruction"]]
        assert [table._rows[i][0] for i in range(table.row_count)] == expected
        assert "11 shown" in str(app.query_one("#dataset-title").render())
        await pilot.press("escape")
        assert table.row_count == len(records)


async def test_an_edit_between_keystrokes_is_searched_again(workspace, fake_engine):
    path = workspace / "datasets" / "mini.jsonl"
    write_many(path, 300)
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        table = app.query_one(SampleTable)
        await wait_until(pilot, lambda: pane.reports and not pane.store.loading, what="the file")
        await pilot.press("slash", *"question 1")
        await wait_until(pilot, lambda: not pane._searching, what="search")
        assert table.row_count == 111  # 1, 10-19, 100-199
        await pilot.press("enter", "down", "d")  # back to the table; delete "question 10"
        await wait_until(pilot, lambda: table.row_count == 110 and not pane._searching, what="re-search")
        await pilot.press("slash", "end", "0")  # typing on from "question 1": the deleted row is gone
        await wait_until(pilot, lambda: pane.search == "question 10" and not pane._searching, what="search")
        assert [row.record["instruction"] for _, row in table._rows] == [
            f"question {n}" for n in range(100, 110)
        ]


# ====================================================================== keys


async def test_keys_typed_ahead_go_to_the_search_field(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports, what="row checks")
        rows = list(pane.store.rows)
        type_ahead(app, "/educate")  # e edits, d deletes, u undoes, c duplicates: in the table
        await pilot.pause()
        assert app.query_one("#dataset-search", Input).value == "educate"
        assert not isinstance(app.screen, SampleEditor)
        assert pane.store.rows == rows and not pane.store.dirty


async def test_keys_typed_after_enter_are_not_table_commands(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports, what="row checks")
        rows = list(pane.store.rows)
        type_ahead(app, ["enter", *"dud"])  # enter opens the editor: d, u, d are not delete, undo
        await wait_until(pilot, lambda: isinstance(app.screen, SampleEditor), what="the editor")
        await pilot.pause()
        assert pane.store.rows == rows and not pane.store.dirty


async def test_keys_after_a_search_act_on_the_rows_it_found(workspace, fake_engine, monkeypatch):
    monkeypatch.setattr(dataset_pane, "AUTOSAVE_DELAY_S", 60)
    path = workspace / "datasets" / "mini.jsonl"
    write_many(path, 3 * row_filter.SEARCH_SLICE)  # a search of several slices: it takes a while
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports and not pane.store.loading, what="the file")
        type_ahead(app, [*"/question 7", "enter", "down", "d"])  # the second match: "question 70"
        await wait_until(pilot, lambda: pane.store.dirty, what="the delete")
        gone = {r["instruction"] for r in many_records(len(pane.store.rows) + 1)} - {
            row.record["instruction"] for row in pane.store.rows
        }
        assert gone == {"question 70"}


async def test_keys_during_a_background_load_go_to_the_focused_widget(workspace, fake_engine, monkeypatch):
    monkeypatch.setattr(dataset_file, "READ_CHUNK", 2000)  # a slow read: many small batches
    monkeypatch.setattr(dataset_pane, "AUTOSAVE_DELAY_S", 0.05)
    path = workspace / "datasets" / "mini.jsonl"
    write_many(path, 5000)
    before = path.read_bytes()
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        table = app.query_one(SampleTable)
        await wait_until(pilot, lambda: table.row_count, what="the first rows")
        assert pane.store.loading  # the rest is still being read
        await pilot.press("d")  # an edit now would race the rows still arriving: refused, said
        assert any("still reading" in n.message for n in app._notifications)
        type_ahead(app, "/question 4999")
        await wait_until(pilot, lambda: not pane.store.loading, timeout=30, what="the whole file")
        await wait_until(pilot, lambda: table.row_count == 1 and not pane._searching, what="the search")
        search = app.query_one("#dataset-search", Input)
        assert search.value == "question 4999" and search.has_focus  # the load took no key, no focus
        assert not isinstance(app.screen, SampleEditor) and not pane.store.dirty
        await pilot.pause(0.2)
    assert path.read_bytes() == before


async def test_a_click_picks_a_row_and_a_second_click_edits_it(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        table = app.query_one(SampleTable)
        await wait_until(pilot, lambda: pane.reports, what="row checks")
        await pilot.click(SampleTable, offset=(10, 3))  # below the header: the third sample
        assert table.current_key == pane.store.rows[2].key and table.has_focus
        await pilot.click(SampleTable, offset=(10, 3))
        await wait_until(pilot, lambda: isinstance(app.screen, SampleEditor), what="the editor")
