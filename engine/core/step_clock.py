"""Training speed and time left, from the recent steps rather than the mean since the start.

A loop's first step pays once for what the later ones reuse: compiling the decoder layers on the
GPU (about 21 s for a 7B), allocating, warming caches. Averaged in, it makes the first ETAs many
times too long (7,444 s shown at step 1 for a run that took 66 s) and keeps tokens/s low for the
whole run. So the first step is timed on its own, and speed comes from a window of the steps after
it; until one such step has ended there is no estimate (0, shown as "measuring").
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

# Enough steps to smooth a step's jitter, few enough to follow a change of speed (a longer
# sequence length later in an epoch, a machine that became busy).
WINDOW_STEPS = 20


class StepClock:
    def __init__(self, window: int = WINDOW_STEPS, now: Callable[[], float] = time.perf_counter):
        self._now = now
        self._started = now()
        # (time a step ended, tokens counted up to then), for the last `window` steps and the one
        # before them, whose end is where the window starts.
        self._ends: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._tokens = 0
        self.first_step_s: float | None = None

    def step_done(self, tokens: int) -> None:
        """A step has ended that trained on `tokens` tokens."""
        now = self._now()
        self._tokens += tokens
        if self.first_step_s is None:
            self.first_step_s = now - self._started
        self._ends.append((now, self._tokens))

    @property
    def measured(self) -> bool:
        """True once a step after the first has ended."""
        return len(self._ends) >= 2

    def seconds_per_step(self) -> float:
        if not self.measured:
            return 0.0
        (t0, _), (t1, _) = self._ends[0], self._ends[-1]
        return (t1 - t0) / (len(self._ends) - 1)

    def tokens_per_s(self) -> float:
        if not self.measured:
            return 0.0
        (t0, n0), (t1, n1) = self._ends[0], self._ends[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)

    def eta_s(self, steps_left: int) -> float:
        """Seconds until `steps_left` more steps are done; 0 while not yet measured."""
        return self.seconds_per_step() * max(steps_left, 0)

    def warm_up_note(self) -> str:
        """Once measured: what the first step cost beyond a step's usual time, if that is notable."""
        if not self.measured or self.first_step_s is None:
            return ""
        usual = self.seconds_per_step()
        extra = self.first_step_s - usual
        if extra < max(1.0, usual):  # under a second, or less than one more step: not worth a line
            return ""
        return (
            f"first step took {self.first_step_s:.1f}s, {extra:.1f}s of it once-only start-up "
            f"(compiling, allocating); a step takes {usual:.2f}s now"
        )


def speed_text(tokens_per_s: float) -> str:
    """Tokens per second as shown: whole numbers, a decimal below 10 (a big model on a busy CPU
    trains a fraction of a token a second, which must not read as 0)."""
    return f"{tokens_per_s:,.0f}" if tokens_per_s >= 10 else f"{tokens_per_s:.1f}"


def first_step_note(after_load_s: float, compile_s: float = 0.0, cache: str = "") -> str:
    """The time to the first step, counted from the end of the model's load (reading the data,
    LoRA, the optimizer and the first step with its compile), and the compile's share of it."""
    note = f"time to first step: {after_load_s:.1f}s after the model loaded"
    if compile_s:
        note += f", {compile_s:.1f}s of it compiling the decoder layers"
        if cache:
            note += f" ({cache})"
    return note
