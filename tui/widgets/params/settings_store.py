"""The parameter form's values: text per TrainConfig field, checked as typed, kept in tunebench.toml.

Holding the text rather than the parsed value lets a half-typed "1e-" stay on screen with its
error beside it, while everything that reads the settings (the command line, the memory estimate,
Start) only ever sees a TrainConfig that passed config.validate.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from tunebench.engine.core.config import ConfigError, TrainConfig, field_text, parse_value
from tunebench.engine.core.errors import UserError
from tunebench.engine.core.launch import choose_gpus
from tunebench.engine.core.workspace import Workspace

TABLE = "train"  # tunebench.toml: [train] holds the form's non-default values


def default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return field_text(f, value)


class TrainSettings:
    """Form text and errors for every TrainConfig field; `config` is the last valid TrainConfig."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
        # a field's default text: the field's own, or one the machine supplies (set_default)
        self.defaults: dict[str, str] = {name: default_text(f) for name, f in self.fields.items()}
        self.text: dict[str, str] = dict(self.defaults)
        self.values: dict[str, Any] = {}  # every field whose text parses, typed
        self.errors: dict[str, str] = {}
        self.config: TrainConfig = TrainConfig()
        self.load_problem = ""
        self._broken_file = False
        # the engine's GPUs (CUDA's numbers) once a memory sample has said; None: not known yet
        self.visible_gpus: list[int] | None = None

    # ------------------------------------------------------------------ values

    def set(self, name: str, text: str) -> None:
        """Take a field's new text; re-check the whole form (cross-field rules live in validate)."""
        self.text[name] = text
        self._check()

    def update(self, values: dict[str, Any]) -> None:
        """Set typed values (from code, e.g. the Dataset pane's name / author fields)."""
        for name, value in values.items():
            self.text[name] = value if isinstance(value, str) else field_text(self.fields[name], value)
        self._check()

    def replace(self, values: dict[str, Any]) -> dict[str, str]:
        """Typed values for some fields (a pasted command's), every other field back to its default;
        the texts before, for restore."""
        before = dict(self.text)
        self.text = dict(self.defaults)
        self.update(values)
        return before

    def restore(self, texts: dict[str, str]) -> None:
        """The form's texts as replace found them (its paste undone)."""
        self.text = {name: texts.get(name, default) for name, default in self.defaults.items()}
        self._check()

    def set_default(self, name: str, text: str) -> bool:
        """A default known only at run time (max_memory: the card's free memory). A field still at
        its default takes it; one the person set keeps their value. Not saved to tunebench.toml
        while it stays the default. True when the field's text changed."""
        at_default = self.text[name] == self.defaults[name]
        self.defaults[name] = text
        if not at_default or self.text[name] == text:
            return False
        self.set(name, text)
        return True

    def set_visible_gpus(self, visible: list[int]) -> bool:
        """The GPUs the engine sees, which the gpus field is checked against; True if they changed."""
        if visible == self.visible_gpus:
            return False
        self.visible_gpus = list(visible)
        self._check()
        return True

    def _check(self) -> None:
        values: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name, text in self.text.items():
            try:
                values[name] = parse_value(TrainConfig, name, text)
            except ValueError as exc:
                errors[name] = str(exc)
        try:
            config = TrainConfig(**values)
            if self.visible_gpus is not None:
                choose_gpus(config.gpus, self.visible_gpus)  # the engine checks it again at Start
        except ConfigError as exc:
            errors.update(exc.problems)
        else:
            if not errors:
                self.config = config
        self.values = values
        self.errors = errors

    @property
    def valid(self) -> bool:
        return not self.errors

    # ------------------------------------------------------------- persistence

    def load(self) -> bool:
        """Read tunebench.toml; False when there was none (a fresh workspace)."""
        if not self.workspace.settings_file.is_file():
            self._check()
            return False
        try:
            table = self.workspace.read_settings().get(TABLE, {})
        except UserError as exc:
            # Keep the broken file for the person to fix; save() sets it aside before writing.
            self.load_problem = f"{exc.message}; using defaults ({exc.hint})"
            self._broken_file = True
            table = {}
        for name, value in table.items() if isinstance(table, dict) else ():
            if name in self.fields:
                self.text[name] = field_text(self.fields[name], value)
        self._check()
        return True

    def save(self) -> None:
        """Write the non-default values; a field with an error keeps its last saved value."""
        if self._broken_file:
            path = self.workspace.settings_file
            os.replace(path, path.with_name(path.name + ".broken"))
            self._broken_file = False
            self.load_problem = ""
        try:
            document = self.workspace.read_settings()
        except UserError:
            document = {}
        saved = document.get(TABLE, {}) if isinstance(document.get(TABLE), dict) else {}
        table: dict[str, Any] = {}
        for name in self.fields:
            if name in self.errors:
                if name in saved:
                    table[name] = saved[name]
            elif self.text[name] != self.defaults[name]:
                table[name] = self.values[name]
        document[TABLE] = table  # other tables (another tool's, a person's notes) are kept
        self.workspace.write_settings(document)
