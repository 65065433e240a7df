"""Run something once typing (or a burst of events) pauses, not on every keystroke."""

from __future__ import annotations

from collections.abc import Callable

from textual.message_pump import MessagePump
from textual.timer import Timer


class Debouncer:
    """`poke()` (re)starts a `delay` timer; `callback` runs once it expires, or at `flush()`."""

    def __init__(self, owner: MessagePump, delay: float, callback: Callable[[], None]) -> None:
        self.owner, self.delay, self.callback = owner, delay, callback
        self._timer: Timer | None = None

    @property
    def pending(self) -> bool:
        return self._timer is not None

    def poke(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.owner.set_timer(self.delay, self._fire)

    def flush(self) -> None:
        """Run now if a call is pending (on the way out, say)."""
        if self._timer is not None:
            self._timer.stop()
            self._fire()

    def _fire(self) -> None:
        self._timer = None
        self.callback()
