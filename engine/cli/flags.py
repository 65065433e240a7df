"""Flag helpers the commands share: the near-miss suggestion for an unknown flag, negative numbers
as values, configs built from flags, and the parser of chat, probe and export (--adapters,
--model, --torch_dtype and the generation flags)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from typing import Any, get_type_hints

from ..core.config import ConfigError, GenerationConfig, TrainConfig, parse_value
from ..core.errors import UserError


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

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(underscored(argv, self._option_string_actions), namespace)

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


@dataclasses.dataclass(frozen=True)
class Noted:
    """An ms-swift flag with no setting here: what TuneBench does instead, and the values that
    agree with it (`fits`, lower-case text or a test of the text; none: any value). Another value
    asks for what does not happen here (other training, other answers), so it is refused rather
    than noted."""

    note: str
    fits: tuple[str, ...] | Any = ()

    def agrees(self, value: str) -> bool:
        if not self.fits:
            return True
        if callable(self.fits):
            return bool(self.fits(value))
        return value.strip().lower() in self.fits


def near(expected: float):
    """A `fits` test: the text is a number within a millionth of `expected`."""

    def test(text: str) -> bool:
        try:
            return abs(float(text) - expected) <= 1e-6 * max(1.0, abs(expected))
        except ValueError:
            return False

    return test


# `swift infer` flags that set nothing in chat and probe, each with what happens instead: accepted,
# so that a command copied from an ms-swift article runs, and said once at the start.
SWIFT_INFER_ONLY_FLAGS: dict[str, str | Noted] = {
    "merge_lora": "the adapter answers unmerged, with the same answers (`tunebench export` merges it)",
    "vllm_max_model_len": "the context is the model's own; a longer conversation is refused, saying so",
    "max_model_len": "the context is the model's own; a longer conversation is refused, saying so",
    "vllm_gpu_memory_utilization": "the model takes the memory it needs, no more",
    "gpu_memory_utilization": "the model takes the memory it needs, no more",
    "max_batch_size": "chat answers one conversation at a time; probe asks its questions together",
    "model_type": "the model's type is read from its config",
    "load_data_args": "chat answers what you type; `tunebench probe --probes FILE` asks a file of questions",
    "val_dataset": "chat answers what you type; `tunebench probe --probes FILE` asks a file of questions",
    "result_path": "probe writes its transcript under --output_dir",
    "max_length": "the context is the model's own; a longer conversation is refused, saying so",
    "stop_words": "an answer stops at the chat template's end-of-turn token",
    "num_beams": Noted("each answer is one sequence, greedy or sampled", near(1.0)),
    "logprobs": Noted("token probabilities are not shown", ("false",)),
    "use_hf": "models come from local folders and the Hugging Face cache; nothing is downloaded",
    "verbose": "the answers stream as they come, with their speed",
    "write_batch_size": "probe writes its transcript once, when every answer is in",
    "metric": "probe writes the answers side by side; judging them is yours",
    "eval_human": "chat answers what you type; probe asks a file of questions",
    "load_args": "the run's config supplies the base model, chat template and system prompt",
    "device_map": "the model loads on one GPU, or on the CPU without one",
}


def adapter_parser(prog: str, description: str, *, generation: bool = True) -> argparse.ArgumentParser:
    """The flags chat, probe and export share: the adapters, the base model, the dtype, and (for
    chat and probe) the system prompt and the generation settings."""
    parser = FlagParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument(
        "--adapters",
        "--adapter",
        "--ckpt_dir",
        nargs="+",
        action="extend",  # --adapters a b, or the flag repeated
        default=[],
        metavar="PATH",
        help="run folders, adapter folders or checkpoint folders",
    )
    parser.add_argument(
        "--model",
        "--model_id_or_path",
        default="",
        help="base model (default: the one the adapter's run recorded, else demo)",
    )
    parser.add_argument(
        "--torch_dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="auto: chat/probe use bfloat16 on a GPU that has it, else float32 (always on a CPU); "
        "export merges in bfloat16 on a GPU box or for QLoRA, else in the base's saved dtype",
    )
    if generation:
        parser.add_argument("--system", default=None, help="system prompt (default: the run's)")
        parser.add_argument(
            "--template",
            default="",
            help="chat template (default: the run's, else the tokenizer's own): chatml, qwen, llama3, "
            "or ms-swift's name for the model's own (qwen2_5, ...)",
        )
        parser.add_argument(
            "--infer_backend",
            default="pt",
            help="pt, the built-in one; another (vllm, from a `swift infer` command) is accepted with a "
            "note: `tunebench deploy --infer_backend vllm` serves through vLLM",
        )
        add_noted_flags(parser, "`swift infer` flags with nothing to set here", SWIFT_INFER_ONLY_FLAGS)
        group = parser.add_argument_group("generation")
        hints = get_type_hints(GenerationConfig)
        for f in dataclasses.fields(GenerationConfig):
            group.add_argument(
                f"--{f.name}",
                default=None,
                metavar=hints[f.name].__name__.upper(),
                help=f"{f.metadata['help']} (default: {f.default})",
            )
    return parser


def add_noted_flags(parser: argparse.ArgumentParser, title: str, notes: dict[str, str | Noted]) -> None:
    """ms-swift flags that set nothing here, accepted (with any value, or one that agrees with what
    happens here) so that a copied command runs; say_noted_flags says what happens instead."""
    group = parser.add_argument_group(f"{title} (accepted, and said)")
    for name, note in notes.items():
        text = note.note if isinstance(note, Noted) else note
        group.add_argument(
            f"--{name}", dest=f"swift_{name}", nargs="?", const="true", metavar="VALUE", help=text
        )


def say_noted_flags(args: argparse.Namespace, notes: dict[str, str | Noted]) -> None:
    """A note, on stderr, for each of add_noted_flags' flags that was given; ConfigError for every
    one given a value that asks for what does not happen here, before anything is said."""
    for line in noted_flag_notes(args, notes):
        print(f"note: {line}", file=sys.stderr, flush=True)


def noted_flag_notes(args: argparse.Namespace, notes: dict[str, str | Noted]) -> list[str]:
    """say_noted_flags' notes, as lines ("--packing true: samples are always packed ...")."""
    given = {name: getattr(args, f"swift_{name}") for name in notes}
    given = {name: value for name, value in given.items() if value is not None}
    refused = {
        name: f"{value!r} is not done here: {note.note}; leave --{name} out"
        for name, value in given.items()
        if isinstance(note := notes[name], Noted) and not note.agrees(value)
    }
    if refused:
        raise ConfigError(refused)
    lines = []
    for name, value in given.items():
        note = notes[name]
        text = note.note if isinstance(note, Noted) else note
        shown = "..." if name.endswith("token") else value  # a secret stays off the screen and the logs
        lines.append(f"--{name} {shown}: {text}")
    return lines


def say_swift_infer_flags(args: argparse.Namespace) -> None:
    """A note for each `swift infer` flag given that sets nothing in chat or probe."""
    if args.infer_backend != "pt":
        print(
            f"note: --infer_backend {args.infer_backend}: chat and probe answer with the built-in "
            "backend (pt); `tunebench deploy --infer_backend vllm` serves through vLLM",
            file=sys.stderr,
            flush=True,
        )
    say_noted_flags(args, SWIFT_INFER_ONLY_FLAGS)


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return config_from_args(args, GenerationConfig)


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    return parser.parse_args(join_negative_numbers(argv))
