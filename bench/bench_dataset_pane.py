"""Time the Dataset pane on a large file, driven like a person through Textual's pilot.

    python bench/bench_dataset_pane.py [--samples 100000] [--model no-such-model] [--repeats N]
        [--no-wait-checks] [--output runs.json]

Writes a JSON lines file of N samples (about 1.1 KB each, the size of the issue's 22 MB / 20,000)
under /tmp, opens the TUI on it against the tests' stand-in engine, and times issue 14's targets:

- first rows on screen (from the app's start), the whole file read, every row checked;
- each search keystroke, while the rows are still being checked: until the field shows it (and
  the UI thread's CPU time meanwhile, which the box's load does not inflate), and until the
  table shows its matches;
- a delete: until the table shows the result; autosave: until the journal holds the edit, and
  until the file on disk holds it (and that it is a one-line diff);
- keys typed ahead during the load reach the search field, not the table;
- the longest the event loop was held up meanwhile (a key waits that long at worst).

`--model demo` checks with the demo model's tokenizer (token counts: minutes for 100,000 rows).

Timings live here and in bench/RESULTS_dataset_pane.md, never as bounds in the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "tui"))

from fake_engine import FakeEngineThread  # noqa: E402
from textual import events  # noqa: E402
from tunebench.tui.app import TuneBenchApp  # noqa: E402
from tunebench.tui.screens.sample_editor import SampleEditor  # noqa: E402
from tunebench.tui.widgets.dataset.dataset_pane import DatasetPane  # noqa: E402
from tunebench.tui.widgets.dataset.dataset_store import DatasetStore  # noqa: E402
from tunebench.tui.widgets.dataset.sample_table import SampleTable  # noqa: E402

WORDS = "the a model answer question data train learn token batch loss colour blue green red tune".split()


def write_dataset(path: Path, samples: int) -> None:
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with open(path, "wb") as fh:
        for i in range(samples):
            prompt, answer = f"q{i} " + words(40), words(140)
            record = [
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]},
                {"instruction": prompt, "input": "", "output": answer},
                {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]},
            ][i % 3]
            fh.write(orjson.dumps(record) + b"\n")


def press_now(app, key: str, char: str | None) -> None:
    """A key as the terminal delivers it, without waiting for the app to be idle first."""
    event = events.Key(key, char)
    event.set_sender(app)
    app._driver.send_message(event)


async def until(predicate, timeout: float = 60.0, step: float = 0.002) -> float:
    """Seconds until predicate() holds (polling the app's own loop)."""
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"waited {timeout} s")
        await asyncio.sleep(step)
    return time.perf_counter() - started


class GcPauses:
    """The longest pause of Python's cyclic garbage collector (it holds every thread)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._began = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.worst = max(self.worst, time.perf_counter() - self._began)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


class LoopLag:
    """The longest time the event loop took to come back to a 10 ms timer: how long a key waits."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.perf_counter() - before - 0.01)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()


def note_file_writes(moments: dict) -> None:
    """Record how long each background write of the file took (serialise, hash, write, fsync)."""
    write_save = DatasetStore.write_save

    def timed(self, pending):
        began = time.perf_counter()
        try:
            return write_save(self, pending)
        finally:
            moments.setdefault("file_writes_s", []).append(time.perf_counter() - began)

    DatasetStore.write_save = timed


def note_first_paint(moments: dict) -> None:
    """Record when the pane mounts, and when the table first draws a sample's line."""
    mount, render_line = DatasetPane.on_mount, SampleTable.render_line

    def on_mount(self) -> None:
        moments.setdefault("pane_mounted", time.perf_counter())
        mount(self)

    def drawn(self, y: int):
        if y >= 1 and self.row_count and "first_rows" not in moments:
            moments["first_rows"], moments["first_rows_count"] = time.perf_counter(), self.row_count
        return render_line(self, y)

    DatasetPane.on_mount, SampleTable.render_line = on_mount, drawn


MOMENTS: dict = {}  # filled by the hooks note_first_paint() and note_file_writes() put in


