"""The Dataset pane: a table of samples to add, edit, duplicate, delete (with undo) and search,
checks on every row, the selected sample rendered through the chat template, and safe saving.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Input, Label
from tunebench.engine.core.data import DataError, DatasetSpec, parse_dataset_spec
from tunebench.tui.debounce import Debouncer
from tunebench.tui.paths import short_path
from tunebench.tui.screens.confirm import Choice
from tunebench.tui.screens.dataset_picker import DatasetPicker
from tunebench.tui.screens.sample_editor import SampleEditor

from ..params.settings_store import TrainSettings
from .dataset_store import NEW_RECORDS, ConflictError, DatasetStore, ReadOnlyFileError, Row, UnsavableError
from .identity_bar import IdentityBar
from .light_tokenizer import LightTokenizer, load_for_model
from .row_checks import CheckSettings, RowChecker, RowReport
from .sample_preview import SamplePreview
from .sample_table import SampleTable
from .write_access import WriteAccess

AUTOSAVE_DELAY_S = 1.0  # after the last edit; a crash loses at most the sample being typed
DISK_CHECK_S = 2.0


class DatasetPane(Vertical):
    BINDINGS = [
        Binding("a", "add", "Add"),
        Binding("e", "edit", "Edit"),
        Binding("c", "duplicate", "Duplicate", show=False),
        Binding("d", "delete", "Delete"),
        Binding("u", "undo", "Undo"),
        Binding("slash", "search", "Search"),
        Binding("ctrl+s", "save", "Save"),
        Binding("o", "open", "Open file", show=False),
        Binding("t", "train_on_file", "Train on file", show=False),
        Binding(
            "escape",
            "clear_search",
            "Clear search",
            show=False,
            tooltip="Clear the search, or leave the name / author field: back to the table",
        ),
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
        self.search = ""
        self.autosaver = Debouncer(self, AUTOSAVE_DELAY_S, self._autosave)
        self._conflict_open = False
        self._was_dirty = False
        self._journal_warned = ""
        self._previewed: str | None = None  # the row the preview shows
        self.access: WriteAccess | None = None  # the lock that makes this TUI the file's writer
        self.read_only = ""  # why this TUI may not write the file now ("" when it may)

    def compose(self) -> ComposeResult:
        yield Label("", id="dataset-title")
        yield Label("", id="dataset-read-only")
        yield IdentityBar(id="identity")
        yield Input(placeholder="search samples (esc clears)", id="dataset-search", compact=True)
        yield SampleTable(id="sample-table")
        with VerticalScroll(id="preview-scroll"):
            yield SamplePreview(id="sample-preview")

    def on_mount(self) -> None:
        self.query_one("#dataset-search").display = False
        self.query_one("#dataset-read-only").display = False
        self.query_one(IdentityBar).show(self.settings.text, self.settings.errors)
        self.load(self.store.path)
        self.settings_changed()
        self.set_interval(DISK_CHECK_S, self._watch_disk)

    # ------------------------------------------------------------- loading

    def load(self, path: Path) -> None:
        store = DatasetStore(path)
        access = self.access
        if access is None or access.data_path != store.save_path:
            access = WriteAccess(store.save_path, self.workspace)
        read_only = access.check()  # before reading: the writer's saves land whole, under its lock
        try:
            store.load()
            # A journal here belongs to the writer: replayed only by the writer, never by a reader
            # (which would replay, or set aside, edits that are still being made).
            recovery = None if read_only else store.recover()
        except (OSError, ValueError) as exc:
            if access is not self.access:
                access.release()
            self.notify(f"cannot open {path}: {exc}", severity="error", timeout=8)
            return
        if access is not self.access and self.access is not None:
            self.access.release()  # another file now: the one left is free for others to edit
        self.access, self.store = access, store
        self._show_read_only(read_only)
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

    @work(thread=True, exclusive=True, group="checks", exit_on_error=False)
    def _run_checks(self) -> None:
        rows = list(self.store.rows)
        reports = self.checker.check_all(rows)
        self.app.call_from_thread(self._checks_ready, reports)

    def _checks_ready(self, reports: dict[str, RowReport]) -> None:
        self.reports = reports
        self._redraw_table()

    # ------------------------------------------------------------- drawing

    def _visible_rows(self) -> list[tuple[int, Row]]:
        needle = self.search.lower()
        rows = list(enumerate(self.store.rows))
        if not needle:
            return rows
        return [(i, row) for i, row in rows if needle in row.text.lower()]

    def _redraw_table(self) -> None:
        self.query_one(SampleTable).show(self._visible_rows(), self.reports)
        self._show_title()
        self._show_preview()

    def _show_title(self) -> None:
        store = self.store
        name = short_path(store.path, self.workspace)
        flagged = sum(1 for r in self.reports.values() if r.problems)
        parts = [f"[b]{escape(name)}[/b]"]
        if store.dirty:
            parts.append("[b yellow]● unsaved[/b yellow]")
        parts.append(f"{len(store.rows)} samples")
        if flagged:
            parts.append(f"[yellow]{flagged} with problems[/yellow]")
        if self.search:
            parts.append(f"filter [i]{escape(self.search)}[/i]: {len(self._visible_rows())} shown")
        if not self._in_training_set():
            parts.append("[dim]not trained on (t adds it)[/dim]")
        self.query_one("#dataset-title", Label).update("  ·  ".join(parts))
        if store.dirty != self._was_dirty:
            self._was_dirty = store.dirty
            self.post_message(self.DirtyChanged(self, store.dirty))

    def _show_preview(self) -> None:
        row = self._current_row()
        report = self.reports.get(row.key) if row else None
        self.query_one(SamplePreview).show(
            row, report, self.tokenizer, CheckSettings.from_config(self.settings.config)
        )
        key = row.key if row else None
        if key != self._previewed:
            # Another sample: start at its top, where its problems are listed.
            self._previewed = key
            self.query_one("#preview-scroll").scroll_home(animate=False)

    def _current_row(self) -> Row | None:
        key = self.query_one(SampleTable).current_key
        if key is None:
            return None
        try:
            return self.store.rows[self.store.index_of(key)]
        except StopIteration:
            return None

    def _current_index(self) -> int | None:
        key = self.query_one(SampleTable).current_key
        try:
            return self.store.index_of(key) if key else None
        except StopIteration:
            return None

    @on(DataTable.RowHighlighted)
    def _row_highlighted(self) -> None:
        self._show_preview()

    @on(DataTable.RowSelected)
    def _row_selected(self) -> None:
        self.action_edit()

    # ------------------------------------------------------------ editing

    def _edited(self, focus_key: str | None = None) -> None:
        if self.store.journal_error and self.store.journal_error != self._journal_warned:
            self._journal_warned = self.store.journal_error  # once, not on every edit
            self.notify(
                f"{self.store.journal_error}: unsaved edits would not survive a crash; ctrl+s saves",
                severity="warning",
                timeout=8,
            )
        self._redraw_table()
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

    def action_add(self) -> None:
        if self._refused():
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

    def action_edit(self) -> None:
        index = self._current_index()
        if index is None:
            self.notify("no sample selected", severity="warning")
            return
        if self._refused():
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

    def action_duplicate(self) -> None:
        if self._refused():
            return
        index = self._current_index()
        if index is not None:
            at = self.store.duplicate(index)
            self._edited(self.store.rows[at].key)

    def action_delete(self) -> None:
        if self._refused():
            return
        index = self._current_index()
        if index is None:
            return
        self.store.delete(index)
        rows = self.store.rows
        self._edited(rows[min(index, len(rows) - 1)].key if rows else None)
        self.notify(f"sample {index + 1} deleted: u undoes", timeout=3)

    def action_undo(self) -> None:
        if self._refused():
            return
        undone = self.store.undo()
        if undone is None:
            self.notify("nothing to undo", severity="warning")
            return
        what, index = undone
        self._edited(self.store.rows[index].key if index >= 0 else None)
        self.notify(f"undid {what}", timeout=2)

    def action_search(self) -> None:
        field = self.query_one("#dataset-search", Input)
        field.display = True
        field.focus()

    @on(Input.Changed, "#dataset-search")
    def _search_changed(self, event: Input.Changed) -> None:
        self.search = event.value.strip()
        self._redraw_table()

    @on(Input.Submitted, "#dataset-search")
    def _search_done(self) -> None:
        self.query_one(SampleTable).focus()

    def action_clear_search(self) -> None:
        field = self.query_one("#dataset-search", Input)
        field.value = ""
        field.display = False
        self.search = ""
        self._redraw_table()
        self.query_one(SampleTable).focus()

    @on(IdentityBar.Changed)
    def _identity_changed(self, event: IdentityBar.Changed) -> None:
        if self.settings.text.get(event.name) == event.text:
            return
        self.settings.set(event.name, event.text)
        self.post_message(self.SettingsEdited(self, [event.name]))
        self.settings_changed()

    # ------------------------------------------------------------- saving

    def _autosave(self) -> None:
        if self.store.dirty:
            self.save(quiet=True)

    def action_save(self) -> None:
        if not self._refused():
            self.save()

    def save(self, *, quiet: bool = False, force: bool = False) -> bool:
        """Save now; False when it could not (a conflict or an unsavable row, said on screen)."""
        try:
            path = self.store.save(force=force)
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
        if path != self.store.path:  # a .json saved as .jsonl: edit and train on that from now on
            self._switch_dataset(self.store.path, path)
            self.store.path = path
        self._show_title()
        return True

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
        if self._conflict_open or not self.store.changed_on_disk():
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
