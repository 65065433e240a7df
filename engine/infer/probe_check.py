"""The check after training: the first probes of the workspace, greedy and short, answered by the
base and the new adapter side by side in one batched decode, then core.verdict's wording."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..core import protocol as P
from ..core.config import GenerationConfig
from ..core.metrics_log import append_metrics
from ..core.probes import default_probes, read_probes
from ..core.targets import BASE
from ..core.verdict import PROBE_MAX_NEW_TOKENS, PROBES_AFTER_TRAINING, ProbeAnswers, Verdict, probe_verdict
from .generate import GenerationSession


def check_adapter(
    model: str,
    adapter_dir: str,
    final_loss: float,
    steps: int,
    workspaces: tuple[Path, ...] = (),
) -> tuple[Verdict, list[ProbeAnswers]]:
    """Probe `adapter_dir` against its base `model` and say whether its answers changed. In the
    dtype chat and probe answer in by default, not the run's: the verdict quotes what they will
    show (trained in bfloat16 on a CPU, a barely trained adapter's bfloat16 answers differed
    from the base's where the float32 ones of `tunebench probe` did not)."""
    questions = read_probes(default_probes(workspaces))[:PROBES_AFTER_TRAINING]
    session = GenerationSession(model)
    cfg = GenerationConfig(max_new_tokens=PROBE_MAX_NEW_TOKENS, temperature=0.0)
    results = session.generate_many(
        [[{"role": "user", "content": q}] for q in questions], [BASE, adapter_dir], cfg
    )
    answers = [
        ProbeAnswers(q, r[BASE]["text"], r[adapter_dir]["text"])
        for q, r in zip(questions, results, strict=True)
    ]
    return probe_verdict(answers, final_loss, steps), answers


def verdict_event(finished: P.TrainFinished, model: str) -> P.ProbeVerdict:
    """The ProbeVerdict for a completed run, probing with its workspace's probes.txt (the
    adapter's runs/<id>/adapter sits two folders below the workspace)."""
    adapter = Path(finished.adapter_dir)
    workspaces = (adapter.parents[2],) if len(adapter.parents) > 2 else ()
    verdict, answers = check_adapter(
        model, finished.adapter_dir, finished.final_loss, finished.steps, workspaces
    )
    event = P.ProbeVerdict(
        run_id=finished.run_id,
        changed=verdict.changed,
        total=verdict.total,
        message=verdict.message,
        answers=[{"question": a.question, "base": a.base, "adapter": a.adapter} for a in answers],
    )
    # Kept with the run, so a workbench that reattaches to a restarted engine shows it again.
    with contextlib.suppress(OSError):
        append_metrics(adapter.parent, event.to_dict())
    return event
