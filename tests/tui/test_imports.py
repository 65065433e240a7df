"""Import hygiene: the TUI must never pull in torch or the libraries built on it."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def test_tui_imports_no_torch():
    code = (
        "import sys, tunebench.tui.app, tunebench.tui.__main__;"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r});"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the TUI imported {result.stdout.strip()}"
