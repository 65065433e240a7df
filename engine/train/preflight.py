"""Checks of a training config that need no model weights: run before any load, so a mistake in
the flags or the data is reported in seconds and before anything is written. The CLI and the
engine's training job both call it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.config import TrainConfig
from ..core.errors import UserError
from ..core.files import check_writable, reading


def preflight(cfg: TrainConfig, cancel: Any = None) -> int | None:
    """Every check that needs no model weights, cheapest first; returns the longest training
    sample in tokens (None where it cannot be told), for a caller that plans with it.

    A mistake in the flags or the data is then reported in seconds rather than after the model
    has loaded, and before anything is written. run_training checks all of this again (the engine
    calls it directly). With the model's tokenizer at hand, a dataset of which --max_length would
    leave nothing is found here too, for datasets up to TOKENIZE_LIMIT samples; without CUDA, a
    plan whose peak cannot fit in the free RAM; on a GPU, a --max_memory that no plan fits. Once
    `cancel` (a threading.Event) is set, core.errors.Cancelled stops the reading and tokenising.
    """
    from ..core.data import load_dataset_for, split_eval
    from ..core.errors import DataError
    from ..core.model_files import DEMO_NAME, cached_model_dir, demo_gguf_path
    from ..core.templates import template_flag
    from ..models.loading import check_qlora_possible, linear_module_names_of, resolve_model
    from .checkpoints import find_checkpoint
    from .schedule import check_plan_size

    if cfg.is_qlora:
        check_qlora_possible()
    template_flag(cfg.template)
    output = Path(cfg.output_dir).expanduser()
    with reading(output, "--output_dir", action="write into"):
        is_file = output.exists() and not output.is_dir()
    if is_file:
        raise UserError(
            f"--output_dir: {output} is a file, not a folder",
            "give a folder for the runs (it is created if new)",
        )
    if cfg.resume_from_checkpoint:
        # the run goes on in its own folder: that is where its files are written
        run = find_checkpoint(cfg.resume_from_checkpoint).parent.parent
        for folder in (run, run / "checkpoints"):
            check_writable(folder, "--resume_from_checkpoint")
    else:  # a refusal said now, not once the model and the data have loaded
        check_writable(output, "--output_dir")
    # A model folder or hub id resolves in milliseconds; a GGUF file (the demo's included) is
    # converted on first use, which waits until the data has passed.
    spec = cfg.model.strip()
    with reading(flag="--model"):
        converts = (spec == DEMO_NAME or spec.lower().endswith(".gguf")) and cached_model_dir(spec) is None
        resolved = None if converts else resolve_model(spec)
        if converts and spec == DEMO_NAME:
            demo_gguf_path()  # installed?
        elif converts and not Path(spec).expanduser().is_file():
            resolve_model(spec)  # says the file is missing
    train_samples: list = []
    for flag, specs in (("--dataset", cfg.dataset), ("--val_dataset", cfg.val_dataset)):
        if not specs:
            continue
        try:
            with reading(flag=flag):
                samples, _problems = load_dataset_for(cfg, specs, cancel)
        except DataError as exc:
            if flag == "--val_dataset":
                exc.message = f"{flag}: {exc.message}"
            raise
        if flag == "--dataset":
            train_samples = samples
    if train_samples:
        held_out = not cfg.val_dataset and cfg.val_ratio > 0
        kept = split_eval(train_samples, cfg.val_ratio, cfg.seed)[0] if held_out else train_samples
        check_plan_size(len(kept), cfg)
    resolved = resolved or resolve_model(spec)
    longest = _longest_sample(cfg, resolved, train_samples, cancel)
    _check_host_memory(cfg, resolved, longest)
    _check_gpu_budget(cfg, resolved, longest)
    if cfg.target_modules != ["all-linear"]:
        available = linear_module_names_of(resolved.path, cfg.trust_remote_code)
        unknown = [m for m in cfg.target_modules if available is not None and m not in available]
        if unknown:
            raise UserError(
                f"--target_modules: this model has no linear layer named {', '.join(unknown)}",
                f"choose from all-linear, {', '.join(available or [])}",
                code="config",
            )
    return longest


# Tokenising costs about a second per few thousand samples, and the recipe tokenises again after
# the model has loaded (where every size is checked): past this many the preflight tokenises only
# the LONGEST_CANDIDATES samples with the most characters, to find the longest.
TOKENIZE_LIMIT = 5000
LONGEST_CANDIDATES = 200


def _longest_sample(cfg: TrainConfig, resolved, samples: list, cancel: Any = None) -> int | None:
    """Tokens in the longest training sample after --max_length, or None when it cannot be told
    here. Refuses a dataset of which --max_length would leave no sample, before the weights load."""
    from ..core.encoding import tokenize_samples
    from ..models.loading import ModelError, load_tokenizer
    from .recipe import no_sample_left

    if not samples:
        return None
    try:
        tokenizer = load_tokenizer(resolved, cfg.trust_remote_code)
    except ModelError:
        return None  # the model load says what is wrong with it, with its own advice
    if len(samples) > TOKENIZE_LIMIT:
        samples = sorted(samples, key=_characters, reverse=True)[:LONGEST_CANDIDATES]
        kept, _report = tokenize_samples(samples, tokenizer, cfg.max_length, cfg.template, cancel)
        return max((len(s.input_ids) for s in kept), default=None)
    kept, report = tokenize_samples(samples, tokenizer, cfg.max_length, cfg.template, cancel)
    if not kept:
        raise no_sample_left([str(p) for p in report.problems], cfg.max_length)
    return max(len(s.input_ids) for s in kept)


def _characters(sample) -> int:
    return sum(len(str(m.get("content") or "")) for m in sample.messages)


def _check_host_memory(cfg: TrainConfig, resolved, longest: int | None) -> None:
    """Without CUDA the run's peak is in RAM: refuse a plan that cannot fit in what is free, with
    the settings that would (a CPU box swaps, or the kernel kills the engine, otherwise)."""
    from ..core.estimate import check_host_memory, read_model_info
    from ..models.loading import pick_device

    if cfg.is_qlora or pick_device().type != "cpu":
        return  # QLoRA runs on CUDA only (refused above without it); a GPU's memory is its own
    info = read_model_info(str(resolved.path))
    if info is None:
        return
    try:
        check_host_memory(cfg, info, longest=longest)
    except ValueError:
        return  # a config.json without the sizes: the model load says what is wrong


def _check_gpu_budget(cfg: TrainConfig, resolved, longest: int | None) -> None:
    """On a GPU, refuse a --max_memory that no plan fits (engine/core/plans.py), naming the
    smallest plan's peak and what would fit, before the model loads."""
    from ..core.estimate import training_plan
    from ..models.loading import pick_device

    if cfg.max_memory <= 0 or pick_device().type != "cuda":
        return
    shape = _model_shape(resolved)
    if shape is not None:
        training_plan(shape, cfg, None, longest)  # NoPlanFits, a UserError, says what would fit


