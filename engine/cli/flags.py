"""The parser of chat, probe and export (--adapters, --model, --torch_dtype and the generation
flags), `swift infer`'s flags that set nothing here, and the notes said for such flags. The
reading of flags itself (the parser class, typed values, Noted) is engine/core/flag_parsing.py,
which the workbench shares."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import get_origin, get_type_hints

from ..core.config import GenerationConfig
from ..core.flag_parsing import (  # noqa: F401 - the commands take these from here
    NO_DOWNLOADS,
    FlagParser,
    Noted,
    add_noted_flags,
    config_from_args,
    flag_values,
    join_negative_numbers,
    near,
    noted_flag_notes,
    parse_bool,
)

# `swift infer` flags that set nothing in chat and probe, each with what happens instead: accepted,
# so that a command copied from an ms-swift article runs, and said once at the start.
OWN_CONTEXT = "the context is the model's own; a longer conversation is refused, saying so"
SWIFT_INFER_ONLY_FLAGS: dict[str, str | Noted] = {
    "merge_lora": "the adapter answers unmerged, with the same answers (`tunebench export` merges it)",
    "vllm_max_model_len": OWN_CONTEXT,
    "max_model_len": OWN_CONTEXT,
    "vllm_gpu_memory_utilization": "the model takes the memory it needs, no more",
    "gpu_memory_utilization": "the model takes the memory it needs, no more",
    "max_batch_size": "chat answers one conversation at a time; probe asks its questions together",
    "model_type": "the model's type is read from its config",
    "load_data_args": "chat answers what you type; `tunebench probe --probes FILE` asks a file of questions",
    "val_dataset": Noted(
        "chat answers what you type; `tunebench probe --probes FILE` asks a file of questions", many=True
    ),
    "result_path": "probe writes its transcript under --output_dir",
    "max_length": OWN_CONTEXT,
    "num_beams": Noted("each answer is one sequence, greedy or sampled", near(1.0)),
    "logprobs": Noted("token probabilities are not shown", ("false",)),
    "use_hf": NO_DOWNLOADS,
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
            many = get_origin(hints[f.name]) is list  # --stop_words A B, or the flag repeated
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            group.add_argument(
                f"--{f.name}",
                default=None,
                metavar="TEXT" if many else hints[f.name].__name__.upper(),
                help=f"{f.metadata['help']} (default: {default})",
                **({"nargs": "+", "action": "extend"} if many else {}),
            )
    return parser


def say_noted_flags(args: argparse.Namespace, notes: dict[str, str | Noted]) -> None:
    """A note, on stderr, for each of add_noted_flags' flags that was given; ConfigError for every
    one given a value that asks for what does not happen here, before anything is said."""
    for line in noted_flag_notes(args, notes):
        print(f"note: {line}", file=sys.stderr, flush=True)


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