async def measure(workspace: Path, data: Path, needle: str, wait_checks: bool) -> dict:
    results: dict = {}
    moments = MOMENTS
    app = TuneBenchApp(workspace, starter=lambda ws, timeout: None)
    started = time.perf_counter()
    async with app.run_test(size=(120, 40)):
        pane = app.query_one(DatasetPane)
        table = app.query_one(SampleTable)
        search = app.query_one("#dataset-search")
        with LoopLag() as lag, GcPauses() as gc_pauses:
            await until(lambda: "first_rows" in moments)
            results["app_start_to_pane_mounted_s"] = moments["pane_mounted"] - started  # Textual's
            results["first_rows_drawn_s"] = moments["first_rows"] - started
            results["first_rows_drawn_after_mount_s"] = moments["first_rows"] - moments["pane_mounted"]
            results["first_rows_count"] = moments["first_rows_count"]
            # Typed ahead while the rest loads: "/" then text must land in search, not the table.
            loading_when_typed = pane.store.loading
            press_now(app, "slash", "/")
            for char in "educate":
                press_now(app, char, char)
            await until(lambda: not pane.store.loading)
            results["whole_file_read_s"] = time.perf_counter() - started
            results["loop_lag_while_reading_s"] = lag.worst
            results["rows"] = len(pane.store.rows)
            await until(lambda: search.value == "educate" or isinstance(app.screen, SampleEditor), 10)
            results["keys_during_load_to_search"] = {
                "typed_while_loading": loading_when_typed,
                "search_field_holds": search.value,
                "editor_opened": isinstance(app.screen, SampleEditor),
                "rows_changed": pane.store.dirty,
            }
            press_now(app, "escape", None)  # clear the search, back to the table
            await until(lambda: not pane.search and table.has_focus)

            # Search, while the rows are still being checked in the background: each keystroke
            # until the field shows it, and until the table shows its matches.
            results["checks_running_during_keys"] = pane._checking is not None
            slash_cpu = time.thread_time()
            press_now(app, "slash", "/")
            await until(lambda: search.has_focus)
            results["slash_ui_cpu_s"] = time.thread_time() - slash_cpu  # before the first key is sent
            keystrokes = []
            for i in range(1, len(needle) + 1):
                text = needle[:i]
                cpu = time.thread_time()  # the UI's thread: what the key cost, whatever the load
                press_now(app, needle[i - 1], needle[i - 1])
                echoed = await until(lambda text=text: search.value == text)
                echo_cpu = time.thread_time() - cpu
                shown = await until(lambda text=text: pane.search == text and not pane._searching)
                keystrokes.append(
                    {
                        "text": text,
                        "echo_s": echoed,
                        "echo_ui_cpu_s": echo_cpu,
                        "matches_s": echoed + shown,
                        "matches": table.row_count,
                    }
                )
            results["search_keystrokes"] = keystrokes
            expected = sum(1 for row in pane.store.rows if needle.lower() in row.text.lower())
            results["search_matches_correct"] = table.row_count == expected
            press_now(app, "escape", None)
            await until(lambda: not pane.search and table.has_focus and table.row_count == results["rows"])

            # Delete the sample 50 rows down: on screen, in the journal, in the file.
            target = table.cursor + 50
            for _ in range(50):
                press_now(app, "down", None)
            await until(lambda: table.cursor == target)
            before_bytes = data.read_bytes()
            rows_before, key_before = table.row_count, table.current_key
            journal = pane.store.journal_path
            stat_before = data.stat()
            sent = time.perf_counter()
            press_now(app, "d", "d")
            results["delete_on_screen_s"] = await until(
                lambda: table.row_count == rows_before - 1 and table.current_key != key_before
            )
            results["delete_journalled_when_shown"] = journal.exists()  # appended and fsynced before
            await until(lambda: data.stat().st_mtime_ns != stat_before.st_mtime_ns and not pane.store.dirty)
            results["delete_in_file_s"] = time.perf_counter() - sent
            results["loop_lag_until_saved_s"] = lag.worst
            if wait_checks:
                await until(lambda: pane.reports and not pane._checking)
                results["all_rows_checked_s"] = time.perf_counter() - started
                results["loop_lag_until_all_checked_s"] = lag.worst
            results["longest_gc_pause_s"] = gc_pauses.worst
        diff = [
            line
            for line in difflib.diff_bytes(
                difflib.unified_diff, before_bytes.split(b"\n"), data.read_bytes().split(b"\n"), n=0
            )
            if line[:1] in (b"-", b"+") and line[:3] not in (b"---", b"+++")
        ]
        results["delete_diff_lines"] = len(diff)
        results["autosave_delay_s"] = pane.autosaver.delay
        results["file_write_in_worker_s"] = moments.get("file_writes_s")
        press_now(app, "ctrl+q", None)
        await asyncio.sleep(0.5)
    return results


def _rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def run_once(master: Path, model: str, needle: str, wait_checks: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="tb-bench-") as tmp:
        workspace = Path(tmp) / "ws"
        (workspace / "datasets").mkdir(parents=True)
        data = workspace / "datasets" / "big.jsonl"
        shutil.copyfile(master, data)
        os.sync()  # a file the person made earlier: its writeback is not part of opening it
        (workspace / "tunebench.toml").write_text(
            f'[train]\nmodel = "{model}"\ndataset = ["datasets/big.jsonl"]\n', encoding="utf-8"
        )
        load_before = os.getloadavg()[0]
        with FakeEngineThread(workspace, memory_interval=3600):
            results = asyncio.run(measure(workspace, data, needle, wait_checks))
    results["load_average_before"] = round(load_before, 2)
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--model", default="no-such-model", help="`demo` counts tokens with its tokenizer")
    parser.add_argument("--search", default="q12345", help="the text typed into search")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--no-wait-checks",
        action="store_true",
        help="stop after the save (checks take minutes with a tokenizer)",
    )
    parser.add_argument("--output", help="write the runs as JSON here too")
    args = parser.parse_args()
    note_first_paint(MOMENTS)
    note_file_writes(MOMENTS)
    runs = []
    with tempfile.TemporaryDirectory(prefix="tb-bench-data-") as tmp:
        master = Path(tmp) / "big.jsonl"
        write_dataset(master, args.samples)
        file_mb = round(master.stat().st_size / 1e6, 1)
        for index in range(args.repeats):
            MOMENTS.clear()
            runs.append({"run": index + 1, "samples": args.samples, "file_mb": file_mb, "model": args.model})
            runs[-1].update(run_once(master, args.model, args.search, not args.no_wait_checks))
            print(json.dumps(_rounded(runs[-1]), indent=1), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(_rounded(runs), indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
