"""`tunebench probe`: a probe set against the base model and adapters, saved as a transcript.

    tunebench probe --adapters runs/<id>

The questions come from --probes, else the workspace's probes.txt, else sample_data's. The
answers go to probe-<time>.json (everything, for tools) and probe-<time>.md (a table, for people)
in the run's transcripts/.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from ..core.config import GenerationConfig
from ..core.files import atomic_write_bytes, check_writable
from ..core.probes import default_probes, read_probes
from ..core.templates import template_words
from .flags import adapter_parser, generation_config, parse_args, say_swift_infer_flags
from .session import Setup, load_session, resolve_setup


def probe_main(argv: list[str]) -> int:
    parser = adapter_parser(
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
    args = parse_args(parser, argv)
    say_swift_infer_flags(args)
    cfg = generation_config(args)
    # A file the user named is checked before anything loads: its mistakes are the cheapest to report.
    questions = read_probes(Path(args.probes).expanduser()) if args.probes else []
    setup = resolve_setup(args, with_base=True)
    if not questions:
        workspaces = tuple(t.run_dir.parent.parent for t in setup.targets if t.run_dir is not None)
        questions = read_probes(default_probes(workspaces))
    folder = _transcript_folder(setup, args.output_dir)
    check_writable(folder, "--output_dir" if args.output_dir else "")  # before minutes of answers
    session = load_session(setup, args.torch_dtype)
    started = time.perf_counter()
    print(
        f"probing {len(questions)} questions x {len(setup.targets)} targets ...", file=sys.stderr, flush=True
    )
    results = session.generate_many(
        [[{"role": "user", "content": q}] for q in questions],
        setup.specs,
        cfg,
        system=args.system or "",
        template=setup.template,
    )
    answered_s = time.perf_counter() - started
    seconds = {"load": round(session.loaded.seconds, 3), "answers": round(answered_s, 3)}
    json_path, md_path = write_transcript(
        folder, setup, questions, results, cfg, args.system or "", session, seconds
    )
    print(md_path.read_text(encoding="utf-8"))
    print(
        f"saved {json_path}\n      {md_path}  (answered in {answered_s:.1f}s)",
        file=sys.stderr,
        flush=True,
    )
    return 0


def _transcript_folder(setup: Setup, output_dir: str) -> Path:
    if output_dir:
        return Path(output_dir).expanduser()
    for target in setup.targets:
        if target.run_dir is not None:
            return target.run_dir / "transcripts"
    return Path("transcripts")


def write_transcript(
    folder: Path,
    setup: Setup,
    questions: list[str],
    results: list[dict[str, dict[str, Any]]],
    cfg: GenerationConfig,
    system: str,
    session: Any,
    seconds: dict[str, float] | None = None,
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
        "template": setup.template,  # "" = each run's
        "generation": dataclasses.asdict(cfg),
        "seconds": seconds or {},  # the base model's load and the answers' generation
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
    atomic_write_bytes(json_path, orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    lines = [
        f"# Probe {stamp}",
        "",
        f"Base model: {setup.model}; {_settings_line(cfg)}"
        + (f"; system prompt: {system}" if system else "")
        + (f"; chat template: {template_words(setup.template)}" if setup.template else ""),
        "",
        "| Question | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for question, result in zip(questions, results, strict=True):
        cells = [_md_cell(result[t.spec]["text"]) for t in setup.targets]
        lines.append(f"| {_md_cell(question)} | " + " | ".join(cells) + " |")
    md_path = stem.with_suffix(".md")
    atomic_write_bytes(md_path, ("\n".join(lines) + "\n").encode("utf-8"))
    return json_path, md_path


def _settings_line(cfg: GenerationConfig) -> str:
    stops = f", stopping at {', '.join(map(repr, cfg.stop_words))}" if cfg.stop_words else ""
    if cfg.temperature == 0:
        return f"greedy, at most {cfg.max_new_tokens} new tokens{stops}"
    return (
        f"temperature {cfg.temperature}, top_p {cfg.top_p}, top_k {cfg.top_k}, seed {cfg.seed}, "
        f"at most {cfg.max_new_tokens} new tokens{stops}"
    )


def _md_cell(text: str) -> str:
    return text.strip().replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"
