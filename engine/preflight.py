"""Checks of a training config that need no model weights: run before any load, so a mistake in
the flags or the data is reported in seconds and before anything is written. The CLI and the
engine's training job both call it."""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig
from .errors import UserError


def preflight(cfg: TrainConfig) -> None:
    """Every check that needs no model weights, cheapest first.

    A mistake in the flags or the data is then reported in seconds rather than after the model
    has loaded, and before anything is written. run_training checks all of this again (the engine
    calls it directly); what needs the tokenizer (samples longer than --max_length) is found there.
    """
    from .data import DataError, load_dataset
    from .models import (
        DEMO_NAME,
        cached_model_dir,
        check_qlora_possible,
        demo_gguf_path,
        linear_module_names_of,
        resolve_model,
    )
    from .templates import get_template
    from .train import find_checkpoint

    if cfg.is_qlora:
        check_qlora_possible()
    if cfg.template:
        try:
            get_template(cfg.template)
        except ValueError as exc:
            raise UserError(f"--template: {exc}", "pass one of the names listed, or leave it out") from None
    output = Path(cfg.output_dir).expanduser()
    if output.exists() and not output.is_dir():
        raise UserError(
            f"--output_dir: {output} is a file, not a folder",
            "give a folder for the runs (it is created if new)",
        )
    if cfg.resume_from_checkpoint:
        find_checkpoint(cfg.resume_from_checkpoint)
    # A model folder or hub id resolves in milliseconds; a GGUF file (the demo's included) is
    # converted on first use, which waits until the data has passed.
    spec = cfg.model.strip()
    converts = (spec == DEMO_NAME or spec.lower().endswith(".gguf")) and cached_model_dir(spec) is None
    resolved = None if converts else resolve_model(spec)
    if converts and spec == DEMO_NAME:
        demo_gguf_path()  # installed?
    elif converts and not Path(spec).expanduser().is_file():
        resolve_model(spec)  # says the file is missing
    for flag, specs in (("--dataset", cfg.dataset), ("--val_dataset", cfg.val_dataset)):
        if not specs:
            continue
        try:
            load_dataset(
                specs,
                system=cfg.system,
                model_name=cfg.model_name,
                model_author=cfg.model_author,
                seed=cfg.seed,
            )
        except DataError as exc:
            if flag == "--val_dataset":
                exc.message = f"{flag}: {exc.message}"
            raise
    resolved = resolved or resolve_model(spec)
    if cfg.target_modules != ["all-linear"]:
        available = linear_module_names_of(resolved.path, cfg.trust_remote_code)
        unknown = [m for m in cfg.target_modules if available is not None and m not in available]
        if unknown:
            raise UserError(
                f"--target_modules: this model has no linear layer named {', '.join(unknown)}",
                f"choose from all-linear, {', '.join(available or [])}",
                code="config",
            )
