"""Nothing made in the Dataset pane is lost: atomic saves that keep the previous version, an edit
journal that survives a crash, and files changed by something else are never overwritten unasked.
"""

from __future__ import annotations

import os

import orjson
import pytest
from tui_helpers import MINI_RECORDS, no_start, record_notices, wait_until
from tunebench.engine.core import files
from tunebench.tui.app import TuneBenchApp
from tunebench.tui.screens.confirm import Choice
from tunebench.tui.widgets.dataset import dataset_pane, dataset_store
from tunebench.tui.widgets.dataset.dataset_pane import DatasetPane
from tunebench.tui.widgets.dataset.dataset_store import ConflictError, DatasetStore, Row, UnsavableError

A = {"instruction": "a", "output": "1"}
B = {"instruction": "b", "output": "2"}
C = {"instruction": "c", "output": "3"}


def jsonl(*records) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def records(path) -> list:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def opened(path) -> DatasetStore:
    store = DatasetStore(path)
    store.load()
    return store


def edit_a_lot(store: DatasetStore) -> None:
    store.insert(1, Row.from_record(C))  # a, c, b
    store.replace(0, Row.from_record({"instruction": "a2", "output": "1"}))
    store.duplicate(2)  # a2, c, b, b
    store.delete(1)  # a2, b, b
    store.insert(0, Row.from_text('{"instruction": "half typed'))  # not JSON yet
    store.undo()  # a2, b, b


# ================================================================ atomic saves


def test_a_save_is_written_to_a_temporary_file_fsynced_then_renamed(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A, B))
    store = opened(path)
    store.delete(0)
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    store.save()
    (write,) = [c for c in calls if c[0] == "replace" and c[2] == str(path)]
    temp = write[1]
    assert temp != str(path) and os.path.dirname(temp) == str(tmp_path)  # same file system: rename is atomic
    assert calls.index(("fsync", temp)) < calls.index(write)  # the bytes are on disk before the rename
    assert calls[-1][0] == "fsync" and calls[-1][1] == str(tmp_path)  # and the rename after it
    assert records(path) == [B]


def test_a_failed_write_leaves_the_file_and_no_debris(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A, B))
    store = opened(path)
    store.delete(0)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError):
        store.save()
    assert path.read_bytes() == jsonl(A, B)
    assert store.dirty  # the edit is still there to save later
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.jsonl.journal", "d.jsonl"]


def test_bak_holds_the_version_from_before_the_session_and_theirs_on_overwrite(tmp_path):
    path = tmp_path / "d.jsonl"
    original = jsonl(A, B)
    path.write_bytes(original)
    bak = tmp_path / "d.jsonl.bak"
    store = opened(path)
    store.delete(0)
    store.save()
    assert bak.read_bytes() == original
    store.insert(0, Row.from_record(C))
    store.save()  # an autosave a second later must not replace the only copy of the original
    assert bak.read_bytes() == original and records(path) == [C, B]

    theirs = jsonl({"instruction": "theirs", "output": "x"})
    path.write_bytes(theirs)
    store.delete(0)
    with pytest.raises(ConflictError):
        store.save()
    assert path.read_bytes() == theirs
    store.save(force=True)  # "overwrite": their version is what is kept
    assert bak.read_bytes() == theirs and records(path) == [B]

    again = opened(path)  # a new session keeps the file as it found it
    again.delete(0)
    again.save()
    assert records(bak) == [B]


# ==================================================================== journal


def test_a_crash_loses_no_edit(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A, B))
    before = opened(path)
    edit_a_lot(before)
    expected = [row.text for row in before.rows]
    del before  # the TUI is killed: nothing was saved
    assert path.read_bytes() == jsonl(A, B)

    after = opened(path)
    recovery = after.recover()
    assert recovery is not None and recovery.replayed == 6
    assert [row.text for row in after.rows] == expected and after.dirty
    assert after.undo() == ("delete", 1)  # the undo history came back too
    assert after.undo() == ("duplicate", 2)  # a2, c, b
    after.delete(2)  # new edits append to the same journal...
    after.save()
    assert records(path) == [{"instruction": "a2", "output": "1"}, C]
    assert not after.journal_path.exists()  # ...which a landed save removes
    assert opened(path).recover() is None


def test_a_torn_last_journal_line_keeps_the_edits_before_it(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A, B))
    store = opened(path)
    store.delete(0)
    store.insert(1, Row.from_record(C))
    with open(store.journal_path, "ab") as fh:
        fh.write(b'{"op": "insert", "at": 0, "te')  # the crash hit mid-append
    again = opened(path)
    assert again.recover().replayed == 2
    assert [row.record for row in again.rows] == [B, C]


