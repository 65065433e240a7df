"""`tunebench status` and `tunebench stop`: the engine's live state headless, and ending it."""

from __future__ import annotations

from pathlib import Path


def status_main(argv: list[str]) -> int:
    from ..process.client import status_text

    print(status_text(Path(argv[0] if argv else ".").resolve()))
    return 0


def stop_main(argv: list[str]) -> int:
    from ..process.client import stop_engine

    say = lambda line: print(line, flush=True)  # noqa: E731 - what it waits for, at once
    print(stop_engine(Path(argv[0] if argv else ".").resolve(), say=say))
    return 0
