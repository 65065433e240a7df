"""Shown when the engine process is gone: restart it, or quit. Nothing on disk is lost either way."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, Static

from .confirm import keys_line


class EngineLost(ModalScreen[str]):
    BINDINGS = [
        Binding("r", "dismiss('restart')", "Restart engine"),
        Binding("q", "dismiss('quit')", "Quit"),
        Binding("escape", "dismiss('')", "Work offline"),
    ]

    def __init__(self, reason: str, log_file: str) -> None:
        super().__init__()
        self.reason, self.log_file = reason, log_file

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog choice-dialog", id="engine-lost"):
            yield Label("[b]The engine stopped[/b]", classes="dialog-title")
            yield Static(
                f"{self.reason}.\nDatasets, settings and saved checkpoints are on disk; a run that was "
                f"going can be resumed from its last checkpoint (Train pane, r).\n"
                f"The engine's log: {self.log_file}",
                classes="dialog-body",
                markup=False,  # the reason comes from the engine, brackets and all
            )
            keys = {"r": "restart the engine", "q": "quit", "esc": "stay offline"}
            yield Static(keys_line(keys), classes="dialog-keys")
        # This screen's own keys at the bottom, not the stale ones of the screen beneath.
        yield Footer(compact=True)
