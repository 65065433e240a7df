"""What chat and probe answer with: the base model and the targets (base, adapters, checkpoints)
resolved from --adapters and --model before anything loads, and the generation session."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class Setup:
    model: str
    targets: list[Any]  # targets.Target, base first when present
    template: str = ""  # --template: every target's chat template ("" = each run's)

    @property
    def specs(self) -> list[str]:
        return [t.spec for t in self.targets]

    @property
    def labels(self) -> list[str]:
        labels: list[str] = []
        for target in self.targets:
            label = target.label
            labels.append(label if label not in labels else f"{label} ({len(labels) + 1})")
        return labels


def resolve_setup(args: argparse.Namespace, with_base: bool) -> Setup:
    """Resolve adapters and the base model up front, so a bad path fails before any loading."""
    from ..core.targets import BASE, Target, resolve_target
    from ..infer.export import base_model_of

    adapters = [resolve_target(str(Path(a).expanduser())) for a in args.adapters]
    model = base_model_of(adapters, args.model)
    targets = ([Target(BASE)] if with_base or not adapters else []) + adapters
    return Setup(model, targets, _checked_template(getattr(args, "template", ""), adapters))


def _checked_template(template: str, adapters: list[Any]) -> str:
    """--template, checked before anything loads, with a note for each adapter whose run trained
    with another format: it answers with the one asked for, which it may not follow."""
    from ..core.templates import named_template, template_flag, template_words

    if not template:
        return ""
    asked = template_flag(template)
    if asked is None:  # ms-swift's name for a family's format: this model's own renders it
        print(
            f"note: --template {template}: answers use {template_words(template)}",
            file=sys.stderr,
            flush=True,
        )
    for target in adapters:
        trained = str(target.train_config.get("template") or "")
        if named_template(trained) != asked:
            print(
                f"note: --template {template}: {target.label} trained with another chat template "
                f"({template_words(trained)}), and answers with {template_words(template)} as asked",
                file=sys.stderr,
                flush=True,
            )
    return template


def load_session(setup: Setup, torch_dtype: str):
    from ..infer.generate import GenerationSession

    print(f"loading {setup.model} ...", file=sys.stderr, flush=True)
    session = GenerationSession(setup.model, torch_dtype=torch_dtype)
    loaded = session.loaded
    print(
        f"model   {loaded.resolved.label}: {loaded.parameters / 1e6:.0f}M parameters, "
        f"{str(loaded.dtype).replace('torch.', '')} on {loaded.device}, {loaded.seconds:.1f}s",
        file=sys.stderr,
    )
    for target in setup.targets:
        if target.adapter_dir is not None:
            print(f"adapter {target.adapter_dir}", file=sys.stderr)
    session.load_adapters(setup.targets)
    return session
