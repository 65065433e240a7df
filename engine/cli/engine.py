"""`tunebench engine [WORKSPACE]`: the engine process for a workspace, in the foreground.

Internal: the TUI's client starts it detached (process/client.py) and attaches over the
workspace's private Unix socket, never TCP. Nothing heavy is imported here: the engine answers
its first client before torch is ever loaded.
"""

from __future__ import annotations

import argparse


def engine_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tunebench engine",
        description="Run the engine for a workspace in the foreground (a TUI attaches to it; it listens "
        "only on the workspace's private Unix socket, never on TCP).",
    )
    parser.add_argument("workspace_arg", nargs="?", metavar="WORKSPACE", help="same as --workspace")
    parser.add_argument("--workspace", default=None, help="workspace folder (default: .)")
    args = parser.parse_args(argv)
    from ..process.server import serve

    return serve(args.workspace or args.workspace_arg or ".")