def _model_shape(resolved) -> Any:
    """The model's sizes (core/estimate.ModelShape) from its config.json; None where they cannot
    be read (the model load says what is wrong)."""
    from ..core.estimate import ModelShape, read_model_info

    info = read_model_info(str(resolved.path))
    if info is None:
        return None
    try:
        return ModelShape.from_config(info)
    except ValueError:
        return None  # a config.json without the sizes


def sharding_for_launch(
    cfg: TrainConfig, longest: int | None, card_bytes: int | None = None
) -> tuple[str, str]:
    """For a launch of several processes without --deepspeed: "zero3" and why when the base does
    not fit one GPU for data parallel but FSDP2's share does (core/estimate.sharding_stage), on
    this machine's first visible GPU (`card_bytes`, when known), for the data's `longest` sample
    (what the preflight returned); ("", "") otherwise."""
    from ..core.estimate import sharding_stage
    from ..models.loading import resolve_model

    if cfg.nproc_per_node <= 1 or cfg.deepspeed:
        return "", ""
    if card_bytes is None:
        import torch

        if not torch.cuda.is_available():
            return "", ""
        card_bytes = torch.cuda.get_device_properties(0).total_memory
    shape = _model_shape(resolve_model(cfg.model.strip()))
    return ("", "") if shape is None else sharding_stage(shape, cfg, card_bytes, longest)


def longest_sample_tokens(cfg: TrainConfig) -> int | None:
    """The training data's longest sample in tokens after --max_length, for the memory estimate;
    None when the data or the tokenizer cannot be read (the preflight says why, at training)."""
    from ..core.data import load_dataset_for
    from ..core.model_files import DEMO_NAME, cached_model_dir
    from ..models.loading import resolve_model

    spec = cfg.model.strip()
    if (spec == DEMO_NAME or spec.lower().endswith(".gguf")) and cached_model_dir(spec) is None:
        return None  # converted when it first trains, not for an estimate
    try:
        key = _longest_key(cfg)
        if key not in _LONGEST:
            samples, _problems = load_dataset_for(cfg, cfg.dataset)
            if len(_LONGEST) >= 16:
                _LONGEST.clear()
            _LONGEST[key] = _longest_sample(cfg, resolve_model(spec), samples)
        return _LONGEST[key]
    except Exception:  # noqa: BLE001 - an estimate falls back on max_length, whatever went wrong
        return None


# The estimate is asked for at every change of the form: the data is read and tokenised again only
# when a setting it depends on, or a dataset file, has changed.
_LONGEST: dict[tuple, int | None] = {}


def _longest_key(cfg: TrainConfig) -> tuple:
    from ..core.data import parse_dataset_spec

    files = []
    for spec in cfg.dataset:
        stat = parse_dataset_spec(spec).path.stat()
        files.append((spec, stat.st_mtime_ns, stat.st_size))
    settings = (
        cfg.system,
        tuple(cfg.model_name),
        tuple(cfg.model_author),
        cfg.seed,
        cfg.template,
        cfg.columns,
        cfg.loss_scale,
    )
    return (tuple(files), cfg.model, cfg.max_length, cfg.trust_remote_code, settings)
