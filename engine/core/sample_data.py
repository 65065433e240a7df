"""Where the sample datasets and probes are: sample_data/ of the source checkout (installs are
editable), else ./sample_data. The demo, the probe set and a fresh TUI workspace all look here."""

from __future__ import annotations

from pathlib import Path


def find_sample_data() -> Path | None:
    """The sample_data/ folder (the one holding self_cognition.jsonl), or None."""
    for candidate in (Path(__file__).resolve().parents[2] / "sample_data", Path.cwd() / "sample_data"):
        if (candidate / "self_cognition.jsonl").is_file():
            return candidate
    return None
