"""Reading flags: the parser every command uses (unknown flags named with a suggestion), typed
values from flags, and ms-swift's flags that set nothing here (Noted). In core, so that the
workbench reads a pasted command as the command line does (engine/core/train_flags.py)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
from collections.abc import Callable
from typing import Any

from .config import ConfigError, TrainConfig, parse_value
from .errors import UserError


def suggest_flag(flag: str, known: Any) -> str:
    """' (did you mean --lora_rank?)' for --lora_rnak, --lora-rank or -lora_rank; '' if none is close."""
    if not flag.startswith("-"):
        return ""
    body = flag.split("=", 1)[0].lstrip("-").replace("-", "_")
    names = {option.lstrip("-"): option for option in known if option.startswith("--")}
    match = [body] if body in names else difflib.get_close_matches(body, list(names), n=1, cutoff=0.75)
    return f" (did you mean {names[match[0]]}?)" if match else ""


def underscored(argv: list[str], known: Any) -> list[str]:
    """`--lora-rank 8` / `--lora-rank=8` -> `--lora_rank ...` where only the underscore spelling is
    a flag; values, and everything after a bare `--`, stay as typed."""
    out: list[str] = []
    for n, token in enumerate(argv):
        if token == "--":
            return out + argv[n:]
        name, sep, value = token.partition("=")
        spelled = "--" + name[2:].replace("-", "_")
        if name.startswith("--") and name not in known and spelled in known:
            token = f"{spelled}{sep}{value}"
        out.append(token)
    return out


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
    return cls(**flag_values(ns, cls))


def flag_values(ns: argparse.Namespace, cls: type = TrainConfig) -> dict[str, Any]:
    """The typed values of the flags given (those left out are absent); ConfigError for bad ones."""
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
    return values


class FlagParser(argparse.ArgumentParser):
    """Unknown flags named with a suggestion, bad values with the flag: a message and exit 2, no
    traceback. --lora-rank is read as --lora_rank (HF and other tools spell flags with hyphens).
    `raises`: a UserError with the message instead (the workbench reads pasted commands)."""

    raises = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(underscored(argv, self._option_string_actions), namespace)

    def print_help(self, file: Any = None) -> None:
        if not self.raises:  # the workbench's screen is no place for argparse's print
            super().print_help(file)

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if self.raises:  # -h in a pasted command: argparse would end the workbench
            raise UserError(
                "-h/--help is not a setting", f"leave it out; `{self.prog} --help` in a shell lists the flags"
            )
        super().exit(status, message)

    def error(self, message: str) -> None:  # type: ignore[override]
        if "unrecognized arguments" in message:
            flags = message.split(":", 1)[1].split()
            unknown = [f for f in flags if f.startswith("-")]
            if unknown:
                named = ", ".join(
                    f"{flag}{suggest_flag(flag, self._option_string_actions)}" for flag in unknown
                )
                message = f"unknown flag {named}; `{self.prog} --help` lists the flags TuneBench knows"
            else:  # `tunebench train demo`: a value with no flag before it
                words = " ".join(flags)
                message = (
                    f"{words!r} has no flag before it: `{self.prog}` takes flags, each with its value "
                    f"(for example --model demo); `{self.prog} --help` lists them"
                )
        else:
            message = f"{message}; see `{self.prog} --help`"
        if self.raises:
            raise UserError(message)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


# ms-swift's --use_hf (hub or ModelScope), which every command may be given: the same answer everywhere.
NO_DOWNLOADS = "models come from local folders and the Hugging Face cache; nothing is downloaded"


@dataclasses.dataclass(frozen=True)
class Noted:
    """An ms-swift flag with no setting here: what TuneBench does instead, and the values that
    agree with it (`fits`, lower-case text or a test of the text; none: any value). Another value
    asks for what does not happen here (other training, other answers), so it is refused rather
    than noted."""

    note: str
    fits: tuple[str, ...] | Any = ()
    many: bool = False  # a list in ms-swift (--val_dataset a.jsonl b.jsonl)

    def agrees(self, value: str) -> bool:
        if not self.fits:
            return True
        if callable(self.fits):
            return bool(self.fits(value))
        return value.strip().lower() in self.fits


def near(expected: float) -> Callable[[str], bool]:
    """A `fits` test: the text is a number within a millionth of `expected`, relative (an epsilon of
    1e-8 is not met by 1e-7)."""

    def test(text: str) -> bool:
        try:
            return math.isclose(float(text), expected, rel_tol=1e-6, abs_tol=0.0 if expected else 1e-12)
        except ValueError:
            return False

    return test


def add_noted_flags(parser: argparse.ArgumentParser, title: str, notes: dict[str, str | Noted]) -> None:
    """ms-swift flags that set nothing here, accepted (with any value, or one that agrees with what
    happens here) so that a copied command runs; say_noted_flags says what happens instead."""
    group = parser.add_argument_group(f"{title} (accepted, and said)")
    for name, note in notes.items():
        if isinstance(note, Noted) and note.many:
            taken: dict[str, Any] = {"nargs": "+", "action": "extend"}
        else:
            taken = {"nargs": "?", "const": "true"}
        group.add_argument(f"--{name}", dest=f"swift_{name}", metavar="VALUE", help=_note_text(note), **taken)


def noted_flag_notes(args: argparse.Namespace, notes: dict[str, str | Noted]) -> list[str]:
    """say_noted_flags' notes, as lines ("--packing true: samples are always packed ...")."""
    given = {name: getattr(args, f"swift_{name}") for name in notes}
    given = {
        name: " ".join(value) if isinstance(value, list) else value
        for name, value in given.items()
        if value is not None
    }
    refused = {
        name: f"{value!r} is not done here: {note.note}; leave --{name} out"
        for name, value in given.items()
        if isinstance(note := notes[name], Noted) and not note.agrees(value)
    }
    if refused:
        raise ConfigError(refused)
    lines = []
    for name, value in given.items():
        shown = "..." if name.endswith("token") else value  # a secret stays off the screen and the logs
        lines.append(f"--{name} {shown}: {_note_text(notes[name])}")
    return lines


def _note_text(note: str | Noted) -> str:
    return note.note if isinstance(note, Noted) else note
