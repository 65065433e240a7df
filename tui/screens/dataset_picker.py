"""Pick the dataset file to edit, or name a new one (created in datasets/)."""

from __future__ import annotations

from pathlib import Path

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label, OptionList
from textual.widgets.option_list import Option
from tunebench.tui.paths import short_path


class DatasetPicker(ModalScreen[Path | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, datasets_dir: Path, workspace: Path, current: Path) -> None:
        super().__init__()
        self.datasets_dir, self.workspace, self.current = datasets_dir, workspace, current

    def compose(self) -> ComposeResult:
        files = sorted(
            p for p in self.datasets_dir.glob("*") if p.suffix.lower() in (".jsonl", ".json") and p.is_file()
        )
        with Vertical(classes="dialog picker-dialog"):
            yield Label("[b]Open a dataset[/b]  [dim]enter opens · esc cancels[/dim]", classes="dialog-title")
            options = [Option(short_path(p, self.workspace), id=str(p)) for p in files]
            yield OptionList(*options, id="picker-files")
            yield Input(
                placeholder="or type a path, or a new file name, e.g. mine.jsonl",
                id="picker-new",
                compact=True,
                select_on_focus=False,  # the key that moved the focus here is already typed
            )
        # This screen's own keys at the bottom, not the stale ones of the screen beneath.
        yield Footer(compact=True)

    def on_mount(self) -> None:
        files = self.query_one(OptionList)
        for index in range(files.option_count):
            if files.get_option_at_index(index).id == str(self.current):
                files.highlighted = index

    def on_key(self, event: events.Key) -> None:
        # The list has the focus first; typing there starts a name or path in the input, so that
        # Enter opens what was typed rather than the highlighted file.
        path_input = self.query_one("#picker-new", Input)
        if event.is_printable and event.character and not path_input.has_focus:
            event.stop()
            path_input.focus()
            path_input.insert_text_at_cursor(event.character)

    def on_paste(self, event: events.Paste) -> None:
        path_input = self.query_one("#picker-new", Input)
        if not path_input.has_focus:
            event.stop()
            path_input.focus()
            path_input.insert_text_at_cursor(event.text.strip())

    @on(OptionList.OptionSelected)
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(Path(event.option.id or ""))

    @on(Input.Submitted)
    def _new(self, event: Input.Submitted) -> None:
        name = event.value.strip()
        if not name:
            return
        path = Path(name)
        if path.suffix.lower() not in (".jsonl", ".json"):
            path = path.with_name(path.name + ".jsonl")
        if not path.is_absolute():
            path = self.datasets_dir / path
        self.dismiss(path)
