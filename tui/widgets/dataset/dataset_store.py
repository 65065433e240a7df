"""The dataset being edited: its rows, undo history, and safe saving.

Rows keep the record exactly as it was in the file (alpaca, sharegpt or messages), not the
normalised conversation, so saving never rewrites a person's format. A line that is not valid
JSON is kept as its text and must be fixed or deleted before the file can be saved: dropping it
silently would lose something the person made. Saves go through data.save_jsonl (atomic, with
the previous version kept as .bak), and a file changed on disk by something else since it was
loaded is never overwritten without asking.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
from tunebench.engine.data import save_jsonl

_BOM = b"\xef\xbb\xbf"
_row_ids = itertools.count(1)
UNDO_LIMIT = 200


@dataclass(frozen=True)
class Row:
    """One record; `record` is None when its text is not a JSON value (then `error` says why)."""

    text: str
    record: Any = None
    error: str = ""
    line: int = 0  # line number in the file as loaded (0 for rows added since)
    key: str = field(default_factory=lambda: f"row-{next(_row_ids)}")

    @classmethod
    def from_record(cls, record: Any, line: int = 0) -> Row:
        return cls(orjson.dumps(record).decode(), record, "", line)

    @classmethod
    def from_text(cls, text: str, line: int = 0) -> Row:
        try:
            return cls(text, orjson.loads(text), "", line)
        except orjson.JSONDecodeError as exc:
            return cls(text, None, f"not valid JSON (column {exc.colno}): {exc.msg}", line)

    @property
    def valid_json(self) -> bool:
        return not self.error

    def dedupe_key(self) -> bytes:
        if self.record is None:
            return self.text.encode()
        return orjson.dumps(self.record, option=orjson.OPT_SORT_KEYS)


class ConflictError(Exception):
    """The file changed on disk since it was loaded or saved: saving would overwrite that."""


class UnsavableError(Exception):
    """Rows that cannot be written yet (text that is not JSON); the message names them."""


def digest(path: Path) -> str | None:
    """The file's content hash (None when absent): touching a file is not changing it."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class DatasetStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[Row] = []
        self.dirty = False
        # (what, the row index it touched, the rows before it): undo restores and points there
        self.undo_stack: list[tuple[str, int, list[Row]]] = []
        self.disk_digest: str | None = None  # save_path's content when last read or written
        self.load_note = ""  # e.g. "a .json file: saves go to name.jsonl"

    # ---------------------------------------------------------------- files

    @property
    def save_path(self) -> Path:
        # A .json list is saved as JSON lines beside it: the engine reads both, and JSON lines
        # keep one record per line, so a problem names its line.
        return self.path.with_suffix(".jsonl") if self.path.suffix.lower() == ".json" else self.path

    def load(self) -> None:
        """Read the file (a missing file is an empty dataset); raises OSError / ValueError."""
        self.rows, self.undo_stack, self.dirty, self.load_note = [], [], False, ""
        # For a .json file the .jsonl beside it is expected absent; one that exists is a conflict.
        self.disk_digest = None
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        if self.save_path == self.path:
            self.disk_digest = hashlib.sha256(raw).hexdigest()
        if raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        if self.path.suffix.lower() == ".json" and raw.lstrip()[:1] == b"[":
            document = orjson.loads(raw)  # a broken .json file raises: nothing to edit safely
            if not isinstance(document, list):
                raise ValueError(f"{self.path}: expected a JSON list of records")
            self.rows = [Row.from_record(r, i + 1) for i, r in enumerate(document)]
            self.load_note = f"saves go to {self.save_path.name} (one record per line)"
            return
        for number, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                text = line.decode("utf-8", errors="replace")
                self.rows.append(
                    Row(
                        text, None, f"bytes that are not UTF-8 at byte {exc.start + 1}: fix or delete", number
                    )
                )
                continue
            self.rows.append(Row.from_text(text.strip(), number))

    def changed_on_disk(self) -> bool:
        """True when the file on disk is no longer what was loaded or last saved."""
        return digest(self.save_path) != self.disk_digest

    def save(self, *, force: bool = False) -> Path:
        """Write every row atomically, keeping the previous file as .bak.

        Raises ConflictError when the file changed on disk (unless force), and UnsavableError
        while a row is not JSON.
        """
        broken = [i + 1 for i, row in enumerate(self.rows) if not row.valid_json]
        if broken:
            listed = ", ".join(map(str, broken[:5])) + (" …" if len(broken) > 5 else "")
            raise UnsavableError(f"row(s) {listed} are not valid JSON: fix (enter) or delete (d) them first")
        if not force and self.changed_on_disk():
            raise ConflictError(f"{self.save_path} changed on disk since it was loaded")
        target = self.save_path
        target.parent.mkdir(parents=True, exist_ok=True)
        save_jsonl(target, [row.record for row in self.rows], keep_backup=True)
        self.disk_digest = digest(target)
        self.dirty = False
        return target

    # ---------------------------------------------------------------- edits

    def _remember(self, what: str, index: int) -> None:
        self.undo_stack.append((what, index, list(self.rows)))
        del self.undo_stack[:-UNDO_LIMIT]
        self.dirty = True

    def insert(self, index: int, row: Row) -> int:
        index = max(0, min(index, len(self.rows)))
        self._remember("add", index)
        self.rows.insert(index, row)
        return index

    def replace(self, index: int, row: Row) -> None:
        self._remember("edit", index)
        self.rows[index] = replace(row, key=self.rows[index].key, line=self.rows[index].line)

    def duplicate(self, index: int) -> int:
        self._remember("duplicate", index)
        source = self.rows[index]
        self.rows.insert(index + 1, Row(source.text, source.record, source.error))
        return index + 1

    def delete(self, index: int) -> Row:
        self._remember("delete", index)
        return self.rows.pop(index)

    def undo(self) -> tuple[str, int] | None:
        """Undo the last edit; returns (what was undone, the row it touched), or None."""
        if not self.undo_stack:
            return None
        what, index, rows = self.undo_stack.pop()
        self.rows = rows
        self.dirty = True
        return what, min(index, len(rows) - 1)

    def index_of(self, key: str) -> int:
        return next(i for i, row in enumerate(self.rows) if row.key == key)

    def duplicates(self) -> Counter[bytes]:
        return Counter(row.dedupe_key() for row in self.rows)

    def majority_format(self) -> str:
        """ "messages", "conversations" or "alpaca": what a new sample should look like."""
        kinds = Counter(
            "messages"
            if "messages" in row.record
            else "conversations"
            if "conversations" in row.record
            else "alpaca"
            for row in self.rows
            if isinstance(row.record, dict)
        )
        return kinds.most_common(1)[0][0] if kinds else "messages"


NEW_RECORDS: dict[str, dict[str, Any]] = {
    "messages": {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]},
    "conversations": {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": ""}]},
    "alpaca": {"instruction": "", "input": "", "output": ""},
}
