"""`tunebench chat`: talk to a fine-tune, streaming, with the base model beside it if asked.

    tunebench chat --adapters runs/<id> --compare        base and adapter answers side by side

Flags use ms-swift's spelling (`swift infer --adapters ... --stream true --temperature 0`). With
only --adapters, the run's config.json supplies the base model, chat template and system prompt.
Chat reads questions from a terminal or from a pipe; inside it, /clear, /system TEXT, /multi and
/quit (or Ctrl-D) work, and Ctrl-C stops the answer being written.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
import unicodedata
from itertools import zip_longest
from typing import Any, TextIO

from ..core.config import GenerationConfig
from ..core.errors import UserError
from .flags import adapter_parser, generation_config, parse_args, parse_bool, say_swift_infer_flags
from .session import Setup, load_session, resolve_setup

MIN_COLUMN = 32  # narrower than this, side-by-side columns are printed one after the other
GAP = " │ "
HELP_TEXT = (
    "commands: /clear (forget the chat), /system TEXT (new system prompt; /system alone resets it), "
    "/multi (multi-line input, end with a line holding only '.'), /quit (or Ctrl-D); "
    "Ctrl-C stops an answer"
)


def chat_main(argv: list[str]) -> int:
    parser = adapter_parser("tunebench chat", "Chat with a base model and its adapters, streaming.")
    parser.epilog = "In the chat: " + HELP_TEXT
    parser.add_argument(
        "--stream", type=parse_bool, nargs="?", const=True, default=True, help="stream tokens (true|false)"
    )
    parser.add_argument(
        "--compare",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        help="also answer with the base model: side by side (one after the other on a narrow terminal)",
    )
    args = parse_args(parser, argv)
    say_swift_infer_flags(args)
    cfg = generation_config(args)
    setup = resolve_setup(args, with_base=args.compare)
    session = load_session(setup, args.torch_dtype)
    return ChatLoop(session, setup, cfg, args.system, args.stream).run(sys.stdin, sys.stdout)


class ChatLoop:
    """The read-answer loop; each column keeps its own history of its own answers."""

    def __init__(self, session: Any, setup: Setup, cfg: GenerationConfig, system: str | None, stream: bool):
        self.session = session
        self.setup = setup
        self.cfg = cfg
        self.system = system  # None: each target's run decides
        self.stream = stream
        self.history: dict[str, list[dict[str, str]]] = {spec: [] for spec in setup.specs}

    def run(self, stdin: TextIO, stdout: TextIO) -> int:
        interactive = stdin.isatty()
        if interactive:
            try:
                import readline  # noqa: F401 - line editing and history for input()
            except ImportError:
                pass
            print(HELP_TEXT, file=sys.stderr)
        while True:
            try:
                line = self._read(stdin, stdout, "user> ", interactive)
            except KeyboardInterrupt:  # a Ctrl-C meant for an answer that had just ended
                print("\n(Ctrl-C clears the line; Ctrl-D or /quit leaves the chat)", file=stdout)
                continue
            if line is None:
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command, _, rest = text.partition(" ")
                if command in ("/quit", "/exit"):
                    return 0
                if command == "/clear":
                    self.history = {spec: [] for spec in self.setup.specs}
                    print("(history cleared)", file=stdout)
                    continue
                if command == "/system":
                    self.system = rest.strip() or None
                    self.history = {spec: [] for spec in self.setup.specs}
                    print(
                        f"(system prompt: {self.system or 'the run default'}; history cleared)", file=stdout
                    )
                    continue
                if command == "/multi":
                    try:
                        text = self._read_multi(stdin, stdout, interactive)
                    except KeyboardInterrupt:
                        print("\n(multi-line input dropped)", file=stdout)
                        continue
                    if text is None:
                        return 0
                elif command in ("/help", "/?"):
                    print(HELP_TEXT, file=stdout)
                    continue
                else:
                    print(f"(unknown command {command}; {HELP_TEXT})", file=stdout)
                    continue
            self.answer(text, stdout, interactive)

    def _read(self, stdin: TextIO, stdout: TextIO, prompt: str, interactive: bool) -> str | None:
        if interactive:
            try:
                return input(prompt)
            except EOFError:
                print(file=stdout)
                return None
        line = stdin.readline()
        if not line:
            return None
        print(f"{prompt}{line.rstrip()}", file=stdout)  # echo, so piped output reads as a transcript
        return line

    def _read_multi(self, stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
        if interactive:
            print("(multi-line: end with a line holding only '.')", file=stdout)
        lines = []
        while True:
            line = self._read(stdin, stdout, "... ", interactive)
            if line is None:
                return "\n".join(lines) if lines else None
            if line.rstrip("\n") == ".":
                return "\n".join(lines)
            lines.append(line.rstrip("\n"))

    def answer(self, text: str, stdout: TextIO, interactive: bool) -> None:
        specs, labels = self.setup.specs, self.setup.labels
        messages = {spec: self.history[spec] + [{"role": "user", "content": text}] for spec in specs}
        view = make_view(labels, stdout)
        by_spec = dict(zip(specs, labels, strict=True))
        cancel = threading.Event()
        on_chunk = (lambda spec, piece: view.add(by_spec[spec], piece)) if self.stream else None
        try:
            results = self.session.generate(
                messages,
                specs,
                self.cfg,
                system=self.system or "",
                on_chunk=on_chunk,
                cancel=cancel,
                template=self.setup.template,
            )
        except KeyboardInterrupt:
            view.finish()
            print("\n(answer stopped; it is not kept in the history)", file=stdout)
            return
        except UserError as exc:
            if exc.code != "context":
                raise
            # The chat goes on: the way out the hint names (/clear) is one of its commands.
            view.finish()
            print(f"(no answer: {exc.message}; {exc.hint}; it is not kept in the history)", file=stdout)
            return
        if not self.stream:
            for spec, label in zip(specs, labels, strict=True):
                view.add(label, results[spec]["text"])
        view.finish()
        for spec in specs:
            self.history[spec] = messages[spec] + [{"role": "assistant", "content": results[spec]["text"]}]
        stats = "  ".join(
            f"{label}: {r['tokens']} tokens, {r['tokens_per_s']:.1f} tok/s, first after {r['ttft_s']:.2f}s"
            for label, r in zip(labels, (results[s] for s in specs), strict=True)
        )
        print(f"[{stats}]", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ display


def cell_width(text: str) -> int:
    """Terminal cells a string takes: CJK characters take two, combining marks none."""
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        for ch in text
    )


def wrap_cells(text: str, width: int) -> list[str]:
    """Wrap to `width` terminal cells, at a space where there is one (CJK text breaks anywhere)."""
    lines: list[str] = []
    for paragraph in text.replace("\t", "    ").split("\n"):
        line = ""
        for ch in paragraph:
            if not ch.isprintable():
                continue
            if cell_width(line + ch) > width:
                cut = line.rfind(" ")
                if cut > 0:
                    lines.append(line[:cut])
                    line = line[cut + 1 :]
                else:
                    lines.append(line)
                    line = ""
            line += ch
        lines.append(line)
    return lines


def make_view(labels: list[str], stdout: TextIO) -> Any:
    size = shutil.get_terminal_size((80, 24))
    column = (size.columns - len(GAP) * (len(labels) - 1)) // max(len(labels), 1)
    if len(labels) > 1 and stdout.isatty() and column >= MIN_COLUMN:
        return ColumnsView(labels, column, size.lines, stdout)
    return SequentialView(labels, stdout)


class SequentialView:
    """One answer after another: the first column streams live, the others print when done."""

    def __init__(self, labels: list[str], out: TextIO) -> None:
        self.labels = labels
        self.out = out
        self.texts = {label: "" for label in labels}
        self.headers = len(labels) > 1
        self._started = False

    def _header(self, label: str) -> None:
        if self.headers:
            self.out.write(f"\n── {label} ──\n")

    def add(self, label: str, piece: str) -> None:
        self.texts[label] += piece
        if label == self.labels[0]:
            if not self._started:
                self._header(label)
                self._started = True
            self.out.write(piece)
            self.out.flush()

    def finish(self) -> None:
        if not self._started:
            self._header(self.labels[0])
        self.out.write("\n")
        for label in self.labels[1:]:
            self._header(label)
            self.out.write(self.texts[label] + "\n")
        self.out.flush()


class ColumnsView:
    """Side-by-side columns on a terminal: while streaming, the last screenful is redrawn in place
    (the cursor cannot move above the top of the screen); at the end the whole answer is printed
    once, so the scrollback holds all of it."""

    def __init__(self, labels: list[str], column: int, height: int, out: TextIO) -> None:
        self.labels = labels
        self.column = column
        self.height = max(height - 3, 4)
        self.out = out
        self.texts = {label: "" for label in labels}
        self._drawn = 0
        self._last = 0.0

    def add(self, label: str, piece: str) -> None:
        self.texts[label] += piece
        now = time.monotonic()
        if now - self._last >= 0.05:  # 20 redraws a second is smooth; every token would flicker
            self._last = now
            self._draw(self._lines()[-self.height :])

    def _lines(self) -> list[str]:
        header = GAP.join(_pad(f"── {label} ", self.column, "─") for label in self.labels)
        columns = [wrap_cells(self.texts[label], self.column) for label in self.labels]
        rows = [GAP.join(_pad(cell or "", self.column) for cell in row) for row in zip_longest(*columns)]
        return [header, *rows]

    def _draw(self, lines: list[str]) -> None:
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}A\r")
        self.out.write("\x1b[J" + "\n".join(lines) + "\n")
        self.out.flush()
        self._drawn = len(lines)

    def finish(self) -> None:
        self._draw(self._lines())
        self._drawn = 0


def _pad(text: str, width: int, fill: str = " ") -> str:
    return text + fill * max(width - cell_width(text), 0)
