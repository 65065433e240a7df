"""The Train pane's log: a RichLog whose lines fill its width, and wrap again when it changes.

RichLog measures a line against the app's console, which Textual sizes at 80 columns whatever
the terminal's width, and wraps it once, when written: at 120 columns the log used 78 of them,
and at 80 a full line ran under the scrollbar. Lines written while the pane was hidden (another
tab shown) had no width of their own to wrap at."""

from __future__ import annotations

from collections import deque
from typing import Any

from textual.events import Resize
from textual.widgets import RichLog


class TrainLog(RichLog):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._written: deque[Any] = deque(maxlen=self.max_lines)
        self._wrapped_at = 0

    def write(
        self,
        content: Any,
        width: int | None = None,
        expand: bool = False,
        shrink: bool = True,
        scroll_end: bool | None = None,
        animate: bool = False,
    ) -> TrainLog:
        if self._size_known:  # before, RichLog keeps the write and replays it through here
            self._written.append(content)
            width = width or self._room()
        super().write(content, width, expand, shrink, scroll_end, animate)
        return self

    def clear(self) -> TrainLog:
        self._written.clear()
        super().clear()
        return self

    def on_resize(self, event: Resize) -> None:
        # the first size is RichLog's own handler's (called after this one): it replays the writes
        room = self._room()
        if not self._size_known or room is None or room == self._wrapped_at:
            return
        self._wrapped_at = room
        kept = list(self._written)
        RichLog.clear(self)
        for content in kept:
            RichLog.write(self, content, room)

    def _room(self) -> int | None:
        """The columns a line may take (None while hidden: RichLog's own default)."""
        width = self.scrollable_content_region.width
        return width if width > 0 else None
