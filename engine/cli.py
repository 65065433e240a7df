"""The `tunebench` command: the TUI by default, and headless train / chat / probe / export / status.

Flags for `train` are generated from TrainConfig, in the spelling ms-swift articles use, so a
copied `swift sft ...` command runs with `swift sft` replaced by `tunebench train`. Heavy
libraries are imported only inside the subcommand that needs them: `tunebench` with no
subcommand opens the TUI without ever importing torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from .config import ConfigError, TrainConfig, parse_value
from .errors import UserError

SUBCOMMANDS = ("train", "chat", "probe", "export", "deploy", "status", "stop", "serve", "demo")


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
            return train_main(rest)
        if command == "demo":
            from .demo import demo_main

            return demo_main(rest)
        if command in ("chat", "probe", "export"):
            from . import chat_cli

            return getattr(chat_cli, f"{command}_main")(rest)
        if command == "deploy":
            from .deploy.command import main as deploy_main

            return deploy_main(rest)
        if command == "status":
            from .server import status_text

            print(status_text(Path(rest[0] if rest else ".").resolve()))
            return 0
        if command == "stop":
            from .client import stop_engine

            say = lambda line: print(line, flush=True)  # noqa: E731 - what it waits for, at once
            print(stop_engine(Path(rest[0] if rest else ".").resolve(), say=say))
            return 0
        if command == "serve":
            from .__main__ import main as engine_main

            return engine_main(["serve", *rest], prog="tunebench")
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
        # A full disk, a folder without write permission: the person's to fix, not a bug to trace.
        where = f": {exc.filename}" if exc.filename else ""
        print(
            f"error: {exc.strerror or exc}{where}\n  hint: check that the path exists, is writable "
            "and that the disk has space",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


def _refuse_misspelled_command(word: str) -> None:
    """`tunebench trian ...` would otherwise open the TUI on a new folder named "trian"."""
    if word.startswith("-") or Path(word).expanduser().exists():
        return
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
       tunebench status [WORKSPACE]     show the engine's live state headless
       tunebench stop [WORKSPACE]       stop the engine (a running training saves a checkpoint)
       tunebench serve [--workspace D]  run the engine process in the foreground"""


def _tui_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tunebench", usage=_usage())
    parser.add_argument("workspace", nargs="?", default=".")
    parser.add_argument("--model", default=None, help="base model for this workspace (default: demo)")
    args = parser.parse_args(argv)
    workspace = Path(args.workspace).expanduser()
    if workspace.exists() and not workspace.is_dir():
        raise UserError(
            f"{workspace} is a file, not a workspace folder", "give a folder (it is created if new)"
        )
    workspace.mkdir(parents=True, exist_ok=True)
    from tunebench.tui.app import run  # the UI side; never imports torch

    return run(workspace.resolve(), model=args.model) or 0


# -------------------------------------------------------------------- train


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        if "unrecognized arguments" in message:
            flags = message.split(":", 1)[1].split()
            unknown = [f for f in flags if f.startswith("-")] or flags
            named = ", ".join(f"{flag}{suggest_flag(flag, self._option_string_actions)}" for flag in unknown)
            message = f"unknown flag {named}; `{self.prog} --help` lists the flags TuneBench knows"
        else:
            message = f"{message}; see `{self.prog} --help`"
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def suggest_flag(flag: str, known: Any) -> str:
    """' (did you mean --lora_rank?)' for --lora_rnak, --lora-rank or -lora_rank; '' if none is close."""
    if not flag.startswith("-"):
        return ""
    body = flag.split("=", 1)[0].lstrip("-").replace("-", "_")
    names = {option.lstrip("-"): option for option in known if option.startswith("--")}
    match = [body] if body in names else difflib.get_close_matches(body, list(names), n=1, cutoff=0.75)
    return f" (did you mean {names[match[0]]}?)" if match else ""


def build_train_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tunebench train",
        allow_abbrev=False,
        description="Fine-tune a chat model with LoRA or QLoRA, headless.",
    )
    hints = get_type_hints(TrainConfig)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        names = [f"--{f.name}", *(f"--{a}" for a in meta.get("aliases", ()))]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        extra: dict[str, Any] = {}
        if get_origin(hints[f.name]) is list:
            extra["nargs"] = "+"
        elif hints[f.name] is bool:
            extra.update(nargs="?", const="true")  # --flag, --flag true, --flag false
        choices = f" {{{','.join(map(str, meta['choices']))}}}" if "choices" in meta else ""
        group.add_argument(
            *names,
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{meta['help']}{choices} (default: {default!r})",
            **extra,
        )
    parser.add_argument("--json", action="store_true", help="print one JSON object per event")
    return parser


