"""`tunebench chat`, `probe` and `export`: talk to a fine-tune, run probe sets, ship a merged model.

    tunebench chat --adapters runs/<id> --compare        base and adapter answers side by side
    tunebench probe --adapters runs/<id>                  the probe set against base and adapter
    tunebench export --adapters runs/<id> --merge_lora true --output_dir exports/mine

Flags use ms-swift's spelling (`swift infer --adapters ... --stream true --temperature 0`). With
only --adapters, the run's config.json supplies the base model, chat template and system prompt.
Chat reads questions from a terminal or from a pipe; inside it, /clear, /system TEXT, /multi and
/quit (or Ctrl-D) work, and Ctrl-C stops the answer being written.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import threading
import time
import unicodedata
from datetime import datetime
from itertools import zip_longest
from pathlib import Path
from typing import Any, TextIO, get_type_hints

import orjson

from ..core.config import GenerationConfig
from ..core.errors import UserError

MIN_COLUMN = 32  # narrower than this, side-by-side columns are printed one after the other
GAP = " │ "
HELP_TEXT = (
    "commands: /clear (forget the chat), /system TEXT (new system prompt; /system alone resets it), "
    "/multi (multi-line input, end with a line holding only '.'), /quit (or Ctrl-D); "
    "Ctrl-C stops an answer"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        from .main import suggest_flag

        if "unrecognized arguments" in message:
            flags = message.split(":", 1)[1].split()
            unknown = [f for f in flags if f.startswith("-")] or flags
            message = "unknown flag " + ", ".join(
                f"{flag}{suggest_flag(flag, self._option_string_actions)}" for flag in unknown
            )
        print(f"error: {message}\n  see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _parser(prog: str, description: str, *, generation: bool = True) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument(
        "--adapters",
        "--adapter",
        "--ckpt_dir",
        nargs="+",
        default=[],
        metavar="PATH",
        help="run folders, adapter folders or checkpoint folders",
    )
    parser.add_argument(
        "--model",
        "--model_id_or_path",
        default="",
        help="base model (default: the one the adapter's run recorded, else demo)",
    )
    parser.add_argument(
        "--torch_dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="auto: chat/probe use bfloat16 where the GPU or CPU computes it natively, else float32; "
        "export merges in bfloat16 on a GPU box or for QLoRA, else in the base's saved dtype",
    )
    if generation:
        parser.add_argument("--system", default=None, help="system prompt (default: the run's)")
        group = parser.add_argument_group("generation")
        hints = get_type_hints(GenerationConfig)
        for f in dataclasses.fields(GenerationConfig):
            group.add_argument(
                f"--{f.name}",
                default=None,
                metavar=hints[f.name].__name__.upper(),
                help=f"{f.metadata['help']} (default: {f.default})",
            )
    return parser


def _generation_config(args: argparse.Namespace) -> GenerationConfig:
    from .main import config_from_args

    return config_from_args(args, GenerationConfig)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    from .main import join_negative_numbers

    return parser.parse_args(join_negative_numbers(argv))


# ====================================================================== setup


@dataclasses.dataclass
class _Setup:
    model: str
    targets: list[Any]  # targets.Target, base first when present

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


def _setup(args: argparse.Namespace, with_base: bool) -> _Setup:
    """Resolve adapters and the base model up front, so a bad path fails before any loading."""
    from ..core.targets import BASE, Target, resolve_target
    from ..infer.export import base_model_of

    adapters = [resolve_target(str(Path(a).expanduser())) for a in args.adapters]
    model = base_model_of(adapters, args.model)
    targets = ([Target(BASE)] if with_base or not adapters else []) + adapters
    return _Setup(model, targets)


def _load_session(setup: _Setup, torch_dtype: str):
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
    return session


# ====================================================================== chat


def chat_main(argv: list[str]) -> int:
    parser = _parser("tunebench chat", "Chat with a base model and its adapters, streaming.")
    parser.epilog = "In the chat: " + HELP_TEXT
    parser.add_argument(
        "--stream", type=_bool, nargs="?", const=True, default=True, help="stream tokens (true|false)"
    )
    parser.add_argument(
        "--compare",
        type=_bool,
        nargs="?",
        const=True,
        default=False,
        help="also answer with the base model: side by side (one after the other on a narrow terminal)",
    )
    args = _parse(parser, argv)
    cfg = _generation_config(args)
    setup = _setup(args, with_base=args.compare)
    session = _load_session(setup, args.torch_dtype)
    return ChatLoop(session, setup, cfg, args.system, args.stream).run(sys.stdin, sys.stdout)


class ChatLoop:
    """The read-answer loop; each column keeps its own history of its own answers."""

    def __init__(self, session: Any, setup: _Setup, cfg: GenerationConfig, system: str | None, stream: bool):
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
                messages, specs, self.cfg, system=self.system or "", on_chunk=on_chunk, cancel=cancel
            )
        except KeyboardInterrupt:
            view.finish()
            print("\n(answer stopped; it is not kept in the history)", file=stdout)
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


# ====================================================================== probe


def default_probes(workspaces: tuple[Path, ...] = ()) -> Path:
    """The probes.txt of a workspace (the run's, then the current folder), as the TUI uses it, else
    sample_data/probes.txt of the source checkout (installs are editable) or of ./sample_data."""
    here = Path.cwd()
    candidates = [w / "probes.txt" for w in (*workspaces, here)] + [
        root / "sample_data" / "probes.txt" for root in (Path(__file__).resolve().parents[2], here)
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError("sample_data/probes.txt not found", "pass a file of questions with --probes FILE")


def read_probes(path: Path) -> list[str]:
    """One question per line; blank lines and lines starting with # are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(
            f"probe file not found: {path}", "pass a text file with one question per line"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read probe file {path}: {exc}", "save it as UTF-8 text") from None
    questions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not questions:
        raise UserError(f"{path} holds no questions", "write one question per line")
    return questions


def probe_main(argv: list[str]) -> int:
    parser = _parser(
        "tunebench probe", "Run a probe set against the base model and adapters; save a transcript."
    )
    parser.add_argument(
        "--probes",
        default="",
        metavar="FILE",
        help="questions, one a line (default: the workspace's probes.txt, else sample_data's)",
    )
    parser.add_argument(
        "--output_dir",
        default="",
        help="transcript folder (default: the run's transcripts/, else ./transcripts)",
    )
    args = _parse(parser, argv)
    cfg = _generation_config(args)
    setup = _setup(args, with_base=True)
    workspaces = tuple(t.run_dir.parent.parent for t in setup.targets if t.run_dir is not None)
    questions = read_probes(Path(args.probes).expanduser() if args.probes else default_probes(workspaces))
    session = _load_session(setup, args.torch_dtype)
    started = time.perf_counter()
    print(
        f"probing {len(questions)} questions x {len(setup.targets)} targets ...", file=sys.stderr, flush=True
    )
    results = session.generate_many(
        [[{"role": "user", "content": q}] for q in questions], setup.specs, cfg, system=args.system or ""
    )
    folder = _transcript_folder(setup, args.output_dir)
    json_path, md_path = write_transcript(folder, setup, questions, results, cfg, args.system or "", session)
    print(md_path.read_text(encoding="utf-8"))
    print(
        f"saved {json_path}\n      {md_path}  ({time.perf_counter() - started:.1f}s)",
        file=sys.stderr,
        flush=True,
    )
    return 0


def _transcript_folder(setup: _Setup, output_dir: str) -> Path:
    if output_dir:
        return Path(output_dir).expanduser()
    for target in setup.targets:
        if target.run_dir is not None:
            return target.run_dir / "transcripts"
    return Path("transcripts")


def write_transcript(
    folder: Path,
    setup: _Setup,
    questions: list[str],
    results: list[dict[str, dict[str, Any]]],
    cfg: GenerationConfig,
    system: str,
    session: Any,
) -> tuple[Path, Path]:
    """probe-<time>.json (everything, for tools) and probe-<time>.md (a table, for people)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = folder / f"probe-{stamp}"
    suffix = 1
    while stem.with_suffix(".json").exists():
        suffix += 1
        stem = folder / f"probe-{stamp}-{suffix}"
    labels = setup.labels
    payload = {
        "created": datetime.now().isoformat(timespec="seconds"),
        "model": setup.model,
        "model_path": str(session.loaded.resolved.path),
        "system": system,
        "generation": dataclasses.asdict(cfg),
        "targets": [
            {"label": label, "target": t.spec, "adapter_dir": str(t.adapter_dir or "")}
            for label, t in zip(labels, setup.targets, strict=True)
        ],
        "results": [
            {
                "question": q,
                "answers": {label: r[t.spec] for label, t in zip(labels, setup.targets, strict=True)},
            }
            for q, r in zip(questions, results, strict=True)
        ],
    }
    json_path = stem.with_suffix(".json")
    json_path.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    lines = [
        f"# Probe {stamp}",
        "",
        f"Base model: {setup.model}; {_settings_line(cfg)}"
        + (f"; system prompt: {system}" if system else ""),
        "",
        "| Question | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for question, result in zip(questions, results, strict=True):
        cells = [_md_cell(result[t.spec]["text"]) for t in setup.targets]
        lines.append(f"| {_md_cell(question)} | " + " | ".join(cells) + " |")
    md_path = stem.with_suffix(".md")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return json_path, md_path


def _settings_line(cfg: GenerationConfig) -> str:
    if cfg.temperature == 0:
        return f"greedy, at most {cfg.max_new_tokens} new tokens"
    return (
        f"temperature {cfg.temperature}, top_p {cfg.top_p}, top_k {cfg.top_k}, seed {cfg.seed}, "
        f"at most {cfg.max_new_tokens} new tokens"
    )


def _md_cell(text: str) -> str:
    return text.strip().replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


# ===================================================================== export


def export_main(argv: list[str]) -> int:
    parser = _parser(
        "tunebench export", "Merge an adapter into its base model and save it.", generation=False
    )
    parser.add_argument(
        "--merge_lora",
        type=_bool,
        nargs="?",
        const=True,
        default=True,
        help="merge into the base (true|false)",
    )
    parser.add_argument("--adapter_only", action="store_true", help="copy the PEFT adapter alone")
    parser.add_argument("--output_dir", default="", help="default: exports/<run-id> beside the run folder")
    args = _parse(parser, argv)
    if len(args.adapters) != 1:
        raise UserError(
            "export takes exactly one adapter" if args.adapters else "no adapter: --adapters is required",
            "for example: tunebench export --adapters runs/<run-id> --merge_lora true",
        )
    from ..core.targets import resolve_target
    from ..infer.export import export_model

    target = resolve_target(str(Path(args.adapters[0]).expanduser()))
    merge = args.merge_lora and not args.adapter_only
    output = Path(args.output_dir).expanduser() if args.output_dir else default_export_dir(target, merge)
    path = export_model(
        args.adapters[0],
        str(output),
        merge=merge,
        on_progress=lambda text: print(text, file=sys.stderr, flush=True),
        model=args.model or None,
        torch_dtype=args.torch_dtype,
    )
    print(path)
    if merge:
        print(
            f"load it with AutoModelForCausalLM.from_pretrained({str(path)!r}), "
            f"or in Ollama: cd {path} && ollama create my-model -f Modelfile",
            file=sys.stderr,
        )
    return 0


def default_export_dir(target: Any, merge: bool) -> Path:
    """exports/<run-id> (or <run-id>-step-<n>) in the workspace that holds runs/."""
    suffix = "" if merge else "-adapter"
    if target.run_dir is None:
        return Path("exports") / f"{target.adapter_dir.name}{suffix}"
    name = target.run_dir.name
    if target.adapter_dir.parent.name == "checkpoints":
        name = f"{name}-{target.adapter_dir.name}"
    return target.run_dir.parent.parent / "exports" / f"{name}{suffix}"
