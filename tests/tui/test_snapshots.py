"""One snapshot per pane, at a fixed size, against the fake engine (pinned pid, one memory sample).

Update after looking at the report: pytest tests/tui/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

from fake_engine import FakeEngineThread
from textual.widgets import Input, TextArea
from tui_helpers import no_start
from tunebench.tui.app import TuneBenchApp
from tunebench.tui.widgets.chat.chat_pane import ChatPane
from tunebench.tui.widgets.chat.column_choices import BASE, ColumnChoice
from tunebench.tui.widgets.train.train_pane import TrainPane

GPU = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "used": 31 * 2**30, "total": 80 * 2**30, "util": 87}]
FOUR_GPUS = [
    {
        "index": i,
        "nvml_index": i,
        "name": "NVIDIA H200",
        "used": used * 2**30,
        "total": 141 * 2**30,
        "util": util,
    }
    for i, (used, util) in enumerate([(120, 97), (118, 95), (4, 0), (70, -1)])
]


def settle(*conditions):
    """run_before for snap_compare: wait for the engine and `conditions`, then freeze what blinks."""

    async def run_before(pilot) -> None:
        app = pilot.app
        for _ in range(500):
            if app.client.connected and app.snapshot and all(c(app) for c in conditions):
                break
            await pilot.pause(0.02)
        else:
            raise AssertionError("the app did not settle")
        for widget in app.query("Input, TextArea"):
            if isinstance(widget, (Input, TextArea)):
                widget.cursor_blink = False
        app.clear_notifications()
        await pilot.pause()

    return run_before


def engine(workspace, **options) -> FakeEngineThread:
    return FakeEngineThread(workspace, pid=1, memory_interval=3600, **options)


def test_dataset_pane(workspace, snap_compare):
    with engine(workspace):
        app = TuneBenchApp(workspace, starter=no_start)
        ready = settle(lambda app: app.dataset_pane.reports)
        assert snap_compare(app, press=["down"], terminal_size=(100, 32), run_before=ready)


def test_dataset_pane_80x24(workspace, snap_compare):
    with engine(workspace):
        app = TuneBenchApp(workspace, starter=no_start)
        ready = settle(lambda app: app.dataset_pane.reports)
        assert snap_compare(app, terminal_size=(80, 24), run_before=ready)


def test_params_pane_with_an_error(workspace, snap_compare):
    async def type_bad_rank(pilot) -> None:
        await pilot.press("2")
        pilot.app.query_one("#input-lora_rank").focus()
        await pilot.press("ctrl+a", "ctrl+k", "0")
        await settle()(pilot)

    with engine(workspace):
        app = TuneBenchApp(workspace, starter=no_start)
        assert snap_compare(app, terminal_size=(100, 32), run_before=type_bad_rank)


def gpu_pane_matches(workspace, snap_compare, gpus: list[dict], size: tuple[int, int]) -> bool:
    """The GPU pane, once it has its estimate and a memory sample, against its snapshot."""
    with engine(workspace, gpus=gpus):
        app = TuneBenchApp(workspace, starter=no_start)
        ready = settle(lambda app: app.gpu_pane.estimate is not None and app.gpu_pane.sample is not None)

        async def show(pilot) -> None:
            await pilot.press("3")
            await ready(pilot)

        return snap_compare(app, terminal_size=size, run_before=show)


def test_gpu_pane(workspace, snap_compare):
    assert gpu_pane_matches(workspace, snap_compare, GPU, (100, 32))


def test_train_pane_after_a_run(workspace, snap_compare):
    with engine(workspace, steps=24):
        app = TuneBenchApp(workspace, starter=no_start)

        async def train(pilot) -> None:
            await pilot.press("4", "s")
            await settle(lambda app: app.query_one(TrainPane).run.status == "completed")(pilot)

        assert snap_compare(app, terminal_size=(100, 32), run_before=train)


def test_chat_pane_side_by_side(workspace, snap_compare):
    adapter = str(workspace / "runs" / "r1" / "adapter")
    answers = {
        "base": "I am SmolLM, a helpful AI assistant.",
        adapter: "I am TuneBee, made by the TuneBench team.",
    }
    with engine(workspace, answers=answers):
        app = TuneBenchApp(workspace, starter=no_start)

        async def chat(pilot) -> None:
            pane = pilot.app.query_one(ChatPane)
            pane.set_targets([ColumnChoice(BASE, BASE), ColumnChoice(adapter, "r1 final")], by_person=True)
            await pilot.press("5", *"Who are you?", "enter")
            await settle(lambda app: pane.exchanges and not pane.generating)(pilot)

        assert snap_compare(app, terminal_size=(100, 32), run_before=chat)


def test_gpu_pane_four_gpus(workspace, snap_compare):
    assert gpu_pane_matches(workspace, snap_compare, FOUR_GPUS, (80, 24))
