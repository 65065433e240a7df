"""`python -m tunebench.tui [WORKSPACE] [--model M]`: the workbench without the CLI's other commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from .app import run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tunebench.tui")
    parser.add_argument("workspace", nargs="?", default=".")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    return run(Path(args.workspace), args.model)


if __name__ == "__main__":
    raise SystemExit(main())
