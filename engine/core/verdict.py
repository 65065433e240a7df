"""Whether a finished run changed anything: the base's and the adapter's answers to the first
probes, compared, and worded with advice from the final loss and steps. One function, torch-free,
so `tunebench train` and the engine (for the Train pane) say the same thing."""

from __future__ import annotations

import math
from dataclasses import dataclass

PROBES_AFTER_TRAINING = 3  # the articles' "three questions" check
PROBE_MAX_NEW_TOKENS = 48  # enough to tell an identity answer apart; a few seconds on a CPU
# Below this final loss the data was learnt: answers that did not move mean the probes ask about
# something else, not that the run was too short.
LEARNT_LOSS = 0.5
QUOTE_CHARS = 60


@dataclass(frozen=True)
class ProbeAnswers:
    question: str
    base: str
    adapter: str

    @property
    def changed(self) -> bool:
        return " ".join(self.base.split()) != " ".join(self.adapter.split())


@dataclass(frozen=True)
class Verdict:
    changed: int  # how many probes the adapter answers differently from the base
    total: int
    message: str


def probe_verdict(answers: list[ProbeAnswers], final_loss: float, steps: int) -> Verdict:
    """Say whether the adapter answers differently from the base, and what to try if it does not."""
    changed = [a for a in answers if a.changed]
    loss = "no loss" if math.isnan(final_loss) else f"loss {final_loss:.2f}"
    done = f"{loss} after {steps} step{'s' if steps != 1 else ''}"
    if not changed:
        if not math.isnan(final_loss) and final_loss < LEARNT_LOSS:
            advice = (
                "the data looks learnt, so the probes may ask about something it does not teach: "
                "put questions from your data in the workspace's probes.txt"
            )
        else:
            advice = "try more epochs or a higher learning rate"
        return Verdict(
            0,
            len(answers),
            f"the adapter still answers like the base on all {len(answers)} probes: {done}; {advice}",
        )
    first = changed[0]
    return Verdict(
        len(changed),
        len(answers),
        f"the adapter answers differently from the base on {len(changed)} of {len(answers)} probes "
        f"({done}); {_quote(first.question)}: base {_quote(first.base)}, adapter {_quote(first.adapter)}",
    )


def _quote(text: str) -> str:
    flat = " ".join(text.split())
    return '"' + (flat if len(flat) <= QUOTE_CHARS else flat[: QUOTE_CHARS - 1] + "…") + '"'
