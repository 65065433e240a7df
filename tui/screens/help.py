"""`?`: every key, per pane, read from the same Binding lists the panes use (so it cannot drift)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("question_mark", "dismiss(None)", "Close", show=False),
        Binding("q", "dismiss(None)", "Close", show=False),
    ]

    def __init__(self, sections: list[tuple[str, list[Binding]]]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="help-dialog"):
            yield Label(
                "[b]Keys[/b]  [dim]esc closes · ctrl+p searches every action[/dim]", classes="dialog-title"
            )
            with VerticalScroll():
                yield Static(self._table())

    def _table(self) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(justify="right", style="bold cyan", no_wrap=True)
        table.add_column()
        for title, bindings in self.sections:
            table.add_row(Text(title, style="bold underline"), "")
            # One line per action: "1 / f2  Go to Dataset", not one line per key.
            keys: dict[str, list[str]] = {}
            what: dict[str, str] = {}
            for binding in bindings:
                keys.setdefault(binding.action, []).append(self.app.get_key_display(binding))
                what.setdefault(binding.action, binding.description or binding.action)
            for action, shown in keys.items():
                table.add_row(" / ".join(shown), what[action])
            table.add_row("", "")
        return table

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()  # up / down / page keys scroll the list
