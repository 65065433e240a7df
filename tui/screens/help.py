"""`?`: every key, per pane, read from the same Binding lists the panes use (so it cannot drift)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, Static


@dataclass(frozen=True)
class HelpSection:
    """One block of the help: a pane's bindings, plus keys its widgets handle themselves
    (`more`: enter on a table row, tab between fields), as (keys, what they do)."""

    title: str
    bindings: list[Binding]
    more: Sequence[tuple[str, str]] = ()


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("question_mark", "dismiss(None)", "Close", show=False),
        Binding("q", "dismiss(None)", "Close", show=False),
    ]

    def __init__(self, sections: list[HelpSection]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="help-dialog"):
            yield Label(
                "[b]Keys[/b]  [dim]esc closes · ctrl+p searches every action[/dim]", classes="dialog-title"
            )
            with VerticalScroll():
                yield Static(self._table())
        # This screen's own keys at the bottom, not the stale ones of the screen beneath.
        yield Footer(compact=True)

    def rows(self) -> list[tuple[str, str]]:
        """(keys, what they do) per line; a section starts with (title, "")."""
        rows: list[tuple[str, str]] = []
        for section in self.sections:
            rows.append((section.title, ""))
            # One line per action: "1 / f2  Go to Dataset", not one line per key.
            keys: dict[str, list[str]] = {}
            what: dict[str, str] = {}
            for binding in section.bindings:
                keys.setdefault(binding.action, []).append(self.app.get_key_display(binding))
                what.setdefault(binding.action, binding.tooltip or binding.description or binding.action)
            rows += [(" / ".join(shown), what[action]) for action, shown in keys.items()]
            rows += [(shown, text[:1].upper() + text[1:]) for shown, text in section.more]
        return rows

    def _table(self) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(justify="right", style="bold cyan", no_wrap=True)
        table.add_column()
        titles = {section.title for section in self.sections}
        for index, (keys, what) in enumerate(self.rows()):
            if not what and keys in titles:
                if index:
                    table.add_row("", "")
                table.add_row(Text(keys, style="bold underline"), "")
            else:
                table.add_row(keys, what)
        return table

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()  # up / down / page keys scroll the list
