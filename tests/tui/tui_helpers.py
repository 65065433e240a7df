"""Shared pieces of the TUI tests: a small workspace on disk, and waiting in pilot tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import orjson

MINI_RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am {{NAME}}."},
        ]
    },
    {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
    {"instruction": "Name a colour.", "output": "Blue."},
    {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there!"}]},
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "", "output": ""},
]
SETTINGS = """[train]
model = "no-such-model"
dataset = ["datasets/mini.jsonl"]
model_name = ["TuneBee"]
model_author = ["the TuneBench team"]
"""


def write_workspace(root: Path) -> Path:
    (root / "datasets").mkdir(parents=True)
    (root / "datasets" / "mini.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in MINI_RECORDS))
    (root / "tunebench.toml").write_text(SETTINGS, encoding="utf-8")
    return root


def no_start(workspace: Path, timeout: float) -> None:
    """The app's starter in tests: the fake engine is already listening; never launch a real one."""


async def wait_until(pilot, predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await pilot.pause(0.02)


def record_notices(app) -> list[str]:
    """Every notice the app gives from now on. app._notifications drops a notice once its few
    seconds on screen are over, which a busy CI box can take to reach the assert."""
    said: list[str] = []
    notify = app.notify

    def recording(message, **options):
        said.append(str(message))
        return notify(message, **options)

    app.notify = recording
    return said
