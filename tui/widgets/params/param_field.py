"""One row of the parameter form, built from a TrainConfig field's metadata.

The control follows the field: a Switch for a bool, a Select for a field with `choices`, an Input
otherwise (a list field takes space-separated values, as on the command line). The error line
under the control appears only while the text is wrong.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import get_type_hints

from rich.cells import cell_len
from textual import events, on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Input, Label, Select, Static, Switch
from tunebench.engine.core.config import TrainConfig

_HINTS = get_type_hints(TrainConfig)


def bounds_text(f: dataclasses.Field) -> str:
    """ "1..1024", "> 0, <= 1": the limits the form enforces, in a few characters."""
    meta = f.metadata
    if "min" in meta and "max" in meta:
        return f"{meta['min']}..{meta['max']}"
    parts = []
    if "min" in meta:
        parts.append(f">= {meta['min']}")
    if "gt" in meta:
        parts.append(f"> {meta['gt']}")
    if "max" in meta:
        parts.append(f"<= {meta['max']}")
    return ", ".join(parts)


def hint_that_fits(help_text: str, width: int) -> str:
    """An empty field's placeholder: as many of its help's leading clauses as fit in `width` cells.

    A clause cut mid-way reads as a different statement ("empty = the"), so whole clauses go;
    the first alone, cut with an ellipsis, where not even it fits. The whole help shows under the
    form when the field has the focus."""
    if cell_len(help_text) <= width:
        return help_text
    clauses = re.split(r"(?<=[:;,])\s+", help_text)
    fitting = ""
    for n in range(1, len(clauses) + 1):
        candidate = " ".join(clauses[:n]).rstrip(":;,")
        if cell_len(candidate) > width:
            break
        fitting = candidate
    if fitting:
        return fitting
    first, cut = clauses[0].rstrip(":;,"), ""
    for char in first:
        if cell_len(cut + char) > max(0, width - 1):
            break
        cut += char
    return cut + "…"


class ParamField(Vertical):
    """Label, control and error line for one TrainConfig field."""

    @dataclass
    class Edited(Message):
        """The person changed the field's text (sent on every keystroke, so errors show as typed)."""

        param_field: ParamField
        name: str
        text: str

        @property
        def control(self) -> ParamField:
            return self.param_field

    def __init__(self, f: dataclasses.Field, text: str) -> None:
        super().__init__(id=f"field-{f.name}", classes="param-field")
        self.field = f
        self._text = text  # what the form last knew; an echo of it is not an edit
        self._error: str | None = None
        self._note = ""  # said under the field while there is no error (show_note)

    def compose(self) -> ComposeResult:
        f = self.field
        with Horizontal(classes="param-row"):
            yield Label(f.name, classes="param-name")
            yield self._make_control()
            yield Label(self._side_text(self._text), classes="param-bounds")
        yield Static("", classes="param-error")

    def _side_text(self, text: str) -> str:
        # A Switch is a small coloured block; say "on" / "off" beside it so it reads in any theme.
        if _HINTS[self.field.name] is bool:
            return "on" if text == "true" else "off"
        return bounds_text(self.field)

    def _make_control(self) -> Widget:
        f, text = self.field, self._text
        tooltip = f.metadata["help"]
        if _HINTS[f.name] is bool:
            control: Widget = Switch(value=text == "true", id=f"input-{f.name}", classes="param-control")
        elif "choices" in f.metadata:
            options = [(str(c), str(c)) for c in f.metadata["choices"]]
            control = Select(
                options,
                value=text if text in dict(options) else options[0][1],
                allow_blank=False,
                compact=True,
                id=f"input-{f.name}",
                classes="param-control",
            )
        else:
            control = Input(
                value=text,
                placeholder=f.metadata["help"],
                compact=True,
                id=f"input-{f.name}",
                classes="param-control",
            )
        control.tooltip = tooltip
        return control

    def on_resize(self, event: events.Resize) -> None:
        control = self.query_one(".param-control")
        if isinstance(control, Input) and control.content_size.width > 0:
            control.placeholder = hint_that_fits(self.field.metadata["help"], control.content_size.width)

    # ------------------------------------------------------------ public API

    def show(self, text: str, error: str | None) -> None:
        """Put text (set from elsewhere, e.g. the Dataset pane) and the current error on screen."""
        control = self.query_one(".param-control")
        # Set before the control changes, so the Changed it posts is not taken for an edit.
        self._text = text
        if isinstance(control, Input) and control.value != text:
            control.value = text
        elif isinstance(control, Switch):
            control.value = text == "true"
            self.query_one(".param-bounds", Label).update(self._side_text(text))
        elif isinstance(control, Select) and control.value != text:
            control.value = text
        self.show_error(error)

    def show_error(self, error: str | None) -> None:
        if error == self._error:
            return  # every keystroke re-checks the whole form; redraw only rows that changed
        self._error = error
        self.set_class(bool(error), "-invalid")
        self.query_one(".param-error", Static).update(error or self._note)

    def show_note(self, note: str) -> None:
        """A line under the field saying what the run does while the field is empty (an error,
        when there is one, takes the line)."""
        self._note = note
        self.set_class(bool(note), "-noted")
        if not self._error:
            self.query_one(".param-error", Static).update(note)

    # -------------------------------------------------------------- events

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._edited(event.value)

    @on(Switch.Changed)
    def _switch_changed(self, event: Switch.Changed) -> None:
        event.stop()
        text = "true" if event.value else "false"
        self.query_one(".param-bounds", Label).update(self._side_text(text))
        self._edited(text)

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self._edited(str(event.value))

    def _edited(self, text: str) -> None:
        if text == self._text:
            return
        self._text = text
        self.post_message(self.Edited(self, self.field.name, text))
