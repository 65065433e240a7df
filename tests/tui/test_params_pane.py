"""The Parameters pane: generated from TrainConfig, checked as you type, persisted, shown as a command."""

from __future__ import annotations

import tomllib
from textual.widgets import Input, Select, Switch
from tui_helpers import no_start, wait_until
from tunebench.engine.core.config import TrainConfig, field_specs
from tunebench.tui.app import TuneBenchApp
from tunebench.tui.widgets.params.command_line import CommandLine
from tunebench.tui.widgets.params.param_field import ParamField


async def test_form_has_a_control_for_every_field(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)):
        fields = {w.field.name: w for w in app.query(ParamField)}
        assert set(fields) == {f.name for f in field_specs(TrainConfig)}
        assert isinstance(fields["train_type"].query_one(".param-control"), Select)
        assert isinstance(fields["gradient_checkpointing"].query_one(".param-control"), Switch)
        assert isinstance(fields["lora_rank"].query_one(".param-control"), Input)


async def test_change_a_parameter_and_see_the_command_and_errors(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("2")  # the Parameters pane
        command = app.query_one(CommandLine)
        assert "--lora_rank" not in command.command
        rank = app.query_one("#input-lora_rank", Input)
        rank.focus()
        await pilot.press("ctrl+a", "ctrl+k", "1", "6")
        assert "--lora_rank 16" in command.command
        assert app.settings.config.lora_rank == 16
        # a bad value: the field shows why, the command keeps the last valid settings
        await pilot.press("ctrl+a", "ctrl+k", "0")
        field = app.query_one("#field-lora_rank", ParamField)
        assert field.has_class("-invalid")
        assert "at least 1" in str(field.query_one(".param-error").render())
        assert "--lora_rank 16" in command.command
        assert "fix 1 field" in str(command.render())
        await pilot.press("backspace", *"abc")
        assert "not a whole number" in str(field.query_one(".param-error").render())
        await pilot.press("ctrl+r")  # reset the field to its default
        assert not field.has_class("-invalid") and rank.value == "8"
        # a cross-field rule: val_ratio together with val_dataset
        app.query_one("#input-val_ratio", Input).focus()
        await pilot.press("ctrl+a", "ctrl+k", *"0.1")
        app.query_one("#input-val_dataset", Input).focus()
        await pilot.press(*"datasets/mini.jsonl")
        assert app.query_one("#field-val_ratio", ParamField).has_class("-invalid")
        await pilot.press("ctrl+a", "ctrl+k")
        assert not app.query_one("#field-val_ratio", ParamField).has_class("-invalid")
        assert "--val_ratio 0.1" in command.command
        await pilot.press("ctrl+y")
        assert app.clipboard == command.command
        await wait_until(pilot, lambda: "val_ratio" in (workspace / "tunebench.toml").read_text())
    saved = tomllib.loads((workspace / "tunebench.toml").read_text())["train"]
    assert saved["val_ratio"] == 0.1
    assert "lora_rank" not in saved  # back at its default
    assert saved["model_name"] == ["TuneBee"]  # what was there is kept


async def test_identity_fields_and_form_stay_in_step(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        app.query_one("#identity-model_author", Input).focus()
        await pilot.press("ctrl+a", "ctrl+k", *"Ada")
        assert app.settings.config.model_author == ["Ada"]
        assert app.query_one("#input-model_author", Input).value == "Ada"
        assert "--model_author Ada" in app.query_one(CommandLine).command


async def test_settings_survive_a_restart(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        app.query_one("#input-learning_rate", Input).focus()
        await pilot.press("ctrl+a", "ctrl+k", *"3e-4")
        await pilot.press("ctrl+q")
    again = TuneBenchApp(workspace, starter=no_start)
    assert again.settings.config.learning_rate == 3e-4
