"""`python -m tunebench.engine.cli.engine serve --workspace DIR`: the engine process that the TUI starts.

Also `status [DIR]` (what `tunebench status` prints). Nothing heavy is imported here: the engine
answers its first client before torch is ever loaded.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None, prog: str = "python -m tunebench.engine.cli.engine") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve",
        help="run the engine for a workspace in the foreground (a TUI attaches to it; it listens "
        "only on the workspace's private Unix socket, never on TCP)",
    )
    serve_parser.add_argument("workspace_arg", nargs="?", metavar="WORKSPACE", help="same as --workspace")
    serve_parser.add_argument("--workspace", default=None, help="workspace folder (default: .)")
    status_parser = commands.add_parser("status", help="print the engine's or the last run's state")
    status_parser.add_argument("workspace", nargs="?", default=".")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    if args.command == "status":
        from ..process.client import status_text

        print(status_text(args.workspace))
        return 0
    from ..process.server import serve

    return serve(args.workspace or args.workspace_arg or ".")


if __name__ == "__main__":
    raise SystemExit(main())
