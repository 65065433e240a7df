"""A multi-line editor for one sample, checked as you type.

A single-turn sample opens as text fields (system, prompt, answer: no JSON to get wrong); a
multi-turn one, or one that is not valid JSON, opens as its JSON record. F8 switches between
the two views whenever the sample fits the fields.
"""

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
from textual.widgets import Footer, Label, Static, TextArea
from tunebench.tui.widgets.dataset.dataset_store import Row
from tunebench.tui.widgets.dataset.sample_fields import SampleFields, join_fields, split_fields


def pretty(row: Row) -> str:
    if not row.valid_json:
        return row.text  # the person's own text, to fix by hand
    return orjson.dumps(row.record, option=orjson.OPT_INDENT_2).decode()


class SampleEditor(ModalScreen[Row | None]):
    """Returns the edited Row, or None when cancelled. Escape twice discards changes."""

    BINDINGS = [
        Binding("ctrl+s", "apply", "Apply", priority=True),
        Binding("f8", "toggle_view", "Fields / JSON", priority=True),
        Binding("escape", "cancel", "Cancel", tooltip="Cancel (with changes: twice discards them)"),
    ]
    HELP_KEYS = (
        ("tab / shift+tab", "next / previous field"),
        ("f7 / f6", "select all / the line, to type over it"),
        ("ctrl+z / ctrl+y", "undo / redo typing"),
    )

    def __init__(self, title: str, row: Row, check: Callable[[Row], list[str]]) -> None:
        super().__init__()
        self.title_text = title
        self.row = row
        self.check = check
        self.fields = split_fields(row.record) if row.valid_json else None
        self._fields_base = row.record  # the record the fields are written back into
        self._escape_armed = False
        self._closing_editor = False

    def compose(self) -> ComposeResult:
        with Vertical(id="editor-dialog", classes="dialog"):
            keys = "ctrl+s apply · esc cancel · tab next field · f8 JSON view"
            yield Label(f"[b]{escape(self.title_text)}[/b]  [dim]{keys}[/dim]", id="editor-title")
            with Vertical(id="editor-fields"):
                if self.fields is not None:
                    yield from self._field_areas(self.fields)
            yield TextArea(pretty(self.row), id="editor-text", soft_wrap=True, tab_behavior="indent")
            yield Static("", id="editor-problems")
        # This screen's own keys at the bottom, not the stale ones of the screen beneath.
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self._show(fields=self.fields is not None)

    # ---------------------------------------------------------------- views
    @property
    def showing_fields(self) -> bool:
        return self.query_one("#editor-fields").display

    def _show(self, fields: bool) -> None:
        self.query_one("#editor-fields").display = fields
        self.query_one("#editor-text", TextArea).display = not fields
        if fields:
            first = "output" if self.fields and self.fields.style == "alpaca" else "assistant"
            empty = [a for a in self.query(".editor-field").results(TextArea) if not a.text.strip()]
            # a new sample starts at its first empty field; an existing one at its answer
            target = next((a for a in empty if not a.id.endswith("system")), None)
            (target or self.query_one(f"#field-{first}", TextArea)).focus()
        else:
            self.query_one("#editor-text", TextArea).focus()
        self._recheck()

    def action_toggle_view(self) -> None:
        if self.showing_fields:
            self.query_one("#editor-text", TextArea).text = pretty(self._current_row())
            self._show(fields=False)
            return
        row = Row.from_text(self.query_one("#editor-text", TextArea).text)
        fields = split_fields(row.record) if row.valid_json else None
        if fields is None:
            reason = row.error or "it is not one exchange (several turns, or history)"
            self.notify(f"fields view unavailable: {reason}", severity="warning")
            return
        self.fields = fields
        self._fields_base = row.record
        self.query_one("#editor-fields").remove_children()
        self.query_one("#editor-fields").mount_all(self._field_areas(fields))
        self.call_after_refresh(self._show, True)

    def _field_areas(self, fields: SampleFields) -> list[TextArea]:
        areas = []
        for key, label in fields.labels():
            area = TextArea(fields.values[key], id=f"field-{key}", soft_wrap=True, tab_behavior="focus")
            area.border_title = label
            area.add_class("editor-field", f"editor-field-{key}")
            areas.append(area)
        return areas

    def _current_row(self) -> Row:
        if not self.showing_fields or self.fields is None:
            return Row.from_text(self.query_one("#editor-text", TextArea).text)
        values = {key: self.query_one(f"#field-{key}", TextArea).text for key in self.fields.values}
        record = join_fields(self._fields_base, SampleFields(self.fields.style, values))
        return self.row if record == self.row.record else Row.from_record(record)

    # ---------------------------------------------------------------- checks and exits
    @on(TextArea.Changed)
    def _recheck(self) -> None:
        self._escape_armed = False
        problems = self.check(self._current_row())
        widget = self.query_one("#editor-problems", Static)
        if problems:
            widget.update(Text("\n".join(f"⚠ {p}" for p in problems), style="yellow"))
        else:
            widget.update(Text("✓ no problems", style="green"))

    def _changed(self) -> bool:
        row = self._current_row()
        if row.valid_json and self.row.valid_json:
            return row.record != self.row.record
        return row.text != self.row.text

    def action_apply(self) -> None:
        if self._closing_editor:
            return  # a second ctrl+s before the screen has gone must not apply twice
        row = self._current_row()
        if not row.valid_json:
            # Keeping it is allowed (nothing typed is lost), but the file will not save until fixed.
            self.notify(
                f"kept as text: {row.error}; fix it before the dataset can be saved", severity="warning"
            )
        self._closing_editor = True
        self.dismiss(row)

    def action_cancel(self) -> None:
        if self._changed() and not self._escape_armed:
            self._escape_armed = True
            self.notify("unapplied changes: press escape again to discard them, ctrl+s to apply", timeout=3)
            return
        self.dismiss(None)
