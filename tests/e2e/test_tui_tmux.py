"""End to end, as a person over SSH: `tunebench` on the demo model inside tmux, driven by keys.

In an 80x24 terminal it edits a sample, trains a few steps, and chats with base and adapter side
by side, reading the screen with `tmux capture-pane`. It takes minutes on a CPU (it loads the
demo model and trains), so a plain `pytest` skips it; run it with

    TUNEBENCH_E2E=1 pytest tests/e2e      or      python tests/e2e/test_tui_tmux.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux"),
    pytest.mark.skipif(not os.environ.get("TUNEBENCH_E2E"), reason="set TUNEBENCH_E2E=1 to run it"),
]

SETTINGS = """[train]
model = "demo"
dataset = ["datasets/self_cognition.jsonl"]
model_name = ["小蜂", "TuneBee"]
model_author = ["TuneBench团队", "the TuneBench team"]
learning_rate = 0.002
per_device_train_batch_size = 4
max_steps = 4
logging_steps = 1
save_steps = 2
max_length = 128
gradient_checkpointing = false
"""


class Tmux:
    def __init__(self, command: str, width: int = 80, height: int = 24) -> None:
        self.name = f"tb-e2e-{uuid.uuid4().hex[:8]}"
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), command],
            check=True,
        )

    def screen(self) -> str:
        result = subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True
        )
        return result.stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        subprocess.run(
            ["tmux", "send-keys", "-t", self.name, *(["-l"] if literal else []), *keys], check=True
        )
        time.sleep(0.3)

    def type(self, text: str) -> None:
        self.keys(text, literal=True)

    def wait_for(self, *texts: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if all(text in screen for text in texts):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{texts} not on screen after {timeout:.0f}s:\n{screen}")
            time.sleep(0.5)

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def tunebench_command(workspace: Path) -> str:
    exe = Path(sys.executable).with_name("tunebench")
    return f"{exe} {workspace}" if exe.exists() else f"{sys.executable} -m tunebench.tui {workspace}"


def shut_down_engine(workspace: Path) -> None:
    from tunebench.engine.core import protocol as P
    from tunebench.engine.process.client import EngineConnection, EngineUnavailable

    try:
        with EngineConnection.open(workspace, timeout=5) as conn:
            conn.send(P.Shutdown())
    except (EngineUnavailable, OSError):
        pass


def run_e2e(workspace: Path) -> None:
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / "tunebench.toml").write_text(SETTINGS, encoding="utf-8")
    data = workspace / "datasets" / "self_cognition.jsonl"
    tmux = Tmux(tunebench_command(workspace))
    try:
        tmux.wait_for("engine connected", "self_cognition.jsonl", timeout=60)
        # edit the first sample's answer in the editor's text fields, apply, save
        tmux.keys("e")
        tmux.wait_for("ctrl+s apply", "Assistant")
        tmux.keys("F7")  # select the answer (the field that has the focus)
        tmux.type("I am {{NAME}}, made by {{AUTHOR}} in tmux.")
        tmux.keys("C-s")
        tmux.keys("C-s")
        tmux.wait_for("saved self_cognition.jsonl", timeout=10)
        first = json.loads(data.read_text(encoding="utf-8").splitlines()[0])
        assert first["messages"][1]["content"].endswith("in tmux.")
        # train a few steps
        tmux.keys("F5")
        tmux.keys("s")
        screen = tmux.wait_for("completed", "step 4/4", timeout=600)
        assert "train loss" in screen
        # chat: base and the new adapter answer side by side
        tmux.keys("F6")
        tmux.wait_for("base", " final")
        tmux.type("Who are you?")
        tmux.keys("Enter")
        deadline = time.monotonic() + 300
        while tmux.screen().count("tok/s") < 2:
            assert time.monotonic() < deadline, tmux.screen()
            time.sleep(1)
        print(tmux.screen())
        # a second turn goes on from each column's own answer
        tmux.type("And who made you?")
        tmux.keys("Enter")
        tmux.wait_for("And who made you?")
        deadline = time.monotonic() + 300
        while tmux.screen().count("tok/s") < 2 or "answering" in tmux.screen():
            assert time.monotonic() < deadline, tmux.screen()
            time.sleep(1)
        # escape leaves the prompt, so the digit keys switch panes again
        tmux.keys("Escape")
        tmux.keys("1")
        tmux.wait_for("datasets/self_cognition.jsonl", "a Add", timeout=10)
        tmux.keys("C-q")
    finally:
        tmux.kill()
        shut_down_engine(workspace)


def test_tui_in_tmux_edit_train_chat(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    run_e2e(workspace)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="tb-e2e-") as folder:
        run_e2e(Path(folder) / "ws")
