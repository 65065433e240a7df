"""The `tunebench` command: the TUI by default, and headless train / chat / probe / export / deploy / status.

Each subcommand lives in its own module, imported only when it runs: heavy libraries load only
inside the subcommand that needs them, and `tunebench` with no subcommand opens the TUI without
ever importing torch. Errors a person can fix (a bad flag, a missing file) end here as one line
and a hint.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import warnings
from pathlib import Path

from ..core.config import ConfigError
from ..core.errors import UserError
from ..core.files import access_failure

SUBCOMMANDS = ("train", "chat", "probe", "export", "deploy", "serve", "status", "stop", "engine", "demo")
# What people type from ms-swift (`swift sft`) and LLaMA-Factory (`llamafactory-cli webui`) habit:
# each would otherwise open the workbench in a new folder of that name.
OTHER_TOOLS_COMMANDS = {
    "sft": "train",
    "pt": "train",
    "infer": "chat",
    "eval": "probe",
    "merge-lora": "export",
    "api": "deploy",
    "app": "",
    "web-ui": "",
    "webui": "",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices from inside transformers/peft are for their maintainers, not for users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else ""
    rest = argv[1:] if command else argv
    try:
        if not command and argv:
            _refuse_misspelled_command(argv[0])
        if command == "train":
            from .train import train_main

            return train_main(rest)
        if command == "demo":
            from .demo import demo_main

            return demo_main(rest)
        if command == "chat":
            from .chat import chat_main

            return chat_main(rest)
        if command == "probe":
            from .probe import probe_main

            return probe_main(rest)
        if command == "export":
            from .export import export_main

            return export_main(rest)
        if command in ("deploy", "serve"):  # serve: vLLM's name for the same thing
            from .deploy import main as deploy_main

            return deploy_main(rest, prog=f"tunebench {command}")
        if command == "status":
            from .status import status_main

            return status_main(rest)
        if command == "stop":
            from .status import stop_main

            return stop_main(rest)
        if command == "engine":
            from .engine import engine_main

            return engine_main(rest)
        return _tui_main(rest)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        program = f"tunebench {command}".strip()
        print(
            f"error: {exc}\n  hint: change the flag(s) above; `{program} --help` shows each flag's "
            "allowed values and default",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:
        # `tunebench status ws | head`: the reader has gone, which is not an error of the disk.
        # Point stdout at /dev/null so Python's exit-time flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # A full disk, a folder that cannot be written or entered: the person's to fix, not a bug to trace.
        failure = access_failure(exc)
        if failure is not None:
            print(f"error: {failure}", file=sys.stderr)
            return 2
        where = f": {exc.filename}" if exc.filename else ""
        print(
            f"error: {exc.strerror or exc}{where}\n  hint: check that the path exists, is writable "
            "and that the disk has space",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:  # before a command installed its own handling (imports, model load)
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        return 130


def _refuse_misspelled_command(word: str) -> None:
    """`tunebench trian ...` would otherwise open the TUI on a new folder named "trian"."""
    if word.startswith("-") or Path(word).expanduser().exists():
        return
    if word in OTHER_TOOLS_COMMANDS:
        ours = OTHER_TOOLS_COMMANDS[word]
        raise UserError(
            f"unknown command {word!r} (ms-swift's or LLaMA-Factory's name): TuneBench's is "
            + (f"`tunebench {ours}`" if ours else "`tunebench [WORKSPACE]`, the workbench in this terminal"),
            f"`tunebench --help` lists the commands; to open a new workspace named {word}, write ./{word}",
        )
    if word == "rlhf":
        raise UserError(
            "unknown command 'rlhf': TuneBench fine-tunes with supervised data (LoRA, QLoRA), not RLHF",
            "`tunebench train` takes the same dataset flags as `swift sft`",
        )
    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1, cutoff=0.75)
    if close:
        raise UserError(
            f"unknown command {word!r}: did you mean `tunebench {close[0]}`?",
            f"`tunebench --help` lists the commands; to open a new workspace named {word}, write ./{word}",
        )


def _usage() -> str:
    return """usage: tunebench [WORKSPACE]            open the workbench (TUI) in WORKSPACE (default: .)
       tunebench train [flags]          fine-tune headless (ms-swift flags; --help lists them)
       tunebench demo                   identity fine-tune of the demo model, answers before/after
       tunebench chat --adapters DIR    chat with a base model and adapter (--compare: side by side)
       tunebench probe --adapters DIR   run a probe set against base and adapters, save a transcript
       tunebench export --adapters DIR  merge an adapter into its base and save a model
       tunebench deploy --adapters DIR  serve base and adapters over an OpenAI-compatible HTTP API
                                        (alias: tunebench serve)
       tunebench status [WORKSPACE]     show the engine's live state headless
       tunebench stop [WORKSPACE]       stop the engine (a running training saves a checkpoint)
       tunebench engine [WORKSPACE]     run the engine process in the foreground (the TUI starts it)"""


def _tui_main(argv: list[str]) -> int:
    usage = _usage().removeprefix("usage: ")  # argparse writes its own "usage: "
    parser = argparse.ArgumentParser(prog="tunebench", usage=usage)
    parser.add_argument("workspace", nargs="?", default=".")
    parser.add_argument("--model", default=None, help="base model for this workspace (default: demo)")
    parser.add_argument(
        "--yes", "-y", action="store_true", help="make a folder of other files a workspace without asking"
    )
    args = parser.parse_args(argv)
    workspace = Path(args.workspace).expanduser()
    if workspace.exists() and not workspace.is_dir():
        raise UserError(
            f"{workspace} is a file, not a workspace folder", "give a folder (it is created if new)"
        )
    if not _has_terminal():
        raise UserError(
            "the workbench needs a terminal, and this one's input or output is not one (a pipe, a "
            "file, a cron job)",
            "run `tunebench` in an SSH session or tmux; without a terminal use the headless "
            "commands: tunebench train | chat | probe | export | deploy",
        )
    if not args.yes and not _may_become_workspace(workspace):
        return 1
    workspace.mkdir(parents=True, exist_ok=True)
    from tunebench.tui.app import run  # the UI side; never imports torch

    return run(workspace.resolve(), model=args.model) or 0


if __name__ == "__main__":
    raise SystemExit(main())


def _has_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _may_become_workspace(folder: Path) -> bool:
    """A new or empty folder, or a workspace, opens at once; a folder of other files (a project,
    a home folder) gets TuneBench's folders only when the person says yes on the terminal."""
    from ..core.workspace import Workspace

    ws = Workspace(folder)
    if not folder.is_dir() or ws.is_workspace() or not any(folder.iterdir()):
        return True
    parts = " ".join(ws.parts_to_create())
    place = str(ws.root)
    print(f"{place} holds other files and is not a TuneBench workspace.\nOpening it creates {parts} in it.")
    try:
        answer = input("Create them? [y/N] ")
    except EOFError:  # Ctrl-D: no
        answer = ""
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("nothing created; `tunebench NEW-FOLDER` starts a workspace in a folder of its own")
    return False
