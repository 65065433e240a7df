"""`tunebench train`: fine-tune headless, with the flags ms-swift articles use.

The flags are generated from TrainConfig (engine/core/train_flags.py), so a copied `swift sft ...`
command runs with `swift sft` replaced by `tunebench train`. Ctrl-C (or SIGTERM) stops after the
current step and saves a checkpoint; a second one aborts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from ..core.config import ConfigError, TrainConfig
from ..core.errors import UserError
from ..core.launch import is_worker, launch_from
from ..core.train_flags import SWIFT_ONLY_FLAGS, build_train_parser, eval_strategy
from .flags import flag_values, join_negative_numbers, say_noted_flags
from .progress import JsonRenderer, ProgressRenderer


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
    eval_strategy(args, values)


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
