"""Paths as the TUI shows and stores them: relative to the workspace when inside it."""

from __future__ import annotations

from pathlib import Path


def short_path(path: str | Path, workspace: Path) -> str:
    """ "runs/0612/adapter" for a path in the workspace (the engine resolves it the same way),
    else the path as given."""
    try:
        return str(Path(path).relative_to(workspace))
    except ValueError:
        return str(path)
