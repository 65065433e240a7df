"""The Dataset pane: a table of samples to add, edit, duplicate, delete (with undo) and search,
checks on every row, the selected sample rendered through the chat template, and safe saving.

Made for files of 100,000 samples: the first rows show while the rest are read in a worker; the
table draws only what is on screen; search, checks and saving run in workers, each cancelled or
folded together by the next change, so a key is answered at once however large the file.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Input, Label, TextArea
from textual.worker import get_current_worker
from tunebench.engine.core.data import DatasetSpec, parse_dataset_spec
from tunebench.engine.core.errors import DataError
from tunebench.tui.debounce import Debouncer
from tunebench.tui.paths import short_path
from tunebench.tui.screens.confirm import Choice
from tunebench.tui.screens.dataset_picker import DatasetPicker
from tunebench.tui.screens.sample_editor import SampleEditor

from ..params.settings_store import TrainSettings
from .dataset_file import RowReader, gc_scans_everything, spare_rows_from_gc_scans
from .dataset_store import (
    NEW_RECORDS,
    ConflictError,
    DatasetStore,
    PendingSave,
    ReadOnlyFileError,
    Row,
    UnsavableError,
)
from .identity_bar import IdentityBar
from .light_tokenizer import LightTokenizer, load_for_model
from .row_checks import CheckSettings, RowChecker, RowReport
from .row_filter import Numbered, search_slices
from .sample_preview import SamplePreview
from .sample_table import SampleTable
from .write_access import WriteAccess

# After the last edit, which is in the journal already: this only folds a burst of edits (a held
# key) into one write. Edits made while a write is in flight go into the one after it lands.
AUTOSAVE_DELAY_S = 0.05
DISK_CHECK_S = 2.0
FIRST_DRAW_WAIT_S = 2.0  # at most, before the rest of a file is read anyway
SEARCH_WAIT_S = 3.0  # at most, that a key acting on the rows waits for the search before it


# The pane's keys are priority bindings: the app runs them the moment it reads the key, before
# it hands the next key to the focused widget. Otherwise keys typed ahead of a slow screen went to
# the widget focused before `/` moved the focus to search, and ran as table commands (e, u).
# In a text field, the letter keys are text (check_action).
_LETTER_ACTIONS = {"add", "edit", "duplicate", "delete", "undo", "search", "open", "train_on_file"}


class DatasetPane(Vertical):
    BINDINGS = [
        Binding("a", "add", "Add", priority=True),
        Binding("e", "edit", "Edit", priority=True),
        Binding("c", "duplicate", "Duplicate", show=False, priority=True),
        Binding("d", "delete", "Delete", priority=True),
        Binding("u", "undo", "Undo", priority=True),
        Binding("slash", "search", "Search", priority=True),
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("o", "open", "Open file", show=False, priority=True),
        Binding("t", "train_on_file", "Train on file", show=False, priority=True),
        Binding(
            "escape",
            "clear_search",
            "Clear search",
            show=False,
            priority=True,
            tooltip="Clear the search, or leave the name / author field: back to the table",
        ),
        Binding("enter", "enter", "Edit, or back to the table from search", show=False, priority=True),
    ]
    HELP_KEYS = (
        ("↑ ↓ pgup pgdn", "move through the samples; the preview follows"),
        ("enter", "edit the highlighted sample (same as e)"),
        ("shift+tab", "to the name / author fields that fill {{NAME}} / {{AUTHOR}}"),
        ("tab", "to the preview (arrows scroll it)"),
        ("enter in search", "back to the table, keeping the filter"),
    )

    @dataclass
    class SettingsEdited(Message):
        """The name / author fields changed these settings (already applied)."""

        pane: DatasetPane
        names: list[str]

        @property
        def control(self) -> DatasetPane:
            return self.pane

    @dataclass
    class DirtyChanged(Message):
        pane: DatasetPane
        dirty: bool

        @property
        def control(self) -> DatasetPane:
            return self.pane

    def __init__(self, settings: TrainSettings, workspace: Path, path: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.workspace = workspace
        self.store = DatasetStore(path)
        self.tokenizer = LightTokenizer(None)
        self.tokenizer_model = ""
        self.checker = RowChecker(self.tokenizer, CheckSettings.from_config(settings.config))
        self.reports: dict[str, RowReport] = {}
        self.flagged = 0  # rows whose report lists a problem
        self.search = ""
        self.shown: Sequence[tuple[int, Row]] = Numbered(self.store.rows)  # what the table lists
        self._searching = False
        self._search_idle = asyncio.Event()  # set while no search is pending
        self._search_idle.set()
        self._last_search: tuple[str, tuple, list[tuple[int, Row]]] | None = None  # text, rows, found
        self._reading: tuple[int, int] | None = None  # (bytes read, of) while the file loads
        self._checking: tuple[int, int] | None = None  # (rows checked, of) while checks run
        self._save_in_flight = False
        self.autosaver = Debouncer(self, AUTOSAVE_DELAY_S, self._autosave)
        self._conflict_open = False
        self._was_dirty = False
        self._journal_warned = ""
        self._previewed: str | None = None  # the row the preview shows
        self.access: WriteAccess | None = None  # the lock that makes this TUI the file's writer
        self.read_only = ""  # why this TUI may not write the file now ("" when it may)
        # the file being opened, its writer lock and why it would be read-only, until its rows arrive
        self._opening: tuple[DatasetStore, WriteAccess, str] | None = None
        self._preview_of: tuple | None = None  # what it was rendered from

    def compose(self) -> ComposeResult:
        yield Label("", id="dataset-title")
        yield Label("", id="dataset-read-only")
        # Always laid out: showing it on `/` reflowed the whole pane, and the first key typed
        # into it waited behind that (the slowest keystroke of a search, on 100,000 rows). Above
        # the name / author fields, which shift+tab reaches from the table first.
        yield Input(placeholder="/ search samples (esc clears)", id="dataset-search", compact=True)
        yield IdentityBar(id="identity")
        yield SampleTable(id="sample-table")
        with VerticalScroll(id="preview-scroll"):
            yield SamplePreview(id="sample-preview")

    def on_mount(self) -> None:
        self.query_one("#dataset-read-only").display = False
        self.query_one(IdentityBar).show(self.settings.text, self.settings.errors)
        self._begin_read(self.store, None)
        self.settings_changed()
        self.set_interval(DISK_CHECK_S, self._watch_disk)

    # ------------------------------------------------------------- loading

    def load(self, path: Path) -> None:
        """Show `path`: its first rows at once, the rest as a worker reads them. The file shown
        now stays until the first rows arrive, and comes back if `path` cannot be read."""
        store = DatasetStore(path)
        gc_scans_everything()  # what was spared for the file shown now may be garbage soon
        self._begin_read(store, self.store)

    def _begin_read(self, store: DatasetStore, previous: DatasetStore | None) -> None:
        # The writer's lock is taken before reading: its saves land whole, under the lock.
        access = self.access
        if access is None or access.data_path != store.save_path:
            access = WriteAccess(store.save_path, self.workspace)
        self._opening = (store, access, access.check())
        self._read(store, store.start_loading(), previous)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False, description="read the dataset")
    def _read(self, store: DatasetStore, reader: RowReader, previous: DatasetStore | None) -> None:
        worker = get_current_worker()
        first_drawn = threading.Event()
        try:
            for batch in reader.batches():
                if worker.is_cancelled:
                    return
                self.app.call_from_thread(self._rows_read, store, batch, reader)
                if not first_drawn.is_set():
                    # Parsing competes with the UI for the interpreter: let the first screenful
                    # be drawn before the rest of the file is parsed.
                    self.app.call_from_thread(self.call_after_refresh, first_drawn.set)
                    first_drawn.wait(timeout=FIRST_DRAW_WAIT_S)
                    first_drawn.set()
        except (OSError, ValueError) as exc:
            self.app.call_from_thread(self._read_failed, store, previous, exc)
            return
        if not worker.is_cancelled:
            self.app.call_from_thread(self._read_done, store, reader)

    def _take(self, store: DatasetStore) -> None:
        """From now on the pane shows this store (the first rows of a file have arrived)."""
        if self.store is not store:
            self.store, self.reports, self.flagged = store, {}, 0
            self.query_one(SampleTable).show((), {})
        if self._opening is not None and self._opening[0] is store:
            _, access, read_only = self._opening
            self._opening = None
            if self.access is not None and self.access is not access:
                self.access.release()  # another file now: the one left is free for others to edit
            self.access = access
            self._show_read_only(read_only)

    def _rows_read(self, store: DatasetStore, batch: list[Row], reader: RowReader) -> None:
        self._take(store)
        store.rows.extend(batch)
        spare_rows_from_gc_scans()
        self._reading = (reader.done, reader.total)
        if not self.search:
            self._show_rows(Numbered(store.rows), preview_now=False)
        self._show_title()

    def _read_failed(self, store: DatasetStore, previous: DatasetStore | None, exc: Exception) -> None:
        self._reading = None
        if self._opening is not None and self._opening[0] is store:
            if self._opening[1] is not self.access:
                self._opening[1].release()
            self._opening = None
        self.notify(f"cannot open {store.path}: {exc}", severity="error", timeout=8)
        if previous is not None and self.store is store:  # back to the file that was shown
            self.store = previous
            self._redraw_table()
            self._run_checks()
        self._show_title()

    def _read_done(self, store: DatasetStore, reader: RowReader) -> None:
        self._take(store)
        self._reading = None
        store.finish_loading(reader)
        try:
            # A journal here belongs to the writer: replayed only by the writer, never by a reader
            # (which would replay, or set aside, edits that are still being made).
            recovery = None if self.read_only else store.recover()
        except OSError as exc:
            recovery = None
            self.notify(f"cannot read the edit journal of {store.path.name}: {exc}", severity="error")
        if store.load_note:
            self.notify(store.load_note)
        if recovery and recovery.replayed:
            self.notify(
                f"recovered {recovery.replayed} unsaved edit(s) from the last session (u undoes them)",
                timeout=8,
            )
            self.autosaver.poke()
        elif recovery and recovery.set_aside:
            self.notify(
                f"unsaved edits from an earlier session were not applied: {recovery.reason}. "
                f"They are kept in {recovery.set_aside.name}",
                severity="warning",
                timeout=15,
            )
        self._redraw_table()
        self._run_checks()

    def settings_changed(self) -> None:
        """Parameters changed: re-check if the checks depend on what changed; reload the tokenizer
        if the model changed."""
        cfg = self.settings.config
        if cfg.model != self.tokenizer_model:
            self.tokenizer_model = cfg.model
            self._load_tokenizer(cfg.model)
        if self.checker.reconfigure(self.tokenizer, CheckSettings.from_config(cfg)):
            self._run_checks()
        self.query_one(IdentityBar).show(self.settings.text, self.settings.errors)
        self._show_title()

    @work(thread=True, exclusive=True, group="tokenizer", exit_on_error=False)
    def _load_tokenizer(self, model: str) -> None:
        tokenizer = load_for_model(model, self.workspace)  # tokenizer.json: ~0.2 s, off the loop
        self.app.call_from_thread(self._tokenizer_ready, model, tokenizer)

    def _tokenizer_ready(self, model: str, tokenizer: LightTokenizer) -> None:
        if model != self.settings.config.model:
            return  # the model changed again while this one loaded
        self.tokenizer = tokenizer
        if self.checker.reconfigure(tokenizer, CheckSettings.from_config(self.settings.config)):
            self._run_checks()

    def _run_checks(self) -> None:
        if not self.store.loading:
            self._checking = (0, len(self.store.rows))
            self._check(list(self.store.rows))  # the rows as they are now; edits start another
            self._show_title()

    # Each worker that is handed the rows names itself: by default Textual's @work describes a
    # worker by the repr of its arguments, which for 100,000 rows took seconds on the UI's thread.
    @work(thread=True, exclusive=True, group="checks", exit_on_error=False, description="check rows")
    def _check(self, rows: list[Row]) -> None:
        worker = get_current_worker()
        reports: dict[str, RowReport] = {}
        flagged = 0
        for batch in self.checker.check_in_batches(rows):
            if worker.is_cancelled:
                return
            reports.update(batch)
            flagged += sum(1 for report in batch.values() if report.problems)
            self.app.call_from_thread(self._checks_ready, batch, (len(reports), len(rows)), flagged)
        if not worker.is_cancelled:
            self.app.call_from_thread(self._checks_done, reports, flagged)

    def _checks_ready(self, batch: dict[str, RowReport], progress: tuple[int, int], flagged: int) -> None:
        # Merged in place: the rows not re-checked yet keep their last report until their batch.
        self.reports.update(batch)
        spare_rows_from_gc_scans()  # the reports live as long as the rows
        self._checking, self.flagged = progress, max(self.flagged, flagged)
        self.query_one(SampleTable).update_reports(self.reports)
        self._show_title()
        self._show_preview()

    def _checks_done(self, reports: dict[str, RowReport], flagged: int) -> None:
        self._checking = None
        self.reports, self.flagged = reports, flagged  # only the rows that are still there
        self.query_one(SampleTable).update_reports(reports)
        self._show_title()
        self._show_preview()

    # ------------------------------------------------------------- drawing

    def _redraw_table(self, *, edited: bool = False) -> None:
        """The rows or the search changed: show them, filtered again if a search is on."""
        if self.search:
            if edited:
                # At once: the matches shown, as they are now (edited, renumbered, deleted ones
                # gone); the search that follows adds any row the edit made match.
                now = {row.key: (i, row) for i, row in enumerate(self.store.rows)}
                self._show_rows([now[row.key] for _, row in self.shown if row.key in now])
            self._searching = True  # until the worker shows what it found
            self._search_idle.clear()
            self._show_title()
            self._search(self.search)
        else:
            self._show_rows(Numbered(self.store.rows))

    def _show_rows(self, rows: Sequence[tuple[int, Row]], *, preview_now: bool = True) -> None:
        self.shown = rows
        self.query_one(SampleTable).show(rows, self.reports)
        self._show_title()
        if preview_now:
            self._show_preview()
        else:  # after the rows are drawn: the first rendering imports jinja2 (0.4 s)
            self.call_after_refresh(self._show_preview)

    @work(exclusive=True, group="search", exit_on_error=False)
    async def _search(self, needle: str) -> None:
        """Filter in slices, letting keys in between; the next keystroke cancels this one."""
        rows_now = (self.store, self.store.edits, len(self.store.rows))
        last = self._last_search
        if last and last[1] == rows_now and last[0].lower() in needle.lower():
            candidates: Sequence[tuple[int, Row]] = last[2]  # typing on: only those can still match
        else:
            candidates = Numbered(list(self.store.rows))  # edits during the search start a new one
        found: list[tuple[int, Row]] = []
        try:
            for part in search_slices(candidates, needle):
                found += part
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise  # by the next keystroke, which searches again, or by clearing the search
        except BaseException:
            self._search_done()
            raise
        self._last_search = (needle, rows_now, found)
        self._search_done()
        self._show_rows(found)

    def _search_done(self) -> None:
        self._searching = False
        self._search_idle.set()

    def _show_title(self) -> None:
        store = self.store
        name = short_path(store.path, self.workspace)
        flagged = self.flagged
        parts = [f"[b]{escape(name)}[/b]"]
        if store.dirty:
            parts.append("[b yellow]● unsaved[/b yellow]")
        parts.append(f"{len(store.rows):,} samples")
        if self._reading:
            done, total = self._reading
            parts.append(f"[b]reading {100 * done // total}%[/b]")
        elif self._checking:
            done, total = self._checking
            parts.append(f"[dim]checking {100 * done // total}%[/dim]")
        if flagged:
            parts.append(f"[yellow]{flagged:,} with problems[/yellow]")
        if self._searching:
            parts.append(f"filter [i]{escape(self.search)}[/i]: searching…")
        elif self.search:
            parts.append(f"filter [i]{escape(self.search)}[/i]: {len(self.shown):,} shown")
        if not self._in_training_set():
            parts.append("[dim]not trained on (t adds it)[/dim]")
        self.query_one("#dataset-title", Label).update("  ·  ".join(parts))
        if store.dirty != self._was_dirty:
            self._was_dirty = store.dirty
            self.post_message(self.DirtyChanged(self, store.dirty))

    def _show_preview(self) -> None:
        row = self._current_row()
        report = self.reports.get(row.key) if row else None
        settings = CheckSettings.from_config(self.settings.config)
        shown = (row, report, self.tokenizer, settings)
        if shown != self._preview_of:  # rendering through the template costs: not for nothing
            self._preview_of = shown
            self.query_one(SamplePreview).show(*shown)
        key = row.key if row else None
        if key != self._previewed:
            # Another sample: start at its top, where its problems are listed.
            self._previewed = key
            self.query_one("#preview-scroll").scroll_home(animate=False)

    def _current_row(self) -> Row | None:
        index = self._current_index()
        return None if index is None else self.store.rows[index]

    def _current_index(self) -> int | None:
        """The highlighted sample's index in the file, or None (no rows, or it is gone)."""
        current = self.query_one(SampleTable).current
        if current is None:
            return None
        index, row = current
        rows = self.store.rows
        if 0 <= index < len(rows) and rows[index] is row:  # the common case: no search needed
            return index
        try:
            return self.store.index_of(row.key)
        except StopIteration:
            return None

    @on(SampleTable.RowHighlighted)
    def _row_highlighted(self) -> None:
        self._show_preview()

    @on(SampleTable.RowSelected)
    async def _row_selected(self) -> None:
        await self.action_edit()

    async def _search_settled(self) -> None:
        """Wait until the search typed so far has shown its rows. The pane's keys are priority
        bindings, so the keys after this one wait too: `d` deletes a row the person saw found."""
        try:
            await asyncio.wait_for(self._search_idle.wait(), SEARCH_WAIT_S)
        except asyncio.TimeoutError:
            pass  # never hold the keyboard for long: act on the rows shown

    def _editable(self) -> bool:
        """Edits need this TUI to be the file's writer (said why when not), and wait until the
        whole file is read (they would race the rows still arriving)."""
        if self._refused():
            return False
        if not self.store.loading:
            return True
        done, total = self._reading or (0, 1)
        self.notify(
            f"still reading {self.store.path.name} ({100 * done // total}%): edits wait until it is read",
            severity="warning",
            timeout=3,
        )
        return False

    def _focus_now(self, widget: Widget) -> None:
        # Widget.focus() waits its turn behind the keys already queued, which then go to the
        # widget that had the focus: text typed quickly into search ran the table's keys.
        self.screen.set_focus(widget)

    # ------------------------------------------------------------ editing

    def _edited(self, focus_key: str | None = None) -> None:
        if self.store.journal_error and self.store.journal_error != self._journal_warned:
            self._journal_warned = self.store.journal_error  # once, not on every edit
            self.notify(
                f"{self.store.journal_error}: unsaved edits would not survive a crash; ctrl+s saves",
                severity="warning",
                timeout=8,
            )
        self._redraw_table(edited=True)
        if focus_key:
            self.query_one(SampleTable).move_to(focus_key)
            self._show_preview()
        self._run_checks()
        self.autosaver.poke()

    def _refused(self) -> bool:
        """True (and says why) when this TUI may not change the file now."""
        if self.read_only:
            self.notify(self.read_only, severity="warning", timeout=8)
        return bool(self.read_only)

    def _check_one(self, row: Row) -> list[str]:
        return self.checker.check(row).problems

    async def action_add(self) -> None:
        await self._search_settled()
        if not self._editable():
            return
        template = NEW_RECORDS[self.store.majority_format()]
        row = Row.from_record(template)
        current = self._current_index()
        at = (len(self.store.rows) - 1 if current is None else current) + 1  # below the cursor

        def done(result: Row | None) -> None:
            if result is not None:
                self.store.insert(at, result)
                self._edited(result.key)

        self.app.push_screen(SampleEditor("New sample", row, self._check_one), done)

    async def action_edit(self) -> None:
        await self._search_settled()
        if not self._editable():
            return
        index = self._current_index()
        if index is None:
            self.notify("no sample selected", severity="warning")
            return
        row = self.store.rows[index]

        def done(result: Row | None) -> None:
            if result is not None and result.text != row.text:
                try:
                    at = self.store.index_of(row.key)
                except StopIteration:  # the file was reloaded meanwhile: keep the edit as a new row
                    at = self.store.insert(len(self.store.rows), result)
                    self._edited(result.key)
                    return
                self.store.replace(at, result)
                self._edited(row.key)

        self.app.push_screen(SampleEditor(f"Sample {index + 1}", row, self._check_one), done)

    async def action_duplicate(self) -> None:
        await self._search_settled()
        if not self._editable():
            return
        index = self._current_index()
        if index is not None:
            at = self.store.duplicate(index)
            self._edited(self.store.rows[at].key)

    async def action_delete(self) -> None:
        await self._search_settled()
        if not self._editable():
            return
        index = self._current_index()
        if index is None:
            return
        self.store.delete(index)
        rows = self.store.rows
        self._edited(rows[min(index, len(rows) - 1)].key if rows else None)
        self.notify(f"sample {index + 1} deleted: u undoes", timeout=3)

    async def action_undo(self) -> None:
        await self._search_settled()
        if not self._editable():
            return
        undone = self.store.undo()
        if undone is None:
            self.notify("nothing to undo", severity="warning")
            return
        what, index = undone
        self._edited(self.store.rows[index].key if index >= 0 else None)
        self.notify(f"undid {what}", timeout=2)

    def action_search(self) -> None:
        self._focus_now(self.query_one("#dataset-search", Input))

    @on(Input.Changed, "#dataset-search")
    def _search_changed(self, event: Input.Changed) -> None:
        self.search = event.value.strip()
        # The search starts once the key is on screen: the first key's search runs over every row,
        # and its slices (the event loop's, between looks at the keyboard) held back the key's
        # echo. Meanwhile the rows shown are the last search's: a key acting on them waits.
        if self.search:
            self._searching = True
            self._search_idle.clear()
        else:  # emptied key by key: a search still running must not show its rows afterwards
            self.workers.cancel_group(self, "search")
            self._search_done()
        self.call_after_refresh(self._redraw_table)

    async def action_enter(self) -> None:
        if self.app.focused is self.query_one(SampleTable):
            await self.action_edit()  # here, not through a message: keys typed next are the editor's
            return
        await self._search_settled()  # the next keys are for the rows found, not those before
        self._focus_now(self.query_one(SampleTable))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        focused = self.app.focused
        if action in _LETTER_ACTIONS:
            return not isinstance(focused, (Input, TextArea))  # there the key is text
        if action == "enter":  # in search, and in the table; elsewhere it is the focused widget's
            return focused is self.query_one("#dataset-search") or focused is self.query_one(SampleTable)
        return True

    def action_clear_search(self) -> None:
        self.query_one("#dataset-search", Input).value = ""
        self.search = ""
        self.workers.cancel_group(self, "search")
        self._search_done()
        self._redraw_table()
        self._focus_now(self.query_one(SampleTable))

    @on(IdentityBar.Changed)
    def _identity_changed(self, event: IdentityBar.Changed) -> None:
        if self.settings.text.get(event.name) == event.text:
            return
        self.settings.set(event.name, event.text)
        self.post_message(self.SettingsEdited(self, [event.name]))
        self.settings_changed()

    # ------------------------------------------------------------- saving

    def _autosave(self) -> None:
        """Write the file in a worker: the edits are in the journal already, so this can take
        its time (a second for 100 MB) while keys are answered."""
        if not self.store.dirty or self.store.loading:
            return
        if self._save_in_flight:  # one write at a time: the next begins when this one lands
            return
        try:
            pending = self.store.begin_save()
        except ReadOnlyFileError as exc:
            self._show_read_only(str(exc))  # the edits wait in the journal until it may be written
            return
        except UnsavableError:
            self._show_title()  # said on screen by the rows' marks; ctrl+s says which
            return
        self._save_in_flight = True
        self._write(self.store, pending)

    @work(thread=True, group="save", exit_on_error=False, description="save the dataset")
    def _write(self, store: DatasetStore, pending: PendingSave) -> None:
        try:
            store.write_save(pending)
        except ConflictError as exc:
            self.app.call_from_thread(self._save_refused, str(exc), True)
        except OSError as exc:
            self.app.call_from_thread(self._save_refused, f"could not save: {exc}", False)
        else:
            self.app.call_from_thread(self._saved_in_background, store, pending)

    def _saved_in_background(self, store: DatasetStore, pending: PendingSave) -> None:
        self._save_in_flight = False
        path = store.finish_save(pending)
        if store is self.store:
            self._after_save(path)
            if store.dirty:  # edited while it was written
                self.autosaver.poke()

    def _save_refused(self, message: str, conflict: bool) -> None:
        self._save_in_flight = False
        if conflict:
            self._ask_about_conflict(message)
        else:
            self.notify(message, severity="error", timeout=8)
        self._show_title()

    def action_save(self) -> None:
        if not self._refused():
            self.save()

    def save(self, *, quiet: bool = False, force: bool = False) -> bool:
        """Save now; False when it could not (a conflict or an unsavable row, said on screen)."""
        if self.store.loading:
            if not quiet:
                self._editable()  # says why
            return not self.store.dirty
        try:
            path = self.store.save(force=force)  # after any write in flight: the newest lands last
        except ReadOnlyFileError as exc:
            self._show_read_only(str(exc))  # the edits wait in the journal until it may be written
            self.notify(str(exc), severity="warning", timeout=8)
            return False
        except UnsavableError as exc:
            if not quiet:
                self.notify(str(exc), severity="warning", timeout=6)
            self._show_title()
            return False
        except ConflictError as exc:
            self._ask_about_conflict(str(exc))
            return False
        except OSError as exc:
            self.notify(f"could not save: {exc}", severity="error", timeout=8)
            return False
        if not quiet:
            self.notify(
                f"saved {path.name} (the version before this session is kept as {path.name}.bak)", timeout=3
            )
        self._after_save(path)
        return True

    def _after_save(self, path: Path) -> None:
        if path != self.store.path:  # a .json saved as .jsonl: edit and train on that from now on
            self._switch_dataset(self.store.path, path)
            self.store.path = path
        self._show_title()

    def _ask_about_conflict(self, what: str) -> None:
        if self._conflict_open:
            return
        self._conflict_open = True

        def answer(key: str) -> None:
            self._conflict_open = False
            if key == "r":
                self.store.discard_journal()  # the person chose to drop them
                self.load(self.store.path)
                self.notify("reloaded from disk; your unsaved edits were dropped")
            elif key == "o":
                self.save(force=True)
            else:
                self.notify("not saved: autosave waits until you choose (ctrl+s asks again)", timeout=5)

        self.app.push_screen(
            Choice(
                "The file changed on disk",
                f"{what}, by something other than this TUI.\nSaving now would overwrite that change.",
                {"r": "reload it (drop my edits)", "o": "overwrite (theirs kept as .bak)"},
            ),
            answer,
        )

    def _watch_disk(self) -> None:
        self._watch_access()
        if self._conflict_open or self._save_in_flight or self.store.loading:
            return
        if not self.store.changed_on_disk():
            return
        if not self.store.dirty:
            self.load(self.store.path)  # nothing to lose here: follow the file
            if not self.read_only:  # a reader follows the writer's saves without a word each time
                self.notify(f"{self.store.path.name} changed on disk: reloaded", timeout=3)
        else:
            self._ask_about_conflict(f"{self.store.save_path} changed on disk while you were editing")

    def _watch_access(self) -> None:
        """Take the file over when its writer leaves, and follow chmod either way."""
        if self.access is None:
            return
        read_only = self.access.check()
        if read_only == self.read_only:
            return
        if self.read_only and not read_only and not self.store.dirty:
            self.load(self.store.path)  # with the journal, should the writer have died mid-edit
            self.notify(f"{self.store.path.name} can be edited here now", timeout=4)
            return
        self._show_read_only(read_only)
        if not read_only:
            self.autosaver.poke()  # edits the file's mode held back

    def _show_read_only(self, reason: str) -> None:
        self.read_only = reason
        notice = self.query_one("#dataset-read-only", Label)
        notice.update(f"[b yellow]read-only[/b yellow]  {escape(reason)}")
        notice.display = bool(reason)

    def on_unmount(self) -> None:
        if self.access is not None:
            self.access.release()

    def flush(self) -> None:
        """Save pending edits now (the app is closing); never overwrites someone else's change."""
        if self.store.dirty:
            try:
                self.store.save()
            except (ConflictError, UnsavableError, OSError):
                pass

    # ------------------------------------------------------------ files

    def action_open(self) -> None:
        def picked(path: Path | None) -> None:
            if path is None or path == self.store.path:
                return
            if self.store.dirty and not self.save():
                self.notify("save or undo the edits here first", severity="warning")
                return
            self.load(path)

        self.app.push_screen(
            DatasetPicker(self.workspace / "datasets", self.workspace, self.store.path), picked
        )

    def _dataset_specs(self) -> list[str]:
        return list(self.settings.config.dataset)

    def _spec(self, spec: str) -> DatasetSpec | None:
        """A training-set entry as training reads it, its path absolute; None if it does not parse."""
        try:
            return parse_dataset_spec(spec, self.workspace)
        except DataError:
            return None

    def _in_training_set(self) -> bool:
        target = self.store.save_path.resolve()
        return any(
            parsed is not None and parsed.path.resolve() == target
            for parsed in map(self._spec, self._dataset_specs())
        )

    def action_train_on_file(self) -> None:
        if self._in_training_set():
            self.notify("this file is already in the training set")
            return
        relative = short_path(self.store.save_path, self.workspace)
        self.settings.update({"dataset": [*self._dataset_specs(), relative]})
        self.post_message(self.SettingsEdited(self, ["dataset"]))
        self._show_title()
        self.notify(f"training set: {' '.join(self.settings.config.dataset)}")

    def _switch_dataset(self, old: Path, new: Path) -> None:
        specs = self._dataset_specs()
        renamed = []
        for spec in specs:
            parsed = self._spec(spec)
            if parsed is not None and parsed.path.resolve() == old.resolve():
                spec = str(DatasetSpec(Path(short_path(new, self.workspace)), parsed.samples))  # count kept
            renamed.append(spec)
        if renamed != specs:
            self.settings.update({"dataset": renamed})
            self.post_message(self.SettingsEdited(self, ["dataset"]))