def join_negative_numbers(argv: list[str]) -> list[str]:
    """`--lr -1e-4` -> `--lr=-1e-4`: argparse would read "-1e-4" as a flag, and then the range
    check could never say what is wrong with the value."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and token.startswith("-"):
            try:
                float(token)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={token}"
                continue
        out.append(token)
    return out


def config_from_args(ns: argparse.Namespace, cls: type = TrainConfig) -> Any:
    """Build a config dataclass (TrainConfig, GenerationConfig) from parsed flags; every bad value
    is reported at once."""
    values: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        raw = getattr(ns, f.name)
        if raw is None:
            continue
        try:
            values[f.name] = parse_value(cls, f.name, raw)
        except ValueError as exc:
            problems[f.name] = str(exc)
    if problems:
        raise ConfigError(problems)
    return cls(**values)


def train_main(argv: list[str]) -> int:
    args = build_train_parser().parse_args(join_negative_numbers(argv))
    cfg = config_from_args(args)
    if not cfg.dataset:
        raise UserError(
            "no training data: --dataset is required",
            "for example --dataset sample_data/self_cognition.jsonl#50",
        )
    from .preflight import preflight

    preflight(cfg)
    from .train import StopSignal, run_training

    stop = StopSignal()
    previous = _install_stop_handlers(stop)
    renderer = JsonRenderer() if args.json else ProgressRenderer()
    try:
        result = run_training(cfg, renderer, stop)
    finally:
        renderer.close()
        for signum, handler in previous.items():  # main() may be called in-process (tests)
            signal.signal(signum, handler)
    return 0 if result.status == "completed" else (130 if result.status == "aborted" else 0)


def _install_stop_handlers(stop) -> dict[int, Any]:
    def on_signal(signum, _frame) -> None:
        if stop.mode:
            stop.request("abort")
            print("\naborting now (no checkpoint)", file=sys.stderr)
        else:
            stop.request("graceful")
            print(
                "\nstopping after this step and saving a checkpoint; press Ctrl-C again to abort",
                file=sys.stderr,
            )

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return previous


class JsonRenderer:
    def __call__(self, event) -> None:
        import orjson

        sys.stdout.buffer.write(orjson.dumps(event.to_dict()) + b"\n")
        sys.stdout.flush()

    def close(self) -> None:
        pass


class ProgressRenderer:
    """A progress bar with step, loss, tokens/s and ETA; one-line notes for everything else."""

    def __init__(self) -> None:
        self.bar = None

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def __call__(self, event) -> None:
        kind = event.type
        if kind == "ModelLoaded":
            self._print(
                f"model   {event.model}: {event.parameters / 1e6:.1f}M parameters, "
                f"{event.dtype} on {event.device}, loaded in {event.seconds:.1f}s"
            )
        elif kind == "DataReport":
            self._print(
                f"data    {event.samples} training samples, {event.eval_samples} eval, "
                f"{event.tokens} tokens; {event.truncated} truncated, {event.dropped} dropped"
            )
            for problem in event.problems[:20]:
                self._print(f"  skipped {problem}")
            if len(event.problems) > 20:
                self._print(f"  ... and {len(event.problems) - 20} more")
        elif kind == "TrainStarted":
            self._print(f"run     {event.run_dir} ({event.trainable_parameters / 1e6:.2f}M trainable)")
            from tqdm import tqdm

            self.bar = tqdm(
                total=event.total_steps,
                initial=event.start_step,
                unit="step",
                dynamic_ncols=True,
                disable=None,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
            )
        elif kind == "TrainStep" and self.bar is not None:
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix_str(
                f"loss {event.loss:.4f}, lr {event.lr:.2e}, {event.tokens_per_s:,.0f} tok/s", refresh=True
            )
            if self.bar.disable:  # not a terminal: one plain line per logged step
                self._print(
                    f"step {event.step}/{event.total_steps} loss {event.loss:.4f} "
                    f"lr {event.lr:.2e} {event.tokens_per_s:,.0f} tok/s eta {_fmt_s(event.eta_s)}"
                )
        elif kind == "EvalResult":
            self._print(f"eval    step {event.step}: eval_loss {event.eval_loss:.4f}")
        elif kind == "CheckpointSaved":
            self._print(f"saved   {event.path}")
        elif kind == "Log":
            self._print(f"note    {event.message}")
        elif kind == "TrainFinished":
            self.close()
            loss = "" if math.isnan(event.final_loss) else f", final loss {event.final_loss:.4f}"
            print(f"{event.status} after {event.steps} steps in {_fmt_s(event.seconds)}{loss}")
            if event.adapter_dir:
                print(
                    f"adapter {event.adapter_dir}\n"
                    f"try it  tunebench chat --adapters {event.adapter_dir} --compare"
                )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt_s(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 60}:{seconds % 60:02d}"
        if seconds < 3600
        else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    )


if __name__ == "__main__":
    raise SystemExit(main())
