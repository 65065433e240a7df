"""Several GPUs in the workbench: the GPU pane draws one gauge per GPU with its utilisation, from
what the engine's sampler reads off a fake NVML; the Parameters form's gpus field picks among
them (checked as typed, sent with Start). A machine without a GPU: test_engine_flows.py."""

from __future__ import annotations

import re
import sys
import types

from fake_engine import FakeEngineThread
from textual.widgets import Input
from tui_helpers import no_start, wait_until
from tunebench.engine.core import memory_sampler
from tunebench.tui.app import TuneBenchApp
from tunebench.tui.widgets.gpu.memory_gauge import GpuGauge
from tunebench.tui.widgets.params.command_line import CommandLine
from tunebench.tui.widgets.params.param_field import ParamField

GIB = 2**30
# (name, used GiB, total GiB, utilisation %; None: the card does not report it)
CARDS = [
    ("NVIDIA A100-SXM4-80GB", 20, 80, 90),
    ("NVIDIA A100-SXM4-80GB", 8, 80, 0),
    ("NVIDIA A100-SXM4-80GB", 60, 80, None),
    ("NVIDIA A100-SXM4-80GB", 1, 80, 35),
]


def sampled_gpus(monkeypatch, count: int, visible: str | None = None) -> list[dict]:
    """The engine sampler's GPU list, read from a fake pynvml with `count` cards."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def util(i):
        if CARDS[i][3] is None:
            raise NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=CARDS[i][3])

    nvml.NVMLError = NVMLError
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: count
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetName = lambda i: CARDS[i][0]
    nvml.nvmlDeviceGetMemoryInfo = lambda i: types.SimpleNamespace(
        used=CARDS[i][1] * GIB, total=CARDS[i][2] * GIB
    )
    nvml.nvmlDeviceGetUtilizationRates = util
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(memory_sampler, "_nvml_state", {"ready": False, "note": ""})
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    gpus, note = memory_sampler.gpu_stats(environ)
    assert note == ""
    return gpus


def gauge_lines(app) -> list[list[str]]:
    return [str(g.render()).splitlines() for g in app.query(GpuGauge)]


async def pane_drawn(workspace, gpus: list[dict], size: tuple[int, int]) -> tuple[list[list[str]], str]:
    """The GPU pane's gauge lines and title line, drawn from a fake engine sampling `gpus`."""
    with FakeEngineThread(workspace, gpus=gpus, memory_interval=0.1):
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=size) as pilot:
            await pilot.press("3")
            await wait_until(pilot, lambda: len(app.query(GpuGauge)) == len(gpus), what="the gauges")
            await pilot.pause()
            return gauge_lines(app), str(app.query_one("#gpu-names").render())


async def test_two_gpus_get_a_gauge_each_with_its_utilisation(workspace, monkeypatch):
    lines, _title = await pane_drawn(workspace, sampled_gpus(monkeypatch, 2), (100, 40))
    expected = [  # head, memory used, utilisation
        ("GPU 0 NVIDIA A100-SXM4-80GB   20.0 GiB / 80.0 GiB  util 90%", 0.25, 0.9),
        ("GPU 1 NVIDIA A100-SXM4-80GB   8.0 GiB / 80.0 GiB  util 0%", 0.1, 0.0),
    ]
    for (head, line), (want_head, used, util) in zip(lines, expected, strict=True):
        assert head == want_head
        memory, util_bar = line.rsplit(" ", 1)  # memory on the left, utilisation in the last fifth
        assert_filled(memory, used)
        assert_filled(util_bar, util)


async def test_four_gpus_get_a_row_each_under_their_name(workspace, monkeypatch):
    rows, title = await pane_drawn(workspace, sampled_gpus(monkeypatch, 4), (80, 24))
    assert title.startswith("4 GPUs: NVIDIA A100-SXM4-80GB")
    expected = [
        (20.0, 0.25, "util 90%", 0.9),
        (8.0, 0.1, "util 0%", 0.0),
        (60.0, 0.75, "util n/a", 0.0),
        (1.0, 1 / 80, "util 35%", 0.35),
    ]
    for i, ((row,), (gib, used, util_text, util)) in enumerate(zip(rows, expected, strict=True)):
        memory, numbers, util_bar = re.fullmatch(r"GPU \d (\S+) +(\S+ GiB  util \S+) +(\S+)", row).groups()
        assert row.startswith(f"GPU {i} ") and numbers == f"{gib:.1f}/80 GiB  {util_text}"
        assert_filled(memory, used)
        assert_filled(util_bar, util)
    # the rows' columns line up
    assert len({row.index(" GiB") for (row,) in rows}) == 1 and len({len(row) for (row,) in rows}) == 1


