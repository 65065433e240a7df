"""`tunebench train`'s flags: the parser generated from TrainConfig, ms-swift's flags that set
nothing here, and a pasted `swift sft` / `tunebench train` command read as the command line reads
it (the workbench's Parameters pane takes one with ctrl+o)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, get_origin, get_type_hints

from .config import TrainConfig
from .errors import UserError
from .flag_parsing import (
    NO_DOWNLOADS,
    FlagParser,
    Noted,
    add_noted_flags,
    flag_values,
    join_negative_numbers,
    near,
    noted_flag_notes,
)
from .pasted_command import read_command, shown_variable

# ms-swift flags that set nothing here, each with what TuneBench does instead: accepted, so that a
# copied `swift sft` command runs, and said once at the start. A Noted flag's value that asks for
# other training (--optim adafactor, --lora_bias all) is refused instead: ignoring it would train
# something else than the command says.
PACKED = (
    "samples are always packed on a GPU (padding-free, each attending only to itself); a CPU pads "
    "each micro-batch"
)
READ_UP_FRONT = "the data is read and tokenised once, up front"
NOT_UPLOADED = "nothing is uploaded: `tunebench export` writes the folder to upload"
TEXT_ONLY = "text models only: no images are read"
SHUFFLED = "the training samples are shuffled each epoch by --seed"
SWIFT_ONLY_FLAGS: dict[str, str | Noted] = {
    "packing": PACKED,
    "padding_free": PACKED,
    "use_liger_kernel": "liger-kernel's fused loss and kernels are used on a GPU wherever it is installed",
    "dataset_num_proc": READ_UP_FRONT,
    "lazy_tokenize": READ_UP_FRONT,
    "streaming": "the datasets are read whole, up front",
    "save_only_model": "a checkpoint holds the adapter and what a resume needs; the final adapter is saved "
    "on its own",
    "resume_only_model": "a resume restores the adapter, the optimizer and the place in the data",
    "ignore_data_skip": "a resume goes on where the data was",
    "eval_strategy": "evaluation runs every --eval_steps steps on --val_dataset or the --val_ratio split "
    "(--eval_strategy no: none; those two are left unused)",
    "save_strategy": Noted("a checkpoint every --save_steps steps, and one at the end", ("steps",)),
    "load_best_model_at_end": "the final adapter is the last step's; the checkpoints (--save_steps, "
    "--save_total_limit) keep earlier ones, with their eval loss in the run's metrics.jsonl",
    "metric_for_best_model": "the final adapter is the last step's; each eval loss is in the run's "
    "metrics.jsonl",
    "add_version": "each run gets a folder of its own under --output_dir (a time stamp, or --run_name)",
    "logging_dir": "the run's log and metrics.jsonl are in its folder under --output_dir",
    "use_hf": NO_DOWNLOADS,
    "model_revision": "the model is read as its folder or the cache holds it",
    "check_model": "nothing is checked online",
    "ignore_args_error": "every flag is checked, and a wrong one is named",
    "push_to_hub": NOT_UPLOADED,
    "hub_model_id": NOT_UPLOADED,
    "hub_token": NOT_UPLOADED,
    "ddp_timeout": "the training processes wait for each other as long as torch's default allows",
    "bf16": "the weights' and activations' type is --torch_dtype's",
    "fp16": "the weights' and activations' type is --torch_dtype's",
    "freeze_vit": "text models only: there is no vision tower to freeze",
    "quant_method": Noted("--quant_bits 4 quantises the base with bitsandbytes (NF4)", ("bnb",)),
    "bnb_4bit_quant_type": Noted("4-bit weights are NF4", ("nf4",)),
    "bnb_4bit_use_double_quant": "the 4-bit blocks' scales are always quantised again (double quantisation)",
    "bnb_4bit_compute_dtype": "the 4-bit products compute in --torch_dtype (bfloat16 for float32)",
    "bnb_4bit_quant_storage": "4-bit weights are stored as bytes",
    "use_chat_template": Noted("samples are rendered with the chat template (--template)", ("true",)),
    "task_type": Noted("the model is trained to generate the assistant's answers", ("causal_lm",)),
    "truncation_strategy": Noted(
        "a sample longer than --max_length keeps its start and is cut at the end", ("right",)
    ),
    "lora_bias": Noted("LoRA trains no biases", ("none",)),
    "optim": Noted(
        "the optimizer is torch's AdamW", ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw")
    ),
    "adam_beta1": Noted("AdamW's beta1 is 0.9", near(0.9)),
    "adam_beta2": Noted("AdamW's beta2 is 0.999", near(0.999)),
    "adam_epsilon": Noted("AdamW's epsilon is 1e-8", near(1e-8)),
    "neftune_noise_alpha": Noted("no noise is added to the embeddings (NEFTune)", near(0.0)),
    "lora_dtype": Noted("the LoRA weights train in float32", ("none", "float32", "fp32")),
    "gradient_checkpointing_kwargs": "recompute is TuneBench's own, by the plan for the card's memory",
    "vit_gradient_checkpointing": TEXT_ONLY,
    "max_pixels": TEXT_ONLY,
    "ddp_find_unused_parameters": "data parallel reduces the adapter's gradients only, as they are ready",
    "ddp_backend": "several GPUs talk through NCCL, CPUs through gloo",
    "dataset_shuffle": Noted(SHUFFLED, ("true",)),
    "train_dataloader_shuffle": Noted(SHUFFLED, ("true",)),
    "val_dataset_shuffle": "the evaluation samples are read in their order",
    "data_seed": "--seed orders the data too",
    "dataloader_pin_memory": READ_UP_FRONT,
    "dataloader_persistent_workers": READ_UP_FRONT,
    "dataloader_prefetch_factor": READ_UP_FRONT,
    "load_from_cache_file": READ_UP_FRONT,
    "group_by_length": PACKED,
    "remove_unused_columns": "each record's fields are read by its format; others are left alone",
    "save_safetensors": Noted("adapters are saved as safetensors", ("true",)),
    "torch_compile": "the decoder layers are compiled on a GPU (the fast path), never on a CPU",
    "torch_empty_cache_steps": "the memory is not emptied between steps: the plan for the card sets the peak",
    "logging_first_step": "step 1's loss is always shown",
    "full_determinism": "--seed fixes the data order, the splits and the LoRA init; GPU kernels may "
    "differ in the last bits",
    "hub_private_repo": NOT_UPLOADED,
    "create_checkpoint_symlink": "the run's folder holds its checkpoints and the final adapter",
    "save_on_each_node": "the first process saves the checkpoints",
    "tuner_backend": Noted("LoRA comes from peft", ("peft",)),
    "use_cpu": Noted("the GPU trains where there is one, else the CPU", ("false",)),
    "agent_template": Noted("tool calls are rendered in the chat template's own format", ("hermes",)),
    "custom_dataset_info": Noted(
        "--dataset takes the files, folders or cached ids themselves", lambda _: False
    ),
    "sequence_parallel_size": Noted("each sample is trained whole on one GPU", near(1.0)),
}


def build_train_parser() -> FlagParser:
    parser = FlagParser(
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
        if get_origin(hints[f.name]) is list:  # --dataset a b, and a repeated flag adds to the list
            extra.update(nargs="+", action="extend")
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
    add_noted_flags(parser, "ms-swift flags with nothing to set here", SWIFT_ONLY_FLAGS)
    parser.add_argument("--json", action="store_true", help="print one JSON object per event")
    parser.add_argument(
        "--probe_after",
        choices=("true", "false"),
        default=None,
        help="after a completed run, ask the base and the adapter the first 3 probes (the "
        "workspace's probes.txt, else sample_data's) and say whether the answers changed "
        "(default: true when the output is a terminal)",
    )
    return parser


def eval_strategy(args: argparse.Namespace, values: dict[str, Any]) -> None:
    """--eval_strategy no: no evaluation, as in ms-swift, whatever evaluation data was named."""
    if str(args.swift_eval_strategy).lower() == "no":
        values.pop("val_dataset", None)
        values["val_ratio"] = 0.0


# A pasted command's environment assignments (`NPROC_PER_NODE=2 swift sft ...`) that are settings;
# the others get a note (CUDA_VISIBLE_DEVICES=0 heads most ms-swift commands: the gpus field picks).
COMMAND_ENVIRONMENT = {"NPROC_PER_NODE": "nproc_per_node"}


def values_from_command(text: str) -> tuple[dict[str, Any], list[str]]:
    """A `swift sft ...` or `tunebench train ...` command as pasted (pasted_command reads the
    shell around it) read as the form's settings: the TrainConfig values it gives, and a note for
    each flag or variable that sets nothing here. UserError or ConfigError for what cannot be
    taken, as the command line would say."""
    environment, words, notes = read_command(text)
    for program in (["swift", "sft"], ["tunebench", "train"]):
        if words[: len(program)] == program:
            words = words[len(program) :]
            break
    else:
        if words and not words[0].startswith("-"):
            raise UserError(
                f"{' '.join(words[:2])!r} is not a training command",
                "paste a `swift sft ...` or `tunebench train ...` command",
            )
    unset = []  # the variables that set nothing here, said
    for name, value in environment.items():
        if name in COMMAND_ENVIRONMENT:  # before the command's flags, which win as on the command line
            words = [f"--{COMMAND_ENVIRONMENT[name]}", value, *words]
        else:
            what = "the gpus field picks the GPUs" if name == "CUDA_VISIBLE_DEVICES" else "it is not set"
            unset.append(
                f"{shown_variable(name, value)}: the workbench sets no environment variables; {what}"
            )
    parser = build_train_parser()
    parser.raises = True
    args = parser.parse_args(join_negative_numbers(words))
    notes = noted_flag_notes(args, SWIFT_ONLY_FLAGS) + unset + notes
    values = flag_values(args)
    eval_strategy(args, values)
    return values, notes