def test_a_crash_after_the_save_landed_does_not_apply_the_edits_twice(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A, B))
    store = opened(path)
    store.duplicate(1)
    monkeypatch.setattr(DatasetStore, "discard_journal", lambda self: None)  # crash right after the write
    store.save()
    monkeypatch.undo()
    assert store.journal_path.exists() and records(path) == [A, B, B]
    again = opened(path)
    assert again.recover() is None
    assert [row.record for row in again.rows] == [A, B, B] and not again.dirty
    assert not again.journal_path.exists()


def test_a_journal_for_a_file_changed_since_is_set_aside_not_replayed(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A, B))
    store = opened(path)
    store.insert(0, Row.from_record({"instruction": "mine", "output": "keep me"}))
    theirs = jsonl(C)
    path.write_bytes(theirs)  # then the TUI died, and something else rewrote the file
    again = opened(path)
    recovery = again.recover()
    assert recovery.replayed == 0 and "changed on disk" in recovery.reason
    assert [row.record for row in again.rows] == [C] and path.read_bytes() == theirs
    assert recovery.set_aside.name.startswith("d.jsonl.unsaved-") and recovery.set_aside.suffix == ".journal"
    assert b"keep me" in recovery.set_aside.read_bytes()  # the edit is still there, by name
    assert not again.journal_path.exists()
    assert recovery.set_aside.parent == tmp_path and not recovery.set_aside.name.endswith((".jsonl", ".json"))


def test_rows_that_cannot_be_saved_yet_survive_a_quit(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A))
    store = opened(path)
    store.insert(1, Row.from_text('{"instruction": "half'))
    with pytest.raises(UnsavableError):
        store.save()  # what the pane's flush() meets on the way out
    again = opened(path)
    assert again.recover().replayed == 1
    assert again.rows[1].text == '{"instruction": "half' and not again.rows[1].valid_json


def test_an_unwritable_journal_is_reported_not_fatal(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A, B))
    store = opened(path)
    real_open = open

    def failing_open(file, *args, **kwargs):
        if str(file).endswith(".journal"):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    store.delete(0)
    assert "Permission denied" in store.journal_error and len(store.rows) == 1
    monkeypatch.undo()
    store.save()
    assert records(path) == [B]


# ============================================================ changes on disk


def test_changes_on_disk_are_noticed_even_with_the_mtime_put_back(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A, B))
    store = opened(path)
    assert not store.changed_on_disk()
    os.utime(path, ns=(1, 1))  # touched: same bytes
    assert not store.changed_on_disk()
    stat = path.stat()
    with open(path, "r+b") as fh:  # same size, in place, and the mtime set back as `cp -p` would
        fh.write(b'{"instruction":"z"')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert store.changed_on_disk()
    with pytest.raises(ConflictError):
        store.save()


def test_polling_an_unchanged_file_does_not_read_it(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A, B) * 1000)
    store = opened(path)
    reads = []
    real_digest = dataset_store.digest
    monkeypatch.setattr(dataset_store, "digest", lambda p: reads.append(p) or real_digest(p))
    for _ in range(5):
        assert not store.changed_on_disk()
    assert reads == []
    path.write_bytes(jsonl(A))
    assert store.changed_on_disk() and len(reads) == 1


def test_a_deleted_file_is_a_conflict_too(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A, B))
    store = opened(path)
    store.delete(0)
    path.unlink()
    with pytest.raises(ConflictError):
        store.save()


# ================================================================ in the TUI


async def test_the_pane_recovers_edits_after_the_tui_is_killed(workspace, fake_engine, monkeypatch):
    monkeypatch.setattr(dataset_pane, "AUTOSAVE_DELAY_S", 60)  # nothing is saved before the "crash"
    path = workspace / "datasets" / "mini.jsonl"
    before = path.read_bytes()
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports, what="row checks")
        await pilot.press("d", "down", "c")  # delete the first sample, duplicate the next
        expected = [row.record for row in pane.store.rows]
        assert pane.store.dirty
    # Leaving run_test without quitting is the kill: no flush, no save.
    assert path.read_bytes() == before and expected != MINI_RECORDS

    monkeypatch.setattr(dataset_pane, "AUTOSAVE_DELAY_S", 0.05)
    app = TuneBenchApp(workspace, starter=no_start)
    said = record_notices(app)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports, what="row checks")
        assert [row.record for row in pane.store.rows] == expected
        assert any("recovered 2 unsaved edit" in n for n in said)
        await wait_until(pilot, lambda: not pane.store.dirty, what="the recovered edits to autosave")
    assert records(path) == expected
    assert (path.parent / "mini.jsonl.bak").read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["mini.jsonl", "mini.jsonl.bak"]  # lock gone too


