"""A small question with a few keyed answers; returns the key chosen, or "" on escape."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, Static


def keys_line(keys: dict[str, str]) -> str:
    """'[r] reload  [o] overwrite' as markup: the keys a dialog answers to, in one line."""
    return "   ".join(f"[b reverse] {key} [/] {what}" for key, what in keys.items())


class Choice(ModalScreen[str]):
    """`choices` maps a key to what it does, e.g. {"r": "reload from disk", "o": "overwrite"}."""

    BINDINGS = [Binding("escape", "choose('')", "Cancel")]

    def __init__(self, title: str, body: str, choices: dict[str, str]) -> None:
        super().__init__()
        self.title_text, self.body, self.choices = title, body, choices

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog choice-dialog"):
            yield Label(f"[b]{escape(self.title_text)}[/b]", classes="dialog-title")
            yield Static(self.body, classes="dialog-body", markup=False)
            yield Static(keys_line({**self.choices, "esc": "cancel"}), classes="dialog-keys")
        # This screen's own keys at the bottom, not the stale ones of the screen beneath.
        yield Footer(compact=True)

    def on_key(self, event) -> None:
        if event.key in self.choices:
            event.stop()
            self.dismiss(event.key)

    def action_choose(self, key: str) -> None:
        self.dismiss(key)
