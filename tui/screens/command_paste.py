"""Paste a `swift sft ...` or `tunebench train ...` command: the Parameters form takes its settings.

The command is read as `tunebench train` reads its flags (engine/core/train_flags.values_from_command;
the shell script around it by engine/core/pasted_command.py), so a flag that the command line
refuses is refused here too, with the same words; the pasted text stays in the box until it reads."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, Static, TextArea
from tunebench.engine.core.config import ConfigError
from tunebench.engine.core.errors import UserError
from tunebench.engine.core.train_flags import values_from_command

from .confirm import keys_line


class CommandPaste(ModalScreen[tuple[dict[str, Any], list[str], str] | None]):
    """Returns the command's values, its notes and its text; None on escape."""

    BINDINGS = [
        Binding("ctrl+s", "apply", "Apply"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, text: str = "") -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="paste-dialog"):
            yield Label("[b]Set the form from a command[/b]", classes="dialog-title")
            yield Static(
                "Paste a `swift sft ...` or `tunebench train ...` command as copied: continued "
                "lines, comments and `name=value` lines are read as a shell reads them. The form "
                "takes the settings it gives; the others go back to their defaults.",
                classes="dialog-body",
                markup=False,
            )
            yield TextArea(self.text, id="paste-text", soft_wrap=True, show_line_numbers=False)
            yield Static("", id="paste-error", classes="dialog-hint", markup=False)
            yield Static(keys_line({"ctrl+s": "apply", "esc": "cancel"}), classes="dialog-keys")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    def action_apply(self) -> None:
        text = self.query_one(TextArea).text
        try:
            values, notes = values_from_command(text)
        except (UserError, ConfigError) as exc:
            self.query_one("#paste-error", Static).update(str(exc))
            return
        if not values:
            self.query_one("#paste-error", Static).update("the command sets nothing: paste one with flags")
            return
        self.dismiss((values, notes, text))

    def action_cancel(self) -> None:
        self.dismiss(None)


def applied_line(values: dict[str, Any], notes: list[str]) -> str:
    """The notice after a command was taken: what it set, and what it set nothing for."""
    line = f"{len(values)} setting{'s' * (len(values) != 1)} from the command: {', '.join(values)}"
    if notes:
        line += "\n" + "\n".join(f"note: {escape(n)}" for n in notes)
    return line
