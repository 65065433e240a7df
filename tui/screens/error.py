"""One modal for every failure a person should read: what happened and what to do."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, Static

from .confirm import keys_line


class ErrorScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("enter", "dismiss(None)", "Close", show=False),
    ]

    def __init__(self, title: str, message: str, hint: str = "") -> None:
        super().__init__()
        self.title_text, self.message, self.hint = title, message, hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog error-dialog"):
            yield Label(f"[b]{escape(self.title_text)}[/b]", classes="dialog-title")
            with VerticalScroll(classes="dialog-scroll"):
                yield Static(self.message, classes="dialog-body", markup=False)
                if self.hint:
                    yield Static(f"what to do: {self.hint}", classes="dialog-hint", markup=False)
            yield Static(keys_line({"esc": "close"}), classes="dialog-keys")
        # This screen's own keys at the bottom, not the stale ones of the screen beneath.
        yield Footer(compact=True)
