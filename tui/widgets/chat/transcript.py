"""Chat exchanges and their saved form: a Markdown transcript a person can read or diff."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tunebench.engine.core.files import atomic_write_bytes

from .column_choices import ColumnChoice


@dataclass
class Exchange:
    """One prompt and every target's answer to it; probe prompts are not part of the conversation."""

    prompt: str
    probe: bool = False
    answers: dict[str, str] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)


def history_for(exchanges: list[Exchange], target: str) -> list[dict[str, str]]:
    """The conversation so far as this target saw it: its own answers, not the other columns'."""
    messages: list[dict[str, str]] = []
    for exchange in exchanges:
        # A question this target never answered (the engine was busy, or failed) is left out:
        # two user turns in a row would not be the conversation the person saw.
        if exchange.probe or target not in exchange.answers:
            continue
        messages.append({"role": "user", "content": exchange.prompt})
        messages.append({"role": "assistant", "content": exchange.answers[target]})
    return messages


def render_markdown(targets: list[ColumnChoice], exchanges: list[Exchange], model: str) -> str:
    lines = [
        f"# TuneBench transcript, {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"base model: `{model}`",
        "",
        *[f"- **{t.label}**: `{t.path}`" for t in targets],
        "",
    ]
    for exchange in exchanges:
        lines += [f"## {'probe' if exchange.probe else 'user'}: {exchange.prompt}", ""]
        for target in targets:
            stats = exchange.stats.get(target.path, {})
            speed = f" ({stats['tokens_per_s']:.1f} tok/s)" if "tokens_per_s" in stats else ""
            answer = exchange.answers[target.path].strip() if target.path in exchange.answers else ""
            lines += [f"### {target.label}{speed}", "", answer or "_(no answer)_", ""]
    return "\n".join(lines)


def save_transcript(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{datetime.now():%Y%m%d-%H%M%S}.md"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
