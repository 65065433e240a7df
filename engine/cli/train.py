"""`tunebench train`: fine-tune headless, with the flags ms-swift articles use.

The flags are generated from TrainConfig, so a copied `swift sft ...` command runs with
`swift sft` replaced by `tunebench train`. Ctrl-C (or SIGTERM) stops after the current step and
saves a checkpoint; a second one aborts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from typing import Any, get_origin, get_type_hints

from ..core.config import ConfigError, TrainConfig
from ..core.errors import UserError
from ..core.launch import is_worker, launch_from
from .flags import (
    FlagParser,
    Noted,
    add_noted_flags,
    flag_values,
    join_negative_numbers,
    near,
    noted_flag_notes,
    say_noted_flags,
)
from .progress import JsonRenderer, ProgressRenderer

# ms-swift flags that set nothing here, each with what TuneBench does instead: accepted, so that a
# copied `swift sft` command runs, and said once at the start. A Noted flag's value that asks for
# other training (--optim adafactor, --lora_bias all) is refused instead: ignoring it would train
# something else than the command says.
SWIFT_ONLY_FLAGS: dict[str, str | Noted] = {
    "packing": "samples are always packed on a GPU (padding-free, each attending only to itself); "
    "a CPU pads each micro-batch",
    "padding_free": "samples are always packed on a GPU (padding-free, each attending only to "
    "itself); a CPU pads each micro-batch",
    "use_liger_kernel": "liger-kernel's fused loss and kernels are used on a GPU wherever it is installed",
    "dataset_num_proc": "the data is read and tokenised once, up front",
    "lazy_tokenize": "the data is read and tokenised once, up front",
    "streaming": "the datasets are read whole, up front",
    "save_only_model": "a checkpoint holds the adapter and what a resume needs; the final adapter is saved "
    "on its own",
    "resume_only_model": "a resume restores the adapter, the optimizer and the place in the data",
    "ignore_data_skip": "a resume goes on where the data was",
    "eval_strategy": "evaluation runs every --eval_steps steps on --val_dataset or the --val_ratio split "
    "(--eval_strategy no: none, as --val_ratio 0)",
    "save_strategy": Noted("a checkpoint every --save_steps steps, and one at the end", ("steps",)),
    "load_best_model_at_end": "the final adapter is the last step's; the checkpoints (--save_steps, "
    "--save_total_limit) keep earlier ones, with their eval loss in the run's metrics.jsonl",
    "metric_for_best_model": "the final adapter is the last step's; each eval loss is in the run's "
    "metrics.jsonl",
    "add_version": "each run gets a folder of its own under --output_dir (a time stamp, or --run_name)",
    "logging_dir": "the run's log and metrics.jsonl are in its folder under --output_dir",
    "use_hf": "models come from local folders and the Hugging Face cache; nothing is downloaded",
    "model_revision": "the model is read as its folder or the cache holds it",
    "check_model": "nothing is checked online",
    "ignore_args_error": "every flag is checked, and a wrong one is named",
    "push_to_hub": "nothing is uploaded: `tunebench export` writes the folder to upload",
    "hub_model_id": "nothing is uploaded: `tunebench export` writes the folder to upload",
    "hub_token": "nothing is uploaded: `tunebench export` writes the folder to upload",
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
    "loss_scale": Noted("the loss is on every assistant answer of a conversation", ("default",)),
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
    "sequence_parallel_size": Noted("each sample is trained whole on one GPU", near(1.0)),
}


def build_train_parser() -> argparse.ArgumentParser:
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


def train_main(argv: list[str]) -> int:
    """Train in this process; or, asked for several (--nproc_per_node, ms-swift's NPROC_PER_NODE
    and NNODES), check the settings here and start that many ranks of this command with torchrun;
    or be one of those ranks (torchrun's environment says so)."""
    args = build_train_parser().parse_args(join_negative_numbers(argv))
    values = flag_values(args)
    _say_swift_only_flags(args, values)
    if values.get("gpus") and not is_worker(os.environ):
        _use_gpus(values)
    launch = launch_from(values.get("nproc_per_node"), os.environ)
    if launch:
        values["nproc_per_node"] = launch.nproc_per_node
    elif is_worker(os.environ):
        values["nproc_per_node"] = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        from ..train.distributed import as_rank, current_ranks

        ranks = current_ranks()
        return as_rank(lambda: _train(args, values, main_rank=ranks.is_main)[0], ranks)
    cfg = None
    try:
        cfg = _config(values)
        return _launch(launch, argv, cfg, args.json) if launch else _train_here(args, values, cfg)
    except (UserError, ConfigError) as exc:
        if args.json:  # a tool reading the events (the workbench's Train pane) gets the failure too
            from ..process.jobs import describe_failure

            JsonRenderer()(describe_failure(exc, "train", cfg)[0])
        raise


def _say_swift_only_flags(args: argparse.Namespace, values: dict[str, Any]) -> None:
    """A note for each ms-swift flag given that sets nothing here; --eval_strategy no turns the
    evaluation off, as it does there."""
    if not is_worker(os.environ):  # a rank: the launching process said it already
        say_noted_flags(args, SWIFT_ONLY_FLAGS)
    _eval_strategy(args, values)


def _eval_strategy(args: argparse.Namespace, values: dict[str, Any]) -> None:
    if str(args.swift_eval_strategy).lower() == "no" and "val_dataset" not in values:
        values.setdefault("val_ratio", 0.0)


# A pasted command's environment assignments (`NPROC_PER_NODE=2 swift sft ...`) that are settings;
# the others get a note (CUDA_VISIBLE_DEVICES=0 heads most ms-swift commands: the gpus field picks).
COMMAND_ENVIRONMENT = {"NPROC_PER_NODE": "nproc_per_node"}


def values_from_command(text: str) -> tuple[dict[str, Any], list[str]]:
    """A `swift sft ...` or `tunebench train ...` command as pasted (continuation lines, and
    variables such as NPROC_PER_NODE=2 in front) read as the form's settings: the TrainConfig
    values it gives, and a note for each flag or variable that sets nothing here.
    UserError or ConfigError for what cannot be taken, as the command line would say."""
    import shlex

    try:
        words = shlex.split(text.replace("\\\r\n", " ").replace("\\\n", " "))
    except ValueError as exc:  # an unclosed quote
        raise UserError(f"the command cannot be read: {exc}", "check its quotes") from None
    environment: dict[str, str] = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        name, value = words.pop(0).split("=", 1)
        environment[name] = value
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
    unset = []
    for name, value in environment.items():
        if name in COMMAND_ENVIRONMENT:
            words += [f"--{COMMAND_ENVIRONMENT[name]}", value]
        else:
            what = "the gpus field picks the GPUs" if name == "CUDA_VISIBLE_DEVICES" else "it is not set"
            unset.append(f"{name}={value}: the workbench sets no environment variables; {what}")
    parser = build_train_parser()
    parser.raises = True
    args = parser.parse_args(join_negative_numbers(words))
    notes = noted_flag_notes(args, SWIFT_ONLY_FLAGS) + unset
    values = flag_values(args)
    _eval_strategy(args, values)
    return values, notes


def _train_here(args: argparse.Namespace, values: dict[str, Any], cfg: TrainConfig) -> int:
    result, signum = _train(args, values, cfg=cfg)
    if signum:  # stopped by the person: the shell's convention, so a script can tell
        return 128 + signum
    return 0 if result.status == "completed" else (130 if result.status == "aborted" else 0)


def _launch(launch: Any, argv: list[str], cfg: TrainConfig, as_json: bool) -> int:
    """Start the ranks with torchrun, after checking the settings here: a mistake is said once,
    before any rank starts."""
    from ..train.distributed import launch_ranks
    from ..train.preflight import preflight, sharding_for_launch

    longest = preflight(cfg)
    stage, why = sharding_for_launch(cfg, longest)
    if stage:  # the ranks are told, as if the person had typed it
        if as_json:  # the workbench's Train pane (engine/process/ranks_job.py)
            from ..core import protocol as P

            JsonRenderer()(P.Log(message=why))
        print(f"note: {why}", file=sys.stderr, flush=True)
        argv = [*argv, "--deepspeed", stage]
    return launch_ranks(launch, argv)


def _use_gpus(values: dict[str, Any]) -> None:
    """--gpus 0,1,3 / all: one process per GPU named, each seeing only those (CUDA_VISIBLE_DEVICES,
    which torchrun's ranks inherit); one GPU trains in this process."""
    from ..core.launch import gpu_environment, gpus_chosen_here

    chosen = gpus_chosen_here(values["gpus"])
    if chosen:
        os.environ.update(gpu_environment(chosen, os.environ))
    if len(chosen) > 1 and values.get("nproc_per_node") in (None, 1):  # another count: the config says
        values["nproc_per_node"] = len(chosen)


def _config(values: dict[str, Any]) -> TrainConfig:
    if values.get("resume_from_checkpoint"):
        from ..train.resume import resume_config

        cfg = resume_config(values)  # the run's recorded settings, with the flags given applied
    else:
        cfg = TrainConfig(**values)
    if not cfg.dataset:
        raise UserError(
            "no training data: --dataset is required",
            "for example --dataset sample_data/self_cognition.jsonl#50",
        )
    return cfg


def _train(
    args: argparse.Namespace, values: dict[str, Any], cfg: TrainConfig | None = None, main_rank: bool = True
):
    """Train in this process (one rank of several, under torchrun); the run's TrainFinished, and
    the signal that stopped it (0 when none did)."""
    from ..train.preflight import preflight

    if cfg is None:  # a rank: the launcher has run the preflight, and the recipe checks again
        cfg = _config(values)
    else:
        preflight(cfg)
    from ..process.jobs import RunProgress, describe_failure
    from ..train.distributed import write_note
    from ..train.recipe import StopSignal, run_training

    stop = StopSignal()
    progress = RunProgress()
    signals: list[int] = []
    previous = _install_stop_handlers(stop, progress, signals, quiet=not main_rank)
    renderer = (JsonRenderer() if args.json else ProgressRenderer()) if main_rank else _Silent()

    def emit(event) -> None:
        progress.note(event)  # how far the run got, for the out-of-memory advice
        if event.type == "TrainStarted":
            write_note({"run_dir": event.run_dir})  # for the launcher, when a rank fails
        renderer(event)

    try:
        result = run_training(cfg, emit, stop)
    except Exception as exc:
        # Out of memory is the person's to fix (RAM or GPU, with what to change), as in the engine.
        error, _report = describe_failure(exc, "train", cfg, progress=progress)
        if error.code != "oom":
            raise
        raise UserError(error.message, error.hint, code="oom") from None
    finally:
        renderer.close()
        for signum, handler in previous.items():  # main() may be called in-process (tests)
            signal.signal(signum, handler)
    if signals:
        if not is_worker(os.environ):  # under torchrun the launcher says it, once
            from ..train.resume import stopped_by_signal

            print(stopped_by_signal(signals[0], progress.run_dir, cfg.nproc_per_node), file=sys.stderr)
        return result, signals[0]
    probe_after = args.probe_after == "true" if args.probe_after else sys.stdout.isatty()
    if main_rank and probe_after and result.status == "completed" and result.adapter_dir:
        _say_verdict(result, cfg, renderer)
    return result, signals[0] if signals else 0


class _Silent:
    """The renderer of ranks other than 0: rank 0 shows the run."""

    def __call__(self, event) -> None:
        pass

    def close(self) -> None:
        pass


def _say_verdict(result, cfg: TrainConfig, renderer) -> None:
    """Tell the person whether the run changed the answers; the adapter is saved whatever happens here."""
    from ..infer.probe_check import verdict_event
    from ..process.jobs import free_memory

    free_memory()  # the trained model is gone; the probe loads the base afresh
    print("probing the base and the adapter with 3 questions ...", file=sys.stderr, flush=True)
    try:
        renderer(verdict_event(result, cfg.model))
    except UserError as exc:
        print(f"no verdict: {exc.message} ({exc.hint})", file=sys.stderr)


def _install_stop_handlers(stop, progress, signals: list[int], quiet: bool = False) -> dict[int, Any]:
    """Ctrl-C / SIGTERM: stop after the step, a second aborts; each signal is added to `signals`.
    `progress` says whether the run has started its steps (before, loading ends at once and there
    is nothing to save); `quiet` for ranks other than 0, which stop with rank 0 and leave the
    telling to it."""

    def on_signal(signum, _frame) -> None:
        signals.append(signum)
        if stop.mode:
            stop.request("abort")
            message = "aborting now (no checkpoint)"
        elif not progress.run_dir:  # TrainStarted not yet sent: the model or the data is loading
            stop.request("graceful")
            message = "stopping: no step trained yet, nothing to save"
        else:
            stop.request("graceful")
            message = "stopping after this step and saving a checkpoint; press Ctrl-C again to abort"
        if not quiet:
            print(f"\n{message}", file=sys.stderr)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return previous
