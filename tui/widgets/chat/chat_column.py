"""One column of the side-by-side chat: the turns of one target, streaming as tokens arrive."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Static


class ChatTurn(Static):
    """A prompt and this target's answer to it."""

    def __init__(self, prompt: str, probe: bool = False) -> None:
        super().__init__("", classes="chat-turn")
        self.prompt = prompt
        self.probe = probe
        self.answer = ""
        self.stats = ""
        self.pending = True
        self._draw()

    def append(self, text: str) -> None:
        self.answer += text
        self._draw()

    def finish(self, stats: str = "", note: str = "") -> None:
        self.pending = False
        # "cancelled · 12.0 tok/s": a cancelled answer still has its speed, and must say it stopped.
        self.stats = " · ".join(part for part in (note, stats) if part)
        self._draw()

    def _draw(self) -> None:
        text = Text()
        text.append("probe › " if self.probe else "you › ", style="bold cyan")
        text.append(self.prompt + "\n")
        text.append(self.answer)
        if self.pending and not self.answer:
            # Loading the model, or another column answering first (one request at a time).
            text.append("waiting ", style="dim")
        if self.pending:
            text.append("▌", style="blink bold")
        elif self.stats:
            text.append(f"\n{self.stats}", style="dim")
        self.update(text)


class ChatColumn(Vertical):
    """Title plus a scrolling list of turns; follows the stream only if already at the bottom."""

    def __init__(self, target: str, label: str, **kwargs) -> None:
        super().__init__(classes="chat-column", **kwargs)
        self.target = target
        self.label = label

    def compose(self) -> ComposeResult:
        yield Label(self.label, classes="chat-title")
        yield VerticalScroll(classes="chat-scroll")

    @property
    def turns(self) -> list[ChatTurn]:
        return list(self.query(ChatTurn))

    def add_turn(self, prompt: str, probe: bool = False) -> ChatTurn:
        turn = ChatTurn(prompt, probe)
        scroll = self.query_one(VerticalScroll)
        scroll.mount(turn)
        # after the layout: a long question is taller than the column, its end not there yet
        scroll.call_after_refresh(scroll.scroll_end, animate=False)
        return turn

    def append(self, index: int, text: str) -> None:
        """Stream `text` into turn `index` (a probe set queues several turns at once)."""
        turns = self.turns
        if not 0 <= index < len(turns):
            return
        with self._following():
            turns[index].append(text)

    def finish(self, index: int | None = None, stats: str = "", note: str = "") -> None:
        """End turn `index`, or with None every turn still waiting."""
        turns = self.turns
        chosen = turns if index is None else turns[index : index + 1]
        with self._following():  # the stats line, or why there is no answer, shows
            for turn in chosen:
                if turn.pending:
                    turn.finish(stats, note)

    @contextmanager
    def _following(self) -> Iterator[None]:
        """Keep the column at its end through a change, when the reader is there: someone who
        scrolled up to read an earlier answer is not yanked down by every token."""
        scroll = self.query_one(VerticalScroll)
        follow = scroll.scroll_offset.y >= scroll.max_scroll_y - 1
        yield
        if follow:
            scroll.call_after_refresh(scroll.scroll_end, animate=False)

    def clear(self) -> None:
        self.query_one(VerticalScroll).remove_children()
