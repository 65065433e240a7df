"""The type checker in the suite: mypy over the modules and with the settings in pyproject's
[tool.mypy] (the torch-free core, where every function carries its types, and the engine's
modules the TUI and the engine process share), so a wrong or missing hint fails like a test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is a dev tool: pip install -e '.[dev]'")

REPO = Path(__file__).resolve().parent.parent


def test_the_typed_modules_type_check():
    # A subprocess, so the check sees the files as they are and the cache in .mypy_cache keeps a
    # second run to a few seconds.
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        pytest.fail(f"mypy found problems:\n{result.stdout}{result.stderr}", pytrace=False)
