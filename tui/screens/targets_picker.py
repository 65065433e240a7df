"""Choose the Chat pane's columns: the base model and any adapters or checkpoints."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, SelectionList
from tunebench.tui.widgets.chat.column_choices import ColumnChoice, columns_problem


class TargetsPicker(ModalScreen[list[ColumnChoice] | None]):
    BINDINGS = [
        Binding("enter", "done", "Use these", priority=True),
        Binding("escape", "dismiss(None)", "Cancel"),
    ]

    def __init__(self, available: list[ColumnChoice], chosen: list[ColumnChoice]) -> None:
        super().__init__()
        self.available = available
        self.chosen = {t.path for t in chosen}

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog picker-dialog"):
            yield Label(
                "[b]Chat columns[/b]  [dim]space toggles · enter uses them · esc cancels[/dim]",
                classes="dialog-title",
            )
            yield SelectionList[str](
                *[(t.label, t.path, t.path in self.chosen) for t in self.available], id="targets"
            )
        # This screen's own keys at the bottom, not the stale ones of the screen beneath.
        yield Footer(compact=True)

    def action_done(self) -> None:
        picked = set(self.query_one(SelectionList).selected)
        targets = [t for t in self.available if t.path in picked]
        if not targets:
            self.notify("choose at least one column", severity="warning")
            return
        problem = columns_problem(targets)
        if problem:
            self.notify(problem, severity="error")
            return
        self.dismiss(targets)
