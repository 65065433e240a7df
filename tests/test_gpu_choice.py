"""Several GPUs without having them: the memory sampler against a fake NVML of 2-4 devices (as
CUDA_VISIBLE_DEVICES narrows them), and the gpus setting read, checked and turned into the ranks'
CUDA_VISIBLE_DEVICES, in the config, the CLI and the engine."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest
from tunebench.engine.cli.main import main
from tunebench.engine.core import memory_sampler
from tunebench.engine.core.config import ConfigError, TrainConfig
from tunebench.engine.core.launch import choose_gpus, gpu_environment, visible_devices

GIB = 2**30


@dataclass
class Card:
    name: str
    used_gib: int
    total_gib: int
    util: int | None  # None: the card does not report it (NVMLError)
    uuid: str


def fake_nvml(cards: list[Card]) -> types.ModuleType:
    """pynvml's calls the sampler makes, answered from `cards` (NVML's order: PCI bus)."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    nvml.NVMLError = NVMLError
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(cards)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: cards[i]
    nvml.nvmlDeviceGetName = lambda card: card.name.encode()  # older pynvml gives bytes
    nvml.nvmlDeviceGetUUID = lambda card: card.uuid
    nvml.nvmlDeviceGetMemoryInfo = lambda card: types.SimpleNamespace(
        used=card.used_gib * GIB, total=card.total_gib * GIB
    )

    def utilization(card):
        if card.util is None:
            raise NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=card.util, memory=0)

    nvml.nvmlDeviceGetUtilizationRates = utilization
    return nvml


FOUR = [
    Card("NVIDIA H200", 10, 141, 90, "GPU-aaaa-0"),
    Card("NVIDIA H200", 20, 141, 0, "GPU-bbbb-1"),
    Card("NVIDIA H200", 30, 141, None, "GPU-cccc-2"),
    Card("NVIDIA H200", 40, 141, 55, "GPU-dddd-3"),
]


@pytest.fixture
def nvml(monkeypatch):
    def install(cards: list[Card]) -> None:
        monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(cards))
        monkeypatch.setattr(memory_sampler, "_nvml_state", {"ready": False, "note": ""})

    return install