async def test_choosing_reload_on_a_conflict_drops_the_journal(workspace, fake_engine, monkeypatch):
    monkeypatch.setattr(dataset_pane, "AUTOSAVE_DELAY_S", 60)
    path = workspace / "datasets" / "mini.jsonl"
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports)
        await pilot.press("d")
        assert pane.store.journal_path.exists()
        theirs = jsonl({"instruction": "theirs", "output": "x"})
        path.write_bytes(theirs)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, Choice), what="the conflict question")
        await pilot.press("r")
        assert [row.record for row in pane.store.rows] == [orjson.loads(theirs)]
    assert path.read_bytes() == theirs
    assert sorted(p.name for p in path.parent.iterdir()) == ["mini.jsonl"]  # no journal, nothing set aside


def test_a_journal_without_edits_is_dropped_quietly(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A, B))
    store = opened(path)
    store.journal_path.write_bytes(
        orjson.dumps({"journal": 1, "file": "d.jsonl", "base": "0" * 64})
        + b"\n"
        + orjson.dumps({"op": "saving", "digest": "1" * 64})
        + b"\n"
    )
    path.write_bytes(jsonl(C))  # changed since, but nothing was edited: no warning to give
    again = opened(path)
    assert again.recover() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


# ============================================= one writer per file, and files set read-only


def notice(app) -> str:
    """The Dataset pane's read-only notice, as shown ("" while hidden)."""
    labels = app.query("#dataset-read-only")
    return str(labels.first().render()) if labels and labels.first().display else ""


async def test_a_second_tui_on_one_file_is_read_only_and_loses_nothing(workspace, fake_engine, monkeypatch):
    """Issue 14.1: `d` in one TUI and `c` in another within a second, then the second is killed."""
    monkeypatch.setattr(dataset_pane, "AUTOSAVE_DELAY_S", 0.05)
    path = workspace / "datasets" / "mini.jsonl"
    first, second = TuneBenchApp(workspace, starter=no_start), TuneBenchApp(workspace, starter=no_start)
    async with first.run_test(size=(100, 32)) as p1:
        pane1 = first.query_one(DatasetPane)
        await wait_until(p1, lambda: pane1.reports, what="the first TUI's checks")
        async with second.run_test(size=(100, 32)) as p2:
            pane2 = second.query_one(DatasetPane)
            await wait_until(p2, lambda: pane2.reports, what="the second TUI's checks")
            notices = notice(first), notice(second)
            await p1.press("d")
            await p2.press("c")
            shown_by_second = [row.record for row in pane2.store.rows]
            refusals = [n.message for n in second._notifications if "is editing it" in n.message]
            await wait_until(p1, lambda: not pane1.store.dirty, what="the first TUI's autosave")
            await p2.pause(0.1)
        # the second TUI was killed: whatever it showed as made must be kept somewhere
        await p1.pause(0.1)
        assert not pane1.store.dirty and not pane1.store.journal_path.exists()
    kept = opened(path)
    assert kept.recover() is None
    assert [row.record for row in kept.rows] == MINI_RECORDS[1:]
    assert shown_by_second in (MINI_RECORDS, MINI_RECORDS[1:])  # it never showed an edit it would lose
    assert not notices[0] and "read-only" in notices[1] and "another TuneBench (pid" in notices[1]
    assert refusals  # `c` there was refused, saying why