def assert_filled(cells: str, fraction: float) -> None:
    """`cells` is a bar filled from the left to `fraction` (the estimate's ┃ may stand on a cell)."""
    filled = round(fraction * len(cells))
    covered = [i for i, cell in enumerate(cells) if cell == "┃" and i < filled]
    assert cells.count("█") == filled - len(covered), cells


async def test_cuda_visible_devices_shows_only_those_gpus_numbered_from_0(workspace, monkeypatch):
    lines, _title = await pane_drawn(workspace, sampled_gpus(monkeypatch, 4, visible="3,1"), (100, 40))
    heads = [gauge[0] for gauge in lines]
    assert heads[0].startswith("GPU 0 ") and heads[0].endswith("1.0 GiB / 80.0 GiB  util 35%")
    assert heads[1].startswith("GPU 1 ") and heads[1].endswith("8.0 GiB / 80.0 GiB  util 0%")


async def test_the_form_picks_the_gpus_and_start_sends_them(workspace, monkeypatch):
    gpus = sampled_gpus(monkeypatch, 4)
    with FakeEngineThread(workspace, gpus=gpus, memory_interval=0.1) as engine:
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=(100, 40)) as pilot:
            await pilot.press("2")
            await wait_until(pilot, lambda: app.settings.visible_gpus == [0, 1, 2, 3], what="the GPUs")
            field = app.query_one("#field-gpus", ParamField)
            assert field.display
            app.query_one("#input-gpus", Input).focus()
            await pilot.press(*"0,5")
            assert field.has_class("-invalid")
            error = " ".join(str(field.query_one(".param-error").render()).split())
            assert (
                "GPU 5 is not one of this machine's GPUs (0,1,2,3): list some of 0,1,2,3, or write all"
                in error
            )
            await pilot.press("ctrl+a", "ctrl+k", *"1,3")
            assert not field.has_class("-invalid")
            assert "--gpus 1,3" in app.query_one(CommandLine).command
            await pilot.press("escape", "4", "s")
            await wait_until(pilot, lambda: engine.of_type("StartTraining"), what="the start")
    (start,) = engine.of_type("StartTraining")
    assert start.config["gpus"] == "1,3"


async def test_gpus_saved_on_a_gpu_box_shows_its_error_on_a_machine_without_one(workspace, fake_engine):
    (workspace / "tunebench.toml").write_text('[train]\ngpus = "0,1"\n')
    app = TuneBenchApp(workspace, starter=no_start)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("2")
        await wait_until(pilot, lambda: app.settings.visible_gpus == [], what="the memory sample")
        await pilot.pause()
        field = app.query_one("#field-gpus", ParamField)
        assert field.display and field.has_class("-invalid")
        error = " ".join(str(field.query_one(".param-error").render()).split())
        assert "'0,1', but this machine shows no NVIDIA GPU: leave gpus empty" in error
        await pilot.press("4", "s")  # Start is refused until it is fixed
        assert not fake_engine.of_type("StartTraining")


async def test_the_form_says_under_deepspeed_which_stage_a_run_takes_by_itself(workspace, monkeypatch):
    """The estimate's choice of FSDP2 for a base too big for one GPU shows under the empty
    deepspeed field; a stage typed there is the person's choice, and the note goes."""
    gpus = sampled_gpus(monkeypatch, 4)
    why = "zero3: the base does not fit one GPU for data parallel"
    with FakeEngineThread(workspace, gpus=gpus, memory_interval=0.1, sharding=why):
        app = TuneBenchApp(workspace, starter=no_start)
        async with app.run_test(size=(100, 40)) as pilot:
            await pilot.press("2")
            field = app.query_one("#field-deepspeed", ParamField)

            def note() -> str:
                return " ".join(str(field.query_one(".param-error").render()).split())

            await wait_until(pilot, lambda: "taken by itself" in note(), what="the note")
            assert note() == f"taken by itself: {why}" and not field.has_class("-invalid")
            app.query_one("#input-deepspeed", Input).focus()
            await pilot.press(*"zero2")
            await wait_until(pilot, lambda: "taken by itself" not in note(), what="the note gone")
