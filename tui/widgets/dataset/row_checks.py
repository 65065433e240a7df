"""Checks on every dataset row, through encoding.check_sample, plus the cross-row duplicate check.

A row's result depends only on its record and a few settings (max_length, name / author,
system, template, tokenizer), so results are cached by record: editing one row re-checks one row.
Checking a large file takes a while (a chat template rendered and tokenised per row), so
check_in_batches() gives results a batch at a time, the rows on screen first.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tunebench.engine.core import data, encoding, record_formats
from tunebench.engine.core.config import TrainConfig

from .dataset_store import Row
from .light_tokenizer import LightTokenizer


@dataclass(frozen=True)
class RowReport:
    user: str = ""  # first user turn, for the table
    assistant: str = ""  # last assistant turn
    tokens: int | None = None
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CheckSettings:
    """What the checks read from the parameters; a change to any of these re-checks every row."""

    max_length: int
    model_name: tuple[str, ...]
    model_author: tuple[str, ...]
    system: str
    template: str
    columns: str = ""  # --columns: the fields renamed before a record's format is read
    loss_scale: str = "default"  # last_round: a conversation's last answer alone is trained

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> CheckSettings:
        return cls(
            cfg.max_length,
            tuple(cfg.model_name),
            tuple(cfg.model_author),
            cfg.system,
            cfg.template,
            cfg.columns,
            cfg.loss_scale,
        )

    @functools.cached_property
    def renaming(self) -> dict[str, str]:
        """--columns read once; none while it is not valid JSON (the form says why)."""
        try:
            return record_formats.column_map(self.columns)
        except ValueError:
            return {}


class RowChecker:
    def __init__(self, tokenizer: LightTokenizer, settings: CheckSettings) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self._cache: dict[bytes, RowReport] = {}

    def reconfigure(self, tokenizer: LightTokenizer, settings: CheckSettings) -> bool:
        """New settings or tokenizer; True when that invalidated the cached results."""
        if tokenizer is self.tokenizer and settings == self.settings:
            return False
        self.tokenizer, self.settings = tokenizer, settings
        self._cache.clear()
        return True

    def check(self, row: Row) -> RowReport:
        key = row.dedupe_key()
        if key not in self._cache:
            self._cache[key] = self._check(row)
        return self._cache[key]

    def check_all(self, rows: list[Row]) -> dict[str, RowReport]:
        """Every row's report, with duplicates flagged (the same record more than once)."""
        reports: dict[str, RowReport] = {}
        for batch in self.check_in_batches(rows):
            reports.update(batch)
        return reports

    def check_in_batches(
        self, rows: Sequence[Row], first: Sequence[Row] = (), size: int = 1000
    ) -> Iterator[dict[str, RowReport]]:
        """Reports a batch at a time: `first` (the rows on screen) before the duplicates are
        counted, then every row, duplicates flagged (the same record more than once)."""
        if first:
            yield {row.key: self.check(row) for row in first}
        counts: dict[bytes, int] = {}
        for row in rows:
            counts[row.dedupe_key()] = counts.get(row.dedupe_key(), 0) + 1
        for start in range(0, len(rows), size):
            reports = {}
            for row in rows[start : start + size]:
                report = self.check(row)
                copies = counts[row.dedupe_key()]
                if copies > 1:
                    report = RowReport(
                        report.user,
                        report.assistant,
                        report.tokens,
                        [*report.problems, f"duplicate: the same record appears {copies} times"],
                    )
                reports[row.key] = report
            yield reports

    def _check(self, row: Row) -> RowReport:
        if not row.valid_json:
            return RowReport(*row_summary(row), None, [row.error])
        s = self.settings
        counts = self.tokenizer.counts_tokens
        record = record_formats.renamed(row.record, s.renaming)
        problems = encoding.check_sample(
            record,
            tokenizer=self.tokenizer if counts else None,
            max_length=s.max_length if counts else None,
            model_name=s.model_name,
            model_author=s.model_author,
            system=s.system,
            template=s.template,
            loss_scale=s.loss_scale,
        )
        try:
            messages = record_formats.normalise_record(record)
        except Exception:  # noqa: BLE001 - check_sample has already said why
            return RowReport(_preview(row), "", None, problems)
        tools = record_formats.record_tools(record) or None
        return RowReport(*_ends(messages), self._count(messages, tools) if counts else None, problems)

    def _count(self, messages: list[record_formats.Message], tools: list[dict] | None) -> int | None:
        s = self.settings
        filled, _ = data.fill_placeholders(messages, s.model_name, s.model_author, system=s.system)
        try:
            chat_template, _ = encoding.resolve_template(self.tokenizer, s.template)
            return len(encoding.encode_messages(filled, self.tokenizer, chat_template, tools=tools)[0])
        except Exception:  # noqa: BLE001 - a template failure is already among the problems
            return None


def row_summary(row: Row) -> tuple[str, str]:
    """(first user turn, last answer) for the table, without the checks: what shows at once."""
    if not row.valid_json:
        return _preview(row), ""
    try:
        messages = record_formats.normalise_record(row.record)
    except Exception:  # noqa: BLE001 - the checks will say why
        return _preview(row), ""
    return _ends(messages)


def _ends(messages: list[dict[str, str]]) -> tuple[str, str]:
    user = next((m["content"] for m in messages if m["role"] == "user"), "")
    return user, next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")


def _preview(row: Row) -> str:
    # The row's own JSON text, as in the file: str(record) would show Python's True/None/quotes.
    return " ".join(row.text.splitlines())[:80]
