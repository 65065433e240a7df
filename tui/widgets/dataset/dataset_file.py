"""A dataset file's lines as rows: read in batches (the first rows show at once, the rest follow
in the background), and written back so that every line nobody edited keeps its exact bytes.

A one-line edit is then a one-line diff, whatever the file's spacing, key order, escapes or line
endings were; only edited and added rows are written in TuneBench's own compact form.

Each row read keeps its line's bytes, so a save serialises only the rows edited since: writing
100,000 untouched rows copies the bytes read, a block at a time, instead of encoding every row.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson

BOM = b"\xef\xbb\xbf"
FIRST_READ = 64 << 10  # bytes read before the first rows go on screen: a screenful, in milliseconds
READ_CHUNK = 1 << 20  # then a megabyte (about a thousand samples) per batch
JSON_LIST_BATCH = 2000  # rows per batch from a .json list, which is parsed whole
SAVE_BLOCK = 1 << 20  # bytes of lines joined per write when saving
_row_ids = itertools.count(1)


@dataclass(frozen=True)
class Row:
    """One record; `record` is None when its text is not a JSON value (then `error` says why)."""

    text: str
    record: Any = None
    error: str = ""
    line: int = 0  # line number in the file as loaded (0 for rows added since)
    raw: bytes | None = None  # the line's exact bytes as read (None for rows made here: text's UTF-8)
    key: str = field(default_factory=lambda: f"row-{next(_row_ids)}")

    @classmethod
    def from_record(cls, record: Any, line: int = 0) -> Row:
        dumped = orjson.dumps(record)
        return cls(dumped.decode(), record, "", line, dumped)

    @classmethod
    def from_text(cls, text: str, line: int = 0, raw: bytes | None = None) -> Row:
        try:
            return cls(text, orjson.loads(text), "", line, raw)
        except orjson.JSONDecodeError as exc:
            return cls(text, None, f"not valid JSON (column {exc.colno}): {exc.msg}", line, raw)

    @property
    def valid_json(self) -> bool:
        return not self.error

    @cached_property
    def _dedupe_digest(self) -> bytes:
        # A digest rather than the sorted dump itself: 16 bytes a row, not a second copy of the file.
        if self.record is None:
            return hashlib.blake2b(self.text.encode(), digest_size=16).digest()
        canonical = orjson.dumps(self.record, option=orjson.OPT_SORT_KEYS)
        return hashlib.blake2b(canonical, digest_size=16).digest()

    def dedupe_key(self) -> bytes:
        """Equal for rows holding the same record, however it is spaced or its keys ordered."""
        return self._dedupe_digest

    def jsonl_line(self) -> bytes:
        """The row as one line of a JSON lines file, without its newline: the bytes it was read
        (or serialised) with while nobody edited it, the text as typed when that is one line,
        else the record."""
        if self.raw is not None:
            return self.raw
        if "\n" not in self.text and "\r" not in self.text:
            return self.text.encode()
        return orjson.dumps(self.record)  # JSON typed over several lines in the editor


def row_from_line(line: bytes, number: int) -> Row:
    """A row from one line of a JSON lines file (without its newline)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = line.decode("utf-8", errors="replace")
        return Row(text, None, f"bytes that are not UTF-8 at byte {exc.start + 1}: fix or delete", number)
    return Row.from_text(text.strip(), number, line)  # the bytes kept: saved as they were read


def spare_rows_from_gc_scans() -> None:
    """Take everything alive now, the rows just read (or checked) included, out of the cyclic
    garbage collector's full scans (gc.freeze).

    The records of 100,000 samples are millions of dicts and lists; each full collection walked
    all of them, holding the UI for up to a second at a time, ten times while a file loaded. Rows
    hold no reference cycles, so reference counting still frees them when they are dropped. Young
    cyclic garbage is collected first, so only long-lived objects are spared;
    gc_scans_everything() puts them back (before another file is read).
    """
    gc.collect(1)
    gc.freeze()


def gc_scans_everything() -> None:
    gc.unfreeze()


def file_blocks(rows: Sequence[Row], bom: bool = False) -> Iterator[bytes]:
    """The JSON lines file holding `rows`, one per line (untouched rows keep their bytes), in
    blocks of about a megabyte: written and hashed a block at a time, 100 MB are never joined
    into one more copy of the file (on a busy box, each such copy took 0.3 s)."""
    head = BOM if bom else b""
    lines: list[bytes] = []
    size = 0
    for row in rows:
        line = row.jsonl_line()
        lines.append(line)
        size += len(line)
        if size >= SAVE_BLOCK:
            lines.append(b"")  # the newline after the last line
            yield head + b"\n".join(lines)
            head, lines, size = b"", [], 0
    if lines:
        lines.append(b"")
        yield head + b"\n".join(lines)
    elif head:
        yield head  # no rows: the file is its byte order mark


class RowReader:
    """Reads one dataset file in batches of rows; `done` / `total` bytes say how far it got.

    After the last batch, `digest` is the hash of the bytes read, `bom` whether they began with a
    byte order mark, and `json_list` whether the file was a JSON list (a .json file) rather than
    JSON lines. Raises OSError, or ValueError for a .json file that is not a list of records.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = 0
        self.total = 0
        self.digest: str | None = None
        self.bom = False
        self.json_list = False

    def batches(self) -> Iterator[list[Row]]:
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return  # a missing file is an empty dataset
        hasher = hashlib.sha256()
        with fh:
            self.total = max(self.path.stat().st_size, 1)
            head = fh.read(FIRST_READ)
            self.done = len(head)
            hasher.update(head)
            self.bom = head.startswith(BOM)
            if self.bom:
                head = head[len(BOM) :]
            if self.path.suffix.lower() == ".json" and head.lstrip()[:1] == b"[":
                self.json_list = True
                yield from self._json_list(head, fh, hasher)
                return
            pending, number = head, 0
            while True:
                lines = pending.split(b"\n")
                pending = lines.pop()  # cut short by the chunk's end (or the last line, unended)
                rows = [row_from_line(line, number + i) for i, line in enumerate(lines, 1) if line.strip()]
                number += len(lines)
                if rows:
                    yield rows
                chunk = fh.read(READ_CHUNK)
                if not chunk:
                    break
                self.done += len(chunk)
                hasher.update(chunk)
                pending += chunk
            if pending.strip():
                yield [row_from_line(pending, number + 1)]
        self.digest = hasher.hexdigest()

    def _json_list(self, head: bytes, fh: Any, hasher: Any) -> Iterator[list[Row]]:
        rest = fh.read()
        hasher.update(rest)
        self.digest = hasher.hexdigest()
        document = orjson.loads(head + rest)  # a broken .json file raises: nothing to edit safely
        if not isinstance(document, list):
            raise ValueError(f"{self.path}: expected a JSON list of records")
        self.done = self.total
        for start in range(0, len(document), JSON_LIST_BATCH):
            batch = document[start : start + JSON_LIST_BATCH]
            yield [Row.from_record(r, start + i + 1) for i, r in enumerate(batch)]
