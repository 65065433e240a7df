"""`tunebench status` and `tunebench stop`: the engine's live state headless, and ending it."""

from __future__ import annotations

import argparse
from pathlib import Path


def _workspace(prog: str, description: str, argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("workspace", nargs="?", default=".", help="the workspace folder (default: .)")
    return Path(parser.parse_args(argv).workspace).expanduser().resolve()


def status_main(argv: list[str]) -> int:
    from ..process.client import status_text

    workspace = _workspace(
        "tunebench status", "Show the engine's live state: its job, run, step and loss.", argv
    )
    print(status_text(workspace))
    return 0


def stop_main(argv: list[str]) -> int:
    from ..process.client import stop_engine

    workspace = _workspace(
        "tunebench stop", "Stop the workspace's engine; a running training saves a checkpoint first.", argv
    )
    say = lambda line: print(line, flush=True)  # noqa: E731 - what it waits for, at once
    print(stop_engine(workspace, say=say))
    return 0