async def test_the_read_only_tui_takes_over_when_the_writer_dies(workspace, fake_engine, monkeypatch):
    """The writer is killed with edits only in its journal: the other TUI replays them, then edits."""
    monkeypatch.setattr(dataset_pane, "AUTOSAVE_DELAY_S", 60)  # the writer dies before any save
    monkeypatch.setattr(dataset_pane, "DISK_CHECK_S", 0.05)
    path = workspace / "datasets" / "mini.jsonl"
    writer, reader = TuneBenchApp(workspace, starter=no_start), TuneBenchApp(workspace, starter=no_start)
    said_to_reader = record_notices(reader)
    writing = writer.run_test(size=(100, 32))
    p1 = await writing.__aenter__()
    try:
        pane1 = writer.query_one(DatasetPane)
        await wait_until(p1, lambda: pane1.reports, what="the writer's checks")
        async with reader.run_test(size=(100, 32)) as p2:
            pane2 = reader.query_one(DatasetPane)
            await wait_until(p2, lambda: pane2.reports, what="the reader's checks")
            assert "read-only" in notice(reader)
            await p1.press("d", "down", "c")
            made = [row.record for row in pane1.store.rows]
            await p2.pause(0.2)
            assert [row.record for row in pane2.store.rows] == MINI_RECORDS  # the journal is not the reader's
            await writing.__aexit__(None, None, None)  # killed: no flush, its lock goes with it
            writing = None
            await wait_until(p2, lambda: not notice(reader), what="the reader to take over")
            # the file is read again in the background, then the dead writer's journal replayed
            await wait_until(p2, lambda: not pane2.store.loading, what="the reader to read the file")
            assert [row.record for row in pane2.store.rows] == made
            assert any("recovered 2 unsaved edit" in n for n in said_to_reader)
            await p2.press("c")
            assert len(pane2.store.rows) == len(made) + 1
            await p2.press("ctrl+s")
            assert not pane2.store.dirty
        assert len(records(path)) == len(made) + 1
    finally:
        if writing is not None:
            await writing.__aexit__(None, None, None)


async def test_a_read_only_file_is_not_replaced_and_says_what_to_do(workspace, fake_engine, monkeypatch):
    """Issue 14.6: a dataset set to 0444 was replaced by autosave, which kept the mode."""
    monkeypatch.setattr(dataset_pane, "AUTOSAVE_DELAY_S", 0.05)
    monkeypatch.setattr(dataset_pane, "DISK_CHECK_S", 0.05)
    path = workspace / "datasets" / "mini.jsonl"
    path.chmod(0o444)
    before = (path.read_bytes(), path.stat().st_ino)
    app = TuneBenchApp(workspace, starter=no_start)
    said = record_notices(app)
    async with app.run_test(size=(100, 32)) as pilot:
        pane = app.query_one(DatasetPane)
        await wait_until(pilot, lambda: pane.reports, what="row checks")
        shown = notice(app)
        assert "mini.jsonl is read-only (mode 0444)" in shown and f"chmod u+w {path}" in shown
        await pilot.press("d", "c", "ctrl+s")
        await pilot.pause(0.2)
        assert not pane.store.dirty and [row.record for row in pane.store.rows] == MINI_RECORDS
        assert any("read-only (mode 0444)" in n for n in said)
        assert (path.read_bytes(), path.stat().st_ino) == before
        path.chmod(0o644)  # the person's answer: chmod u+w
        await wait_until(pilot, lambda: not notice(app), what="the pane to notice the chmod")
        await wait_until(pilot, lambda: not pane.store.loading, what="the file read again")
        await pilot.press("d")
        await wait_until(pilot, lambda: not pane.store.dirty, what="the autosave")
    assert records(path) == MINI_RECORDS[1:]


def test_the_store_never_replaces_a_read_only_file_and_keeps_the_edit(tmp_path):
    """Set read-only while edits were being made: the save is refused, the journal keeps them."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A, B))
    store = opened(path)
    store.delete(0)
    path.chmod(0o444)
    with pytest.raises(dataset_store.ReadOnlyFileError, match=r"d.jsonl is read-only \(mode 0444\)"):
        store.save()
    assert path.read_bytes() == jsonl(A, B) and store.dirty
    path.chmod(0o644)
    again = opened(path)
    assert again.recover().replayed == 1 and [row.record for row in again.rows] == [B]


def test_the_writer_lock_goes_with_its_process_even_when_killed(tmp_path):
    """No stale lock: kill -9 of the TUI that edits a file frees the file for the next one."""
    import signal
    import subprocess
    import sys

    from tunebench.tui.widgets.dataset.write_access import WriterLock

    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(A))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(path)], stdout=subprocess.PIPE, env=os.environ.copy()
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        lock = WriterLock(path)
        assert not lock.acquire() and lock.holder() == f"pid {holder.pid}"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert lock.acquire() and lock.held and lock.holder() == f"pid {os.getpid()}"
    assert not WriterLock(path).acquire()  # one writer: this process now, its other panes included
    lock.release()
    assert not lock.path.exists()  # a clean exit leaves nothing beside the file
    following = WriterLock(path)
    assert following.acquire()
    following.release()


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from tunebench.tui.widgets.dataset.write_access import WriterLock
assert WriterLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(60)
"""
