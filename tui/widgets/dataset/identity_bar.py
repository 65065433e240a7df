"""Self-cognition fields: the name and author that fill {{NAME}} / {{AUTHOR}} in the samples.

They are the same settings as the form's model_name / model_author (one value, or two: Chinese
then English); editing them here updates the form, the command line and the preview at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
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

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        event.stop()
        name = (event.input.id or "").removeprefix("identity-")
        self.post_message(self.Changed(self, name, event.value))
