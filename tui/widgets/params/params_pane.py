"""The Parameters pane: a form generated from TrainConfig's field metadata, checked as you type.

Every field, its control, its bounds and its help come from engine/core/config.py, so the form, the
CLI flags and the validation cannot disagree. Valid values are written to tunebench.toml shortly
after each edit; the equivalent command line sits under the form, ready to copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Label, Static
from tunebench.engine.core.config import to_command

from ...debounce import Debouncer
from ...screens.command_paste import CommandPaste, applied_line
from .command_line import CommandLine
from .param_field import ParamField
from .settings_store import TrainSettings

GROUP_TITLES = {
    "model": "Model",
    "lora": "LoRA",
    "data": "Data",
    "optim": "Optimisation",
    "schedule": "Schedule and checkpoints",
    "output": "Output",
}
HELP_HINT = "[dim]tab / shift+tab move between fields · esc leaves one · ctrl+r resets it[/dim]"
SAVE_DELAY_S = 0.4  # write tunebench.toml once typing pauses, not on every keystroke


class ParamsPane(Vertical):
    BINDINGS = [
        Binding("escape", "leave_field", "Leave field", tooltip="Leave the field, so 1-5 switch panes again"),
        Binding("enter", "focus_field", "Edit field", tooltip="Back into the field last edited"),
        Binding("ctrl+y", "copy_command", "Copy command", tooltip="Copy the tunebench train command"),
        Binding("ctrl+r", "reset_field", "Reset field", tooltip="Reset the field to its default"),
        Binding(
            "ctrl+o",
            "paste_command",
            "Paste command",
            tooltip="Set the form from a pasted swift sft or tunebench train command",
        ),
        Binding("ctrl+z", "undo_paste", "Undo paste", tooltip="Put the form back as it was before the paste"),
    ]
    HELP_KEYS = (
        ("tab / shift+tab", "next / previous field (the command under the form comes last)"),
        ("enter / space", "open a choice list, or flip a switch"),
        ("↑ ↓ pgup pgdn", "out of a field: scroll the form"),
    )

    @dataclass
    class Changed(Message):
        """Form values changed (already applied to the shared TrainSettings)."""

        pane: ParamsPane
        names: list[str]

        @property
        def control(self) -> ParamsPane:
            return self.pane

    def __init__(self, settings: TrainSettings, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.saver = Debouncer(self, SAVE_DELAY_S, self._save)
        self._last_field: ParamField | None = None  # where enter goes back to after escape
        self._pasted = ""  # the last command the form was set from, offered again by ctrl+o
        # what ctrl+z puts back: the form before the paste, then (ctrl+z again) the form it undid
        self._before_paste: dict[str, str] | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="param-form"):
            groups: dict[str, list[dataclasses.Field]] = {}
            for f in self.settings.fields.values():
                groups.setdefault(f.metadata.get("group", "other"), []).append(f)
            for group, fields in groups.items():
                yield Label(GROUP_TITLES.get(group, group.title()), classes="param-group")
                for f in fields:
                    yield ParamField(f, self.settings.text[f.name])
        yield Static(HELP_HINT, id="param-help")
        # Focusable and scrolling: a long command (many datasets) stays readable at 80x24.
        with VerticalScroll(id="param-command-box") as box:
            box.border_title = "command · ctrl+y copies"
            yield CommandLine(id="param-command")

    def on_mount(self) -> None:
        self.refresh_fields()
        self._show_gpus_field()

    def set_visible_gpus(self, visible: list[int]) -> None:
        """The engine's GPUs, from its memory samples: the gpus field is checked against them."""
        if self.settings.set_visible_gpus(visible):
            self.refresh_fields(["gpus"])
            self._show_gpus_field()

    def _show_gpus_field(self) -> None:
        # Without a GPU there is nothing to pick: the field stays out of the way, unless it holds
        # a value (from tunebench.toml, written on a GPU box) whose error must be seen to be fixed.
        name = "gpus"
        self.query_one(f"#field-{name}", ParamField).display = bool(
            self.settings.visible_gpus or self.settings.text[name] or name in self.settings.errors
        )

    # ------------------------------------------------------------ public API

    def show_sharding(self, sharding: str) -> None:
        """Under the deepspeed field: the stage a run on several GPUs takes by itself while the
        field is empty (the estimate's choice), so the person sees it and can pick another."""
        note = f"taken by itself: {sharding}" if sharding and not self.settings.text["deepspeed"] else ""
        self.query_one("#field-deepspeed", ParamField).show_note(note)

    def refresh_fields(self, names: list[str] | None = None) -> None:
        """Bring controls and errors in line with the settings (after a change made elsewhere)."""
        for name in names or list(self.settings.fields):
            self.query_one(f"#field-{name}", ParamField).show(
                self.settings.text[name], self.settings.errors.get(name)
            )
        self._show_errors_and_command()

    def _show_errors_and_command(self) -> None:
        # Cross-field rules (val_ratio vs val_dataset) can put an error on a field not edited.
        for widget in self.query(ParamField):
            widget.show_error(self.settings.errors.get(widget.field.name))
        self.query_one(CommandLine).show(to_command(self.settings.config), self.settings.errors)

    # -------------------------------------------------------------- events

    @on(ParamField.Edited)
    def _field_edited(self, event: ParamField.Edited) -> None:
        self.settings.set(event.name, event.text)
        self._show_errors_and_command()
        self.saver.poke()
        self.post_message(self.Changed(self, [event.name]))

    def on_descendant_focus(self, event) -> None:
        # The focused field's help, in one line under the form: keeps each row one line high.
        field = next((n for n in event.widget.ancestors if isinstance(n, ParamField)), None)
        if field is not None:
            f = field.field
            default = self.settings.defaults[f.name] or "empty"
            self.query_one("#param-help", Static).update(
                f"[b]{f.name}[/b]: {escape(f.metadata['help'])} [dim](default {escape(default)})[/dim]"
            )

    def _save(self) -> None:
        try:
            self.settings.save()
        except OSError as exc:
            self.notify(f"could not save {self.settings.workspace.settings_file}: {exc}", severity="error")

    def on_unmount(self) -> None:
        self.saver.flush()

    # ------------------------------------------------------------- actions

    def _focused_field(self) -> ParamField | None:
        focused = self.screen.focused
        return next((n for n in focused.ancestors if isinstance(n, ParamField)), None) if focused else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "leave_field":
            return self.is_mounted and self._focused_field() is not None
        if action == "focus_field":
            return self.is_mounted and self.screen.focused is self.query_one("#param-form")
        if action == "undo_paste":
            return self._before_paste is not None
        return True

    def action_leave_field(self) -> None:
        # The form itself keeps the focus: arrows scroll it, digits switch panes, enter goes back.
        self._last_field = self._focused_field()
        self.query_one("#param-form").focus()

    def action_focus_field(self) -> None:
        field = self._last_field if self._last_field is not None else self.query(ParamField).first()
        field.query_one(".param-control").focus()

    def action_copy_command(self) -> None:
        command = self.query_one(CommandLine).command
        self.app.copy_to_clipboard(command)
        # Textual copies through the terminal (OSC 52); over SSH some terminals ignore that.
        self.notify(
            "command sent to the terminal's clipboard; if nothing pastes, each run's config.json "
            "holds it too",
            timeout=4,
        )

    def action_paste_command(self) -> None:
        self.app.push_screen(CommandPaste(self._pasted), self._take_command)

    def _take_command(self, taken: tuple[dict[str, Any], list[str], str] | None) -> None:
        if taken is None:
            return
        values, notes, self._pasted = taken
        self._before_paste = self.settings.replace(values)
        self._form_replaced()
        self.refresh_bindings()  # ctrl+z shows in the footer
        self.notify(
            applied_line(values, notes) + "\nctrl+z puts the form back as it was", timeout=8 + 2 * len(notes)
        )

    def action_undo_paste(self) -> None:
        """The form as it was before the paste; pressed again, as it was before this (a swap, so
        neither the old settings nor the pasted ones, with any edits since, are lost)."""
        if self._before_paste is None:
            return
        current = dict(self.settings.text)
        self.settings.restore(self._before_paste)
        self._before_paste = current
        self._form_replaced()
        self.notify("the form is back as it was; ctrl+z again swaps back", timeout=4)

    def _form_replaced(self) -> None:
        self.refresh_fields()
        self.saver.poke()
        self.post_message(self.Changed(self, list(self.settings.fields)))

    def action_reset_field(self) -> None:
        field = self._focused_field()
        if field is None:
            self.notify("move to a field first (tab)", severity="warning")
            return
        name = field.field.name
        self.settings.set(name, self.settings.defaults[name])
        self.refresh_fields([name])
        self.saver.poke()
        self.post_message(self.Changed(self, [name]))
