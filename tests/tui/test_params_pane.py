"""The Parameters pane: generated from TrainConfig, checked as you type, persisted, shown as a command."""

from __future__ import annotations

import tomllib
from textual.widgets import Input, Select, Switch
from tui_helpers import no_start, record_notices, wait_until
from tunebench.engine.core.config import TrainConfig, field_specs
from tunebench.tui.app import TuneBenchApp
from tunebench.tui.widgets.params.command_line import CommandLine
from tunebench.tui.widgets.params.param_field import ParamField, hint_that_fits


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


async def test_max_memory_defaults_to_the_cards_free_memory_and_the_gpu_pane_shows_the_plan(workspace):
    """The card's free memory (less the CUDA context) is the budget until the person sets one;
    the GPU pane shows the plan the estimate chose, or why training would be refused."""
    from fake_engine import FakeEngineThread
    from textual.widgets import Static
    from tunebench.engine.core import protocol as P
    from tunebench.engine.core.plans import default_budget_gib

    gpu = {"index": 0, "name": "NVIDIA RTX 4090", "used": 2 * 2**30, "total": 24 * 2**30, "util": 0}
    with FakeEngineThread(workspace, gpus=[gpu]):
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=(100, 32)) as pilot:
            want = default_budget_gib(22 * 2**30)
            await wait_until(pilot, lambda: app.settings.config.max_memory == want)
            assert app.query_one("#input-max_memory", Input).value == f"{want:.1f}"
            assert f"--max_memory {want:g}" in app.query_one(CommandLine).command
            plan = "plan: 14 of 28 layers recompute, inputs on the GPU, 8,192 tokens per forward: " + (
                "predicted peak 19.3 GiB of 19.9"
            )
            app.gpu_pane.show_estimate(P.MemoryEstimate(total_gib=19.3, plan=plan))
            shown = str(app.gpu_pane.query_one("#memory-estimate", Static).render())
            assert plan in shown and "fits in" in shown
            refused = "no training plan fits in --max_memory 8 GiB: the smallest ... needs 14.5 GiB"
            app.gpu_pane.show_estimate(
                P.MemoryEstimate(total_gib=14.5, refused=refused, advice=["any one of these fits: qlora"])
            )
            shown = str(app.gpu_pane.query_one("#memory-estimate", Static).render())
            assert "training will be refused: " + refused in shown and "qlora" in shown
    saved = (workspace / "tunebench.toml").read_text() if (workspace / "tunebench.toml").exists() else ""
    assert "max_memory" not in saved  # the card's default is not a setting the person made


def test_an_empty_fields_hint_keeps_whole_clauses_of_its_help():
    help_text = "chat template: empty = the tokenizer's own; or chatml, qwen, llama3"
    assert hint_that_fits(help_text, 80) == help_text
    assert hint_that_fits(help_text, 45) == "chat template: empty = the tokenizer's own"
    assert hint_that_fits(help_text, 30) == "chat template"
    assert hint_that_fits(help_text, 8) == "chat te…"
    assert hint_that_fits("名前: 小蜂", 3) == "名…"  # wide characters take two cells


async def test_hints_fit_their_fields_on_an_80_column_terminal(workspace, fake_engine):
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(80, 30)) as pilot:
        await pilot.press("2")
        await pilot.pause()
        template = app.query_one("#input-template", Input)
        assert template.placeholder == "chat template"
        for field in app.query(ParamField):
            control = field.query_one(".param-control")
            if isinstance(control, Input) and not control.value and field.display:
                assert len(control.placeholder) <= control.content_size.width, field.field.name


async def test_a_pasted_swift_sft_command_sets_the_form(workspace, fake_engine):
    """ctrl+o takes a copied command: its settings in the form, the rest back to defaults, a note
    for each flag that sets nothing here; a refused flag is said in the box, the text kept."""
    from textual.widgets import TextArea
    from tunebench.tui.screens.command_paste import CommandPaste

    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("2")
        app.query_one("#input-learning_rate", Input).focus()
        await pilot.press("ctrl+a", "ctrl+k", *"0.01")
        assert app.settings.config.learning_rate == 0.01
        await pilot.press("escape", "ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPaste))
        box = app.screen.query_one(TextArea)
        box.text = "NPROC_PER_NODE=1 swift sft \\\n  --model demo --lora_rank 16 --optim adafactor"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, CommandPaste)  # refused: the box stays, with the reason
        assert "'adafactor' is not done here" in str(app.screen.query_one("#paste-error").render())
        box.text = box.text.replace(" --optim adafactor", " -h")  # argparse's help ended the workbench
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, CommandPaste) and app.is_running
        assert "-h/--help is not a setting" in str(app.screen.query_one("#paste-error").render())
        box.text = box.text.replace(" -h", " --packing true")
        notices = record_notices(app)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: not isinstance(app.screen, CommandPaste))
        config = app.settings.config
        assert (config.lora_rank, config.nproc_per_node) == (16, 1)
        assert config.learning_rate == TrainConfig().learning_rate  # left out: back to its default
        assert app.query_one("#input-lora_rank", Input).value == "16"
        assert "--lora_rank 16" in app.query_one(CommandLine).command
        said = "\n".join(notices)
        assert "3 settings from the command" in said and "note: --packing true:" in said
        assert "ctrl+z puts the form back as it was" in said
        app.query_one("#input-lora_rank", Input).focus()
        await pilot.press("ctrl+z")  # the paste undone: the learning rate typed before it is back
        await wait_until(pilot, lambda: app.settings.config.learning_rate == 0.01)
        assert app.settings.config.lora_rank == TrainConfig().lora_rank
        assert app.query_one("#input-learning_rate", Input).value == "0.01"
        await pilot.press("ctrl+z")  # and again: the pasted settings are back
        await wait_until(pilot, lambda: app.settings.config.lora_rank == 16)
