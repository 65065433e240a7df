"""The Chat pane: one prompt, every target answering side by side, streaming.

Each column keeps its own conversation (its own earlier answers), so multi-turn compares what
each model would really say. While all columns share the same history, one Generate request
serves every target at once; once their answers differ, each target gets its own request.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widgets import Input, Label
from tunebench.engine.core import protocol as P
from tunebench.tui.engine_client import error_text
from tunebench.tui.paths import short_path

from .chat_column import ChatColumn
from .column_choices import BASE, ColumnChoice
from .transcript import Exchange, history_for, render_markdown, save_transcript

MAX_NEW_TOKENS = 256


@dataclass
class Job:
    """One Generate request: these targets, these messages, answering exchange `index`."""

    targets: list[str]
    messages: list[dict[str, str]]
    index: int


class ChatPane(Vertical):
    # Short descriptions for the footer (80 columns hold them all); the tooltip is what the help
    # screen and the command palette say.
    BINDINGS = [
        Binding("escape", "cancel", "Cancel answer", tooltip="Cancel the answer being streamed"),
        Binding("escape", "leave_prompt", "Leave", tooltip="Leave the prompt, so 1-5 switch panes again"),
        Binding("enter", "focus_prompt", "Type", tooltip="Back to the prompt, to type a question"),
        Binding("ctrl+t", "choose_targets", "Columns", tooltip="Choose the columns: base, adapters"),
        Binding("ctrl+r", "run_probes", "Run probes", tooltip="Run the probe set on every column"),
        Binding("ctrl+s", "save_transcript", "Save", tooltip="Save the transcript (Markdown)"),
        Binding("ctrl+l", "clear", "Clear", tooltip="Clear the conversation"),
    ]
    HELP_KEYS = (
        ("enter", "in the prompt: send it to every column; the conversation goes on from there"),
        ("↑ ↓ pgup pgdn", "out of the prompt: scroll the column"),
        ("tab", "next column"),
    )

    generating: reactive[bool] = reactive(False)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.targets: list[ColumnChoice] = [ColumnChoice(BASE, BASE)]
        self.exchanges: list[Exchange] = []
        self.jobs: deque[Job] = deque()
        self.job: Job | None = None
        self.request_id = ""
        self.chosen_by_person = False  # once the person picks targets, a finished run won't change them
        self.cancelling = False  # escape was pressed; the engine has not yet ended the answer

    def compose(self) -> ComposeResult:
        yield Horizontal(id="chat-columns")
        yield Label("", id="chat-status")
        yield Input(
            placeholder="ask something; enter sends to every column · esc leaves the prompt", id="chat-prompt"
        )

    def on_mount(self) -> None:
        self._build_columns()

    # ------------------------------------------------------------ targets

    def set_targets(self, targets: list[ColumnChoice], *, by_person: bool = False) -> None:
        if self.generating:
            self.notify("wait for the answer to finish (escape cancels it)", severity="warning")
            return
        self.targets = targets or [ColumnChoice(BASE, BASE)]
        self.chosen_by_person |= by_person
        self.exchanges.clear()  # a new line-up starts a new comparison
        self._build_columns()

    def _build_columns(self) -> None:
        holder = self.query_one("#chat-columns")
        holder.remove_children()
        holder.mount_all(ChatColumn(t.path, t.label) for t in self.targets)
        self._status()

    def _column(self, target: str) -> ChatColumn | None:
        return next((c for c in self.query(ChatColumn) if c.target == target), None)

    # ------------------------------------------------------------- asking

    @on(Input.Submitted, "#chat-prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if self.generating:
            # The typed question stays in the prompt, to send once the answer is done.
            self.notify(
                "still answering: enter again once it is done, or escape cancels it", severity="warning"
            )
            return
        event.input.value = ""
        self.ask(prompt)

    def ask(self, prompt: str, *, probe: bool = False) -> None:
        index = len(self.exchanges)
        histories = {
            t.path: ([] if probe else history_for(self.exchanges, t.path))
            + [{"role": "user", "content": prompt}]
            for t in self.targets
        }
        self.exchanges.append(Exchange(prompt, probe))
        for column in self.query(ChatColumn):
            column.add_turn(prompt, probe)
        if all(h == histories[self.targets[0].path] for h in histories.values()):
            self.jobs.append(Job([t.path for t in self.targets], histories[self.targets[0].path], index))
        else:
            self.jobs.extend(Job([path], messages, index) for path, messages in histories.items())
        self._next_job()

    def _next_job(self) -> None:
        if self.job is not None or not self.jobs:
            return
        job = self.jobs.popleft()
        settings = self.app.settings
        # With an adapter in the job the engine takes the base from the adapter's run (a form
        # changed since training must not pair the adapter with another base); base alone
        # follows the form.
        adapters = any(target != BASE for target in job.targets)
        request = P.Generate(
            messages=job.messages,
            targets=job.targets,
            model="" if adapters else settings.config.model,
            system=settings.config.system,
            config={"max_new_tokens": MAX_NEW_TOKENS},
        )
        request_id = self.app.send_request(request, "chat")
        if not request_id:
            self._fail_all("the engine is not connected")
            return
        self.job, self.request_id = job, request_id
        self.generating = True

    def watch_generating(self, generating: bool) -> None:
        # The prompt stays focused and editable while tokens arrive (only sending waits, in
        # _submitted): a disabled prompt let the next question's keys fall through to the app's
        # shortcuts ("4" switched panes, "s" started training).
        self._status()
        self.refresh_bindings()  # escape changes meaning: cancel while answering, leave otherwise

    def _focus_columns(self) -> None:
        scrolls = self.query(".chat-scroll")
        if scrolls:
            scrolls.first().focus()

    # ------------------------------------------------------ engine events

    def handle_event(self, event: P.Event) -> None:
        if self.job is None or (event.id and event.id != self.request_id):
            return  # another client's generation, or one this TUI cancelled
        # ctrl+l cleared the chat while this answered: the rest of the answer has no place to go
        cleared = self.job.index >= len(self.exchanges)
        if isinstance(event, P.TokenChunk):
            if cleared:
                return
            if not self.exchanges[self.job.index].answers:
                self._status()  # the first token: "loading model…" is over
            column = self._column(event.target)
            if column is not None:
                column.append(self.job.index, event.text)
            answers = self.exchanges[self.job.index].answers
            answers[event.target] = answers.get(event.target, "") + event.text
        elif isinstance(event, P.GenerateDone):
            if cleared:
                self._job_done()
                return
            exchange = self.exchanges[self.job.index]
            for target in self.job.targets:
                stats = event.stats.get(target, {})
                exchange.stats[target] = stats
                exchange.answers.setdefault(target, "")
                column = self._column(target)
                if column is not None:
                    # a column that had finished its answer before the cancel keeps it as finished
                    stopped = event.cancelled and stats.get("finish_reason", "cancelled") == "cancelled"
                    column.finish(self.job.index, _stats_text(stats), "cancelled" if stopped else "")
            self._job_done()
        elif isinstance(event, P.EngineError):
            prompt = self.query_one("#chat-prompt", Input)
            if event.code == "context" and not cleared and not prompt.value:
                prompt.value = self.exchanges[self.job.index].prompt  # back to be shortened, not typed again
            self._fail_all(error_text(event))

    def _job_done(self) -> None:
        self.job, self.request_id = None, ""
        if self.jobs:
            self._next_job()
        else:
            self._answered()

    def _answered(self) -> None:
        self.cancelling = False
        self.generating = False
        # Back to the prompt for the next question, unless the person moved elsewhere.
        focused = self.screen.focused
        if focused is None or self in focused.ancestors:
            self.query_one("#chat-prompt", Input).focus()

    def _fail_all(self, reason: str) -> None:
        """An error or a lost engine ends every pending answer, saying why."""
        for column in self.query(ChatColumn):
            column.finish(note=f"no answer: {reason}")  # every turn still waiting
        self.jobs.clear()
        self.job, self.request_id = None, ""
        self._answered()
        self.notify(reason, severity="error")

    def show_progress(self, progress: P.Progress) -> None:
        """The engine is loading the model for the first answer: say so instead of a silent wait."""
        if self.generating:
            self.query_one("#chat-status", Label).update(
                f"[yellow]{escape(progress.message or progress.stage)}…[/yellow]"
            )

    def engine_lost(self) -> None:
        if self.generating:
            self._fail_all("the engine stopped")

    def _status(self) -> None:
        if not self.is_mounted:
            return
        names = " | ".join(t.label for t in self.targets)
        count = len(self.exchanges)
        if self.cancelling:  # a prompt being read cannot stop midway; its end comes soon
            state = "cancelling… (the answer stops after the model has read the prompt)"
        elif self.generating:
            state = "answering… (escape cancels)"
        else:
            state = f"{count} exchange{'s' * (count != 1)}"
        self.query_one("#chat-status", Label).update(f"[dim]{escape(names)}  ·  {state}[/dim]")

    # ------------------------------------------------------------- actions

    def action_choose_targets(self) -> None:
        self.app.choose_chat_targets()

    def action_run_probes(self) -> None:
        if self.generating:
            self.notify("wait for the answer to finish", severity="warning")
            return
        for probe in self.app.probe_questions():  # none: the app said why
            self.ask(probe, probe=True)

    def action_save_transcript(self) -> None:
        if not self.exchanges:
            self.notify("nothing to save yet", severity="warning")
            return
        text = render_markdown(self.targets, self.exchanges, self.app.settings.config.model)
        folder = self.app.workspace / "transcripts"
        for target in self.targets:  # beside the run it compares, as DESIGN.md lays out
            if target.path != BASE:
                run_dir = Path(target.path).parent
                if run_dir.name == "checkpoints":
                    run_dir = run_dir.parent
                folder = run_dir / "transcripts"
                break
        try:
            path = save_transcript(folder, text)
        except OSError as exc:
            self.notify(f"could not save the transcript: {exc}", severity="error")
            return
        self.notify(f"transcript saved to {short_path(path, self.app.workspace)}")

    def action_clear(self) -> None:
        if self.generating:
            self.action_cancel()
        self.exchanges.clear()
        self.jobs.clear()
        for column in self.query(ChatColumn):
            column.clear()
        self._status()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Escape and enter do one thing at a time; False hides the others from the footer and
        # lets the key fall through to the binding that applies.
        if action == "cancel":
            return self.generating
        if action in ("leave_prompt", "focus_prompt"):
            in_prompt = self.is_mounted and self.query_one("#chat-prompt", Input).has_focus
            if action == "leave_prompt":
                return in_prompt and not self.generating
            return not in_prompt
        return True

    def action_cancel(self) -> None:
        if self.generating:
            # Columns still waiting their turn will not get one: say so rather than spin forever.
            for job in self.jobs:
                for target in job.targets:
                    column = self._column(target)
                    if column is not None:
                        column.finish(job.index, note="cancelled")
            self.jobs.clear()
            if self.app.send_request(P.CancelGenerate(), "cancel"):
                self.cancelling = True
                self._status()

    def action_leave_prompt(self) -> None:
        """Out of the prompt, digits switch panes and arrows scroll the columns (enter comes back)."""
        self._focus_columns()

    def action_focus_prompt(self) -> None:
        self.query_one("#chat-prompt", Input).focus()


def _stats_text(stats: dict[str, float]) -> str:
    parts = []
    if "tokens_per_s" in stats:
        parts.append(f"{stats['tokens_per_s']:.1f} tok/s")
    if "ttft_s" in stats:
        parts.append(f"first token {stats['ttft_s']:.2f}s")
    return ", ".join(parts)