def seen(gpus: list[dict]) -> list[tuple]:
    return [(g["index"], g["nvml_index"], g["used"] // GIB, g["util"]) for g in gpus]


@pytest.mark.parametrize("count", [2, 3, 4])
def test_every_gpu_is_sampled_with_its_memory_and_utilisation(nvml, count):
    nvml(FOUR[:count])
    gpus, note = memory_sampler.gpu_stats({})
    assert note == ""
    expected = [(0, 0, 10, 90), (1, 1, 20, 0), (2, 2, 30, -1), (3, 3, 40, 55)][:count]
    assert seen(gpus) == expected
    assert all(g["name"] == "NVIDIA H200" and g["total"] == 141 * GIB for g in gpus)
    sample = memory_sampler.sample_memory()  # the event the GPU pane receives carries them all
    assert len(sample.gpus) == count and sample.gpu_note == ""


@pytest.mark.parametrize(
    ("listed", "expected"),
    [
        ("3,1", [(0, 3, 40, 55), (1, 1, 20, 0)]),  # CUDA's order is the list's, and renumbers from 0
        ("GPU-cccc,0", [(0, 2, 30, -1), (1, 0, 10, 90)]),  # a UUID, or a unique prefix of one
        ("1,7,2", [(0, 1, 20, 0)]),  # as CUDA does, the list ends at an entry naming no GPU
    ],
)
def test_cuda_visible_devices_decides_which_gpus_and_their_numbers(nvml, listed, expected):
    nvml(FOUR)
    gpus, note = memory_sampler.gpu_stats({"CUDA_VISIBLE_DEVICES": listed})
    assert seen(gpus) == expected and note == ""


def test_gpus_all_hidden_says_why(nvml):
    nvml(FOUR)
    gpus, note = memory_sampler.gpu_stats({"CUDA_VISIBLE_DEVICES": ""})
    assert gpus == [] and note == "NVML sees 4 GPU(s), but CUDA_VISIBLE_DEVICES='' names none of them"


def test_no_nvml_is_an_empty_list_with_the_reason(monkeypatch):
    broken = types.ModuleType("pynvml")

    def fail():
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    broken.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    monkeypatch.setattr(memory_sampler, "_nvml_state", {"ready": False, "note": ""})
    gpus, note = memory_sampler.gpu_stats({})
    assert gpus == [] and note.startswith("no NVIDIA GPU found (NVML: libnvidia-ml.so.1")


# ---------------------------------------------------------------- the gpus setting


@pytest.mark.parametrize(
    ("text", "visible", "chosen"),
    [
        ("", [0, 1], []),
        ("all", [0, 1, 2], [0, 1, 2]),
        ("0,1,3", [0, 1, 2, 3], [0, 1, 3]),
        ("2", [0, 1, 2], [2]),
    ],
)
def test_gpus_picks_from_the_visible_ones(text, visible, chosen):
    assert choose_gpus(text, visible) == chosen


@pytest.mark.parametrize(
    ("text", "visible", "said"),
    [
        (
            "0,4",
            [0, 1, 2, 3],
            "GPU 4 is not one of this machine's GPUs (0,1,2,3): list some of 0,1,2,3, or write all",
        ),
        ("0,1", [], "'0,1', but this machine shows no NVIDIA GPU: leave gpus empty"),
        ("all", [], "this machine shows no NVIDIA GPU"),
    ],
)
def test_a_gpu_that_is_not_there_is_named(text, visible, said):
    with pytest.raises(ConfigError) as caught:
        choose_gpus(text, visible)
    assert said in caught.value.problems["gpus"]


@pytest.mark.parametrize(
    ("over", "field", "said"),
    [
        ({"gpus": "0,x"}, "gpus", "'x' is not a GPU number: write them like 0,1,3, or all"),
        ({"gpus": "1,1"}, "gpus", "GPU 1 is listed twice"),
        ({"gpus": "0,1", "nproc_per_node": 3}, "nproc_per_node", "3 processes, but gpus lists 2 GPU(s)"),
    ],
)
def test_bad_gpus_text_is_a_message_wherever_it_is_typed(over, field, said):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**over)
    assert said in caught.value.problems[field]


def test_the_chosen_gpus_become_the_ranks_cuda_visible_devices():
    assert gpu_environment([0, 1, 3], {}) == {
        "CUDA_VISIBLE_DEVICES": "0,1,3",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    # the engine's own list narrowed: its GPU 1 is physical 7
    assert visible_devices([1, 2], {"CUDA_VISIBLE_DEVICES": "5,7,GPU-aaaa"}) == "7,GPU-aaaa"


def test_cli_gpus_on_a_machine_without_gpus_is_a_message(monkeypatch, capsys):
    monkeypatch.setattr(memory_sampler, "gpu_stats", lambda *a: ([], "no NVIDIA GPU found"))
    code = main(["train", "--dataset", "d.jsonl", "--gpus", "0,1"])
    err = capsys.readouterr().err
    assert code == 2 and "--gpus: '0,1', but this machine shows no NVIDIA GPU: leave gpus empty" in err
    assert "Traceback" not in err


def test_cli_gpus_starts_one_rank_per_gpu_on_those_gpus(monkeypatch, nvml):
    """--gpus 1,3 on a 4-GPU box: torchrun gets 2 processes, and they see GPUs 1 and 3 only."""
    import tunebench.engine.train.distributed as distributed
    import tunebench.engine.train.preflight as preflight

    nvml(FOUR)
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.setenv(name, "")  # recorded, so the test leaves them as they were
        monkeypatch.delenv(name)
    launched = {}

    def fake_launch(launch, argv):
        import os

        launched.update(
            nproc=launch.nproc_per_node,
            visible=os.environ["CUDA_VISIBLE_DEVICES"],
            order=os.environ["CUDA_DEVICE_ORDER"],
        )
        return 0

    monkeypatch.setattr(distributed, "launch_ranks", fake_launch)
    monkeypatch.setattr(preflight, "preflight", lambda cfg: None)
    assert main(["train", "--dataset", "d.jsonl", "--gpus", "1,3"]) == 0
    assert launched == {"nproc": 2, "visible": "1,3", "order": "PCI_BUS_ID"}
