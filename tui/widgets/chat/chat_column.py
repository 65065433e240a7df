"""One column of the side-by-side chat: the turns of one target, streaming as tokens arrive."""

from __future__ import annotations

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

    # The turns' box is at least the column's height: a short chat sits at the top, so the
    # columns' questions line up side by side (the anchor alone sits each at its column's foot).
    DEFAULT_CSS = """
    ChatColumn .chat-turns {
        height: auto;
        min-height: 100%;
    }
    """

    def __init__(self, target: str, label: str, **kwargs) -> None:
        super().__init__(classes="chat-column", **kwargs)
        self.target = target
        self.label = label

    def compose(self) -> ComposeResult:
        yield Label(self.label, classes="chat-title")
        with VerticalScroll(classes="chat-scroll"):
            yield Vertical(classes="chat-turns")

    def on_mount(self) -> None:
        # Textual's anchor keeps the end in view through every layout, a tall question's included,
        # and lets go when the reader scrolls up to read an earlier answer (until they come back
        # down). Scrolling to the end by hand after each change raced the layout: a refusal that
        # came back at once could leave the column above its end.
        self.query_one(VerticalScroll).anchor()

    @property
    def turns(self) -> list[ChatTurn]:
        return list(self.query(ChatTurn))

    def add_turn(self, prompt: str, probe: bool = False) -> ChatTurn:
        turn = ChatTurn(prompt, probe)
        scroll = self.query_one(VerticalScroll)
        scroll.query_one(".chat-turns").mount(turn)
        scroll.scroll_end(animate=False)  # a new question is followed, even by a reader who scrolled up
        return turn

    def append(self, index: int, text: str) -> None:
        """Stream `text` into turn `index` (a probe set queues several turns at once)."""
        turns = self.turns
        if not 0 <= index < len(turns):
            return
        turns[index].append(text)

    def finish(self, index: int | None = None, stats: str = "", note: str = "") -> None:
        """End turn `index`, or with None every turn still waiting."""
        turns = self.turns
        chosen = turns if index is None else turns[index : index + 1]
        for turn in chosen:
            if turn.pending:
                turn.finish(stats, note)

    def clear(self) -> None:
        self.query_one(".chat-turns").remove_children()
