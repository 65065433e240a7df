"""A multi-line editor for one sample: its JSON record, checked as you type."""

from __future__ import annotations

from collections.abc import Callable

import orjson
from rich.markup import escape
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static, TextArea
from tunebench.tui.widgets.dataset.dataset_store import Row


def pretty(row: Row) -> str:
    if not row.valid_json:
        return row.text  # the person's own text, to fix by hand
    return orjson.dumps(row.record, option=orjson.OPT_INDENT_2).decode()


class SampleEditor(ModalScreen[Row | None]):
    """Returns the edited Row, or None when cancelled. Escape twice discards changes."""

    BINDINGS = [
        Binding("ctrl+s", "apply", "Apply", priority=True),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, title: str, row: Row, check: Callable[[Row], list[str]]) -> None:
        super().__init__()
        self.title_text = title
        self.row = row
        self.original = pretty(row)
        self.check = check
        self._escape_armed = False
        self._closing_editor = False

    def compose(self) -> ComposeResult:
        with Vertical(id="editor-dialog", classes="dialog"):
            keys = "ctrl+s apply · esc cancel · f7 select all"
            yield Label(f"[b]{escape(self.title_text)}[/b]  [dim]{keys}[/dim]", id="editor-title")
            yield TextArea(self.original, id="editor-text", soft_wrap=True, tab_behavior="indent")
            yield Static("", id="editor-problems")

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()
        self._recheck()

    @on(TextArea.Changed)
    def _recheck(self) -> None:
        self._escape_armed = False
        row = Row.from_text(self.query_one(TextArea).text)
        problems = self.check(row)
        widget = self.query_one("#editor-problems", Static)
        if problems:
            widget.update(Text("\n".join(f"⚠ {p}" for p in problems), style="yellow"))
        else:
            widget.update(Text("✓ no problems", style="green"))

    def action_apply(self) -> None:
        if self._closing_editor:
            return  # a second ctrl+s before the screen has gone must not apply twice
        text = self.query_one(TextArea).text
        row = Row.from_text(text)
        if not row.valid_json:
            # Keeping it is allowed (nothing typed is lost), but the file will not save until fixed.
            self.notify(
                f"kept as text: {row.error}; fix it before the dataset can be saved", severity="warning"
            )
        self._closing_editor = True
        self.dismiss(row)

    def action_cancel(self) -> None:
        if self.query_one(TextArea).text != self.original and not self._escape_armed:
            self._escape_armed = True
            self.notify("unapplied changes: press escape again to discard them, ctrl+s to apply", timeout=3)
            return
        self.dismiss(None)
