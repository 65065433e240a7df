"""bench/bench_longest.py's longest-sample search (`bench_train.py search`, run on the GPU): its
doubling and bisection, with a made-up "does it fit" in place of a training step."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("bench_longest")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def search_longest(bench):
    return bench.search_longest


def limit(longest: int, tried: list[int]):
    def fits(length: int) -> bool:
        tried.append(length)
        return length <= longest

    return fits


def test_doubles_until_a_try_fails_then_bisects_to_the_resolution(search_longest):
    tried: list[int] = []
    found = search_longest(limit(90_000, tried), start=16384, cap=1 << 20, resolution=1 / 16)
    assert tried[:4] == [16384, 32768, 65536, 131072]
    assert found["failed"] > 90_000 >= found["longest"] >= 90_000 * 15 / 16 - 1024
    assert found["failed"] - found["longest"] <= max(1024, found["longest"] / 16)
    assert found["longest"] % 1024 == 0 and found["stopped"] == ""
    assert [(n, ok) for n, ok, _ in found["tries"]] == [(n, n <= 90_000) for n in tried]
    # every length tried after the doubling lies between what fitted and what did not
    assert all(65536 < n < 131072 for n in tried[4:])


def test_a_first_try_that_fails_bisects_downwards_and_a_cap_that_fits_ends_it(search_longest):
    tried: list[int] = []
    found = search_longest(limit(5000, tried), start=16384, cap=1 << 20, resolution=1 / 16)
    assert tried[0] == 16384 and 4096 <= found["longest"] <= 5000 < found["failed"] <= 6144
    found = search_longest(limit(10**9, []), start=16384, cap=100_000)
    assert found["longest"] == 99_328 and found["stopped"] == "cap" and found["failed"] is None
    assert search_longest(limit(-1, []), start=4096, cap=1 << 20)["longest"] == 0  # nothing fits


def test_a_length_known_not_to_fit_is_not_tried_again(search_longest):
    """The warm-up step at --start ran out of memory: the search bisects below it at once (on the
    GPU it had tried the same 86,016 tokens again, and the call's time ran out in that try)."""
    tried: list[int] = []
    found = search_longest(limit(70_000, tried), start=86016, cap=98304, resolution=1 / 16, failed_at=86016)
    assert 86016 not in tried and tried[0] == 43008
    assert found["failed"] <= 86016 and 65_000 <= found["longest"] <= 70_000
    assert all(n < 86016 for n, _, _ in found["tries"])


def test_a_try_that_would_end_past_the_time_allowed_is_not_started(search_longest):
    now = [0.0]

    def fits(length: int) -> bool:
        now[0] += (length / 16384) ** 2 * 10  # 10 s at 16k, four times that per doubling
        return length <= 300_000

    found = search_longest(fits, start=16384, cap=1 << 20, seconds=300, clock=lambda: now[0])
    # 16k, 32k, 64k and 128k take 10 + 40 + 160 + 640 s: 128k would end past 300 s
    assert [n for n, _, _ in found["tries"]] == [16384, 32768, 65536]
    assert found["longest"] == 65536 and found["failed"] is None and found["stopped"] == "time"
    assert now[0] <= 300


def test_the_peak_as_a_line_in_the_length(bench):
    gib = 1024**3
    peaks = {n: {"peak_gib": (5 * gib + n * 150_000) / gib} for n in (16384, 32768, 65536)}
    line = bench.linear_peak(peaks)
    assert line["kib_per_token"] == pytest.approx(150_000 / 1024)
    assert line["gib_at_zero"] == pytest.approx(5)
    assert line["length_at_80_gib"] == pytest.approx(75 * gib / 150_000, abs=1)
    assert bench.linear_peak({16384: {"peak_gib": 9.0}}) is None


def test_a_tunebench_stack_searches_on_the_cpu_at_the_tiny_size(bench, tmp_path):
    """The search's TuneBench step driver sets the recipe up as run_training does: run as on the
    GPU (bench_train.py search-child), on the CPU at --size tiny, it trains and finds a length."""
    import json
    import subprocess

    model = tmp_path / "model"
    sys.modules["bench_train"].make_model("tiny", model)
    script = [sys.executable, str(bench.BENCH_TRAIN)]
    result = tmp_path / "result.json"
    child = [*script, "search-child", "--size", "tiny", "--stack", "tb-lean"]
    child += ["--method", "lora", "--model-dir", str(model), "--result", str(result), "--budget-gib", "1"]
    child += ["--start", "256", "--cap", "256", "--search-seconds", "60"]
    subprocess.run(child, check=True, capture_output=True)
    record = json.loads(result.read_text())
    assert "error" not in record, record.get("error")
    assert record["warm_up"]["fitted"] and record["longest"] == 256 and record["stopped"] == "cap"
