"""Fixtures for the TUI tests: a small workspace, and a fake engine serving it."""

from __future__ import annotations

import asyncio
import inspect
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeEngineThread  # noqa: E402
from tui_helpers import write_workspace  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run `async def` tests in a fresh event loop (no pytest-asyncio / anyio plugin needed)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    # A short path: a Unix socket path must fit in 108 bytes.
    return write_workspace(tmp_path / "ws")


@pytest.fixture
def fake_engine(workspace: Path):
    with FakeEngineThread(workspace) as engine:
        yield engine
