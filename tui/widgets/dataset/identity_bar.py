"""Self-cognition fields: the name and author that fill {{NAME}} / {{AUTHOR}} in the samples.

They are the same settings as the form's model_name / model_author (one value, or two: Chinese
then English); editing them here updates the form, the command line and the preview at once.
Both values read whole: on one line where they fit side by side (each field as wide as its value,
the spare width shared), else a line each; a field left shows its value from the start.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.css.scalar import Scalar
from textual.message import Message
from textual.widgets import Input, Label

FIELDS = ("model_name", "model_author")


class IdentityBar(Horizontal):
    @dataclass
    class Changed(Message):
        identity_bar: IdentityBar
        name: str  # model_name or model_author
        text: str

        @property
        def control(self) -> IdentityBar:
            return self.identity_bar

    def compose(self) -> ComposeResult:
        yield Label("name", classes="identity-label")
        yield Input(placeholder="{{NAME}}, e.g. 小蜂 TuneBee", id="identity-model_name", compact=True)
        yield Label("author", classes="identity-label")
        yield Input(placeholder="{{AUTHOR}}", id="identity-model_author", compact=True)

    def show(self, texts: dict[str, str], errors: dict[str, str]) -> None:
        for name in FIELDS:
            field = self.query_one(f"#identity-{name}", Input)
            if field.value != texts[name] and not field.has_focus:
                field.value = texts[name]
            field.set_class(name in errors, "-invalid")
            field.tooltip = errors.get(name) or "one value, or two (Chinese then English); quote spaces"
        self._fit()

    def on_resize(self) -> None:
        self._fit()

    @on(Input.Blurred)
    def _left(self, event: Input.Blurred) -> None:
        event.input.cursor_position = 0  # scrolls it back: a long value reads from its start
        self._fit()

    def _fit(self) -> None:
        """One line when both values fit side by side, else a line each (`-stacked`). While a field
        is typed in, the layout changes only when its value outgrows it, so nothing jumps per key."""
        if not self.size.width:
            return  # not laid out yet: on_resize comes once it is
        inputs = list(self.query(Input))
        needed = [field.content_width for field in inputs]  # the value and a cursor cell
        room = self.content_size.width - sum(field.styles.margin.width for field in inputs)
        for label in self.query(Label):
            room -= label.get_content_width(self.size, self.size) + label.styles.gutter.width
        typing = any(field.has_focus for field in inputs)
        if typing and all(n <= field.content_size.width for n, field in zip(needed, inputs, strict=True)):
            return
        stacked = sum(needed) > room
        self.set_class(stacked, "-stacked")
        spare = max(0, room - sum(needed))
        for i, (n, field) in enumerate(zip(needed, inputs, strict=True)):
            share = spare // len(inputs) + (spare % len(inputs) if i == len(inputs) - 1 else 0)
            width = None if stacked else n + share  # stacked: the CSS's 1fr, the whole line
            if field.styles.width != (None if width is None else Scalar.from_number(width)):
                field.styles.width = width

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        event.stop()
        name = (event.input.id or "").removeprefix("identity-")
        self.post_message(self.Changed(self, name, event.value))
