"""The dataset being edited: its rows, undo history, an edit journal, and safe saving.

Rows keep the record exactly as it was in the file (alpaca, sharegpt or messages), not the
normalised conversation, so saving never rewrites a person's format. A line that is not valid
JSON is kept as its text and must be fixed or deleted before the file can be saved: dropping it
silently would lose something the person made.

Nothing made is lost:
- Saves are atomic (temporary file, fsync, rename: files.atomic_write_bytes). The first save after
  loading, and a save that overwrites someone else's change, keep the version being replaced
  as `<name>.jsonl.bak`; later autosaves of the same session leave that .bak alone, so it holds
  the file as it was before this session's edits rather than as it was a second ago.
- Every edit is appended to a journal (`.<name>.jsonl.journal` beside the file, fsynced) before
  it is shown, and the journal is deleted once a save has landed. After a crash, or a quit while
  a save was impossible (a row that is not JSON, a conflict), `recover()` replays it: at most the
  sample still open in the editor is lost.
- A file changed on disk by something else since it was loaded or saved (content hash, checked
  cheaply by stat first) is never overwritten without asking (ConflictError), and a journal
  whose file changed under it is set aside under a visible name rather than replayed onto the
  wrong rows.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from tunebench.engine.core.files import atomic_write_bytes, fsync_dir

from .dataset_file import Row, RowReader, file_blocks
from .write_access import read_only_reason

__all__ = [
    "ConflictError",
    "DatasetStore",
    "ReadOnlyFileError",
    "Recovery",
    "Row",
    "UnsavableError",
    "digest",
]
UNDO_LIMIT = 200
_MARKS = ("saving", "saved")  # journal entries about saves, not edits


class ConflictError(Exception):
    """The file changed on disk since it was loaded or saved: saving would overwrite that."""


class UnsavableError(Exception):
    """Rows that cannot be written yet (text that is not JSON); the message names them."""


class ReadOnlyFileError(UnsavableError):
    """The file is read-only (its mode allows no writing): the edits wait in the journal."""


def digest(path: Path) -> str | None:
    """The file's content hash (None when absent): touching a file is not changing it."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _stat_key(path: Path) -> tuple[int, ...] | None:
    """What changes whenever the file's bytes may have: inode, size, mtime and ctime (which no
    tool can set back, unlike an mtime restored by `cp -p` or `rsync -t`)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class PendingSave:
    """A save begun: the rows as they were then, to be written by write_save() in any thread."""

    mark: str  # names its "saving" entry in the journal
    rows: list[Row]
    bom: bool
    force: bool  # overwrite a version changed on disk (theirs is kept as .bak)
    edits: int  # DatasetStore.edits when it began


@dataclass(frozen=True)
class Recovery:
    """What recover() found: edits replayed from the journal, or a journal set aside."""

    replayed: int = 0
    set_aside: Path | None = None
    reason: str = ""


class DatasetStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[Row] = []
        self.dirty = False
        # (what, the row index it touched, the rows before it): undo restores and points there
        self.undo_stack: list[tuple[str, int, list[Row]]] = []
        self.disk_digest: str | None = None  # save_path's content when last read or written
        self._disk_key: tuple[int, ...] | None = None  # save_path's stat when disk_digest was taken
        self.load_note = ""  # e.g. "a .json file: saves go to name.jsonl"
        self._backed_up = False  # whether this session has kept a .bak yet
        self._journal_open = False  # whether the journal on disk belongs to the rows in memory
        self._replaying = False
        self.journal_error = ""  # why the journal cannot be written (edits then live in memory only)
        self._journal_lock = threading.Lock()  # a background save marks the journal too
        self._write_lock = threading.Lock()  # saves write one at a time
        self.edits = 0  # edits made so far: a save that began before the last one leaves it unsaved
        self.loading = False  # between start_loading() and finish_loading(): rows still arriving
        self.bom = False  # the file began with a byte order mark; saves keep it

    # ---------------------------------------------------------------- files

    @property
    def save_path(self) -> Path:
        # A .json list is saved as JSON lines beside it: the engine reads both, and JSON lines
        # keep one record per line, so a problem names its line.
        return self.path.with_suffix(".jsonl") if self.path.suffix.lower() == ".json" else self.path

    @property
    def journal_path(self) -> Path:
        return self.save_path.with_name(f".{self.save_path.name}.journal")

    def load(self) -> None:
        """Read the whole file (a missing file is an empty dataset); raises OSError / ValueError.

        A journal left by an earlier session is not replayed here: call recover() next.
        """
        reader = self.start_loading()
        for batch in reader.batches():
            self.rows.extend(batch)
        self.finish_loading(reader)

    def start_loading(self) -> RowReader:
        """Forget the rows; the reader's batches (read in any thread) go to `rows` in order,
        then finish_loading(reader). Meanwhile `loading` is set and nothing may be edited."""
        self.rows, self.undo_stack, self.dirty, self.load_note = [], [], False, ""
        self._backed_up = self._journal_open = False
        self.loading = True
        # For a .json file the .jsonl beside it is expected absent; one that exists is a conflict.
        self.disk_digest, self._disk_key = None, _stat_key(self.save_path)
        return RowReader(self.path)

    def finish_loading(self, reader: RowReader) -> None:
        self.loading = False
        self.bom = reader.bom
        if self.save_path == self.path:
            self.disk_digest = reader.digest
        if reader.json_list:
            self.load_note = f"saves go to {self.save_path.name} (one record per line)"

    def changed_on_disk(self) -> bool:
        """True when the file on disk is no longer what was loaded or last saved.

        Cheap enough to poll: the content is hashed again only when the file's stat changed.
        """
        key = _stat_key(self.save_path)
        if key == self._disk_key:
            return False
        if digest(self.save_path) != self.disk_digest:
            return True
        self._disk_key = key  # touched, or rewritten with the same bytes
        return False

    def save(self, *, force: bool = False) -> Path:
        """Write every row atomically, now; see begin_save() and write_save() for what it raises."""
        pending = self.begin_save(force=force)
        self.write_save(pending)
        return self.finish_save(pending)

    def begin_save(self, *, force: bool = False) -> PendingSave:
        """Take the rows to save, as they are: write_save() may then run in another thread while
        edits go on, and finish_save() back here says which edits the save holds.

        Raises UnsavableError while a row is not JSON, ReadOnlyFileError while the file is
        read-only (the atomic rename would replace it regardless).
        """
        broken = [i + 1 for i, row in enumerate(self.rows) if not row.valid_json]
        if broken:
            listed = ", ".join(map(str, broken[:5])) + (" …" if len(broken) > 5 else "")
            raise UnsavableError(f"row(s) {listed} are not valid JSON: fix (enter) or delete (d) them first")
        if read_only := read_only_reason(self.save_path):
            raise ReadOnlyFileError(read_only)
        mark = secrets.token_hex(4)
        # Edits journalled after this mark are not in the save: recover() replays them onto it.
        self._log({"op": "saving", "save": mark})
        return PendingSave(mark, list(self.rows), self.bom, force, self.edits)

    def write_save(self, pending: PendingSave) -> Path:
        """Write the rows begin_save() took, atomically (any thread; one write at a time, in the
        order they began). The first save of a session keeps the file it replaces as .bak, and
        so does a forced one (it replaces someone else's version).

        Raises ConflictError when the file changed on disk (unless forced), OSError when it
        cannot be written: either way the file is left as it was.
        """
        with self._write_lock:
            if not pending.force and self.changed_on_disk():
                raise ConflictError(f"{self.save_path} changed on disk since it was loaded")
            target = self.save_path
            hasher = hashlib.sha256()

            def hashed(blocks: Iterator[bytes]) -> Iterator[bytes]:
                for block in blocks:
                    hasher.update(block)  # while the block is in the cache, the GIL released
                    yield block

            def landing() -> None:
                # Should we crash between the rename and the journal's removal, recover() sees
                # the file holds this digest and knows which of the journal's edits are in it.
                self._log({"op": "saved", "save": pending.mark, "digest": hasher.hexdigest()})

            target.parent.mkdir(parents=True, exist_ok=True)
            keep_backup = pending.force or not self._backed_up
            atomic_write_bytes(
                target,
                hashed(file_blocks(pending.rows, pending.bom)),
                keep_backup=keep_backup,
                sync_dir=True,
                before_replace=landing,
            )
            self._backed_up = True
            self.disk_digest, self._disk_key = hasher.hexdigest(), _stat_key(target)
        return target

    def finish_save(self, pending: PendingSave) -> Path:
        """The save landed (call from the thread that edits)."""
        if self.edits == pending.edits:  # nothing edited while it was written: all of it is saved
            self.dirty = False
            self.discard_journal()
        return self.save_path

    # ---------------------------------------------------------------- journal

    def _log(self, op: dict[str, Any]) -> None:
        """Append one edit to the journal and fsync it; an edit reaches the screen only after."""
        if self._replaying:
            return
        with self._journal_lock:
            self._append(op)

    def _append(self, op: dict[str, Any]) -> None:
        lines = b""
        if not self._journal_open:
            if self.journal_path.exists():  # an earlier session's, never recovered: keep it apart
                self._set_aside("it was not recovered before new edits began")
            lines = (
                orjson.dumps({"journal": 1, "file": self.save_path.name, "base": self.disk_digest}) + b"\n"
            )
        lines += orjson.dumps(op) + b"\n"
        try:
            created = not self.journal_path.exists()
            with open(self.journal_path, "ab") as fh:
                fh.write(lines)
                fh.flush()
                os.fsync(fh.fileno())
            if created:
                fsync_dir(self.journal_path.parent)
        except OSError as exc:
            self.journal_error = f"cannot write {self.journal_path.name}: {exc.strerror or exc}"
            return
        self._journal_open, self.journal_error = True, ""

    def discard_journal(self) -> None:
        """Forget the journal (after a save landed, or when the person drops their edits)."""
        with self._journal_lock:
            self.journal_path.unlink(missing_ok=True)
            self._journal_open = False

    def recover(self) -> Recovery | None:
        """Replay the edits an earlier session journaled but never saved; call right after load().

        Replayed only onto the very file they were made on (the journal records its hash); if
        that file has changed since, the journal is renamed to a visible
        `<name>.jsonl.unsaved-<time>.journal` and said so: never applied to the wrong rows.
        """
        try:
            raw = self.journal_path.read_bytes()
        except OSError:
            return None
        entries = []
        for line in raw.splitlines():
            try:
                entries.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                break  # the crash cut the last append short: everything before it stands
        header, ops = (entries[0], entries[1:]) if entries and "journal" in entries[0] else ({}, [])
        if not header:
            return self._set_aside("it is not a journal TuneBench can read")
        if not any(op.get("op") not in _MARKS for op in ops):  # nothing was ever edited
            self.discard_journal()
            return None
        if header.get("base") != self.disk_digest:
            # A save landed after those edits began: replay only the edits made after it began.
            landed = _landed_save(ops, self.disk_digest)
            if landed is None:
                return self._set_aside(f"{self.save_path.name} changed on disk after those edits were made")
            ops = ops[landed + 1 :]
        edits = [op for op in ops if op.get("op") not in _MARKS]
        if not edits:  # all of it is saved: nothing to keep
            self.discard_journal()
            return None
        self._replaying = True
        try:
            for op in edits:
                self._apply(op)
        except (KeyError, IndexError, TypeError, ValueError):
            self._replaying = False
            self.load()  # back to the file as it is, untouched by a half-applied journal
            return self._set_aside("its edits do not fit the file")
        finally:
            self._replaying = False
        self._journal_open = True  # later edits append to it: same base, same file
        return Recovery(replayed=len(edits))

    def _apply(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "insert":
            self.insert(op["at"], Row.from_text(op["text"]))
        elif kind == "replace":
            self.replace(_index(op["at"], self.rows), Row.from_text(op["text"]))
        elif kind == "duplicate":
            self.duplicate(_index(op["at"], self.rows))
        elif kind == "delete":
            self.delete(_index(op["at"], self.rows))
        elif kind == "undo":
            self.undo()
        else:
            raise ValueError(kind)

    def _set_aside(self, reason: str) -> Recovery:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        target = self.save_path.with_name(f"{self.save_path.name}.unsaved-{stamp}.journal")
        os.replace(self.journal_path, target)
        self._journal_open = False
        return Recovery(set_aside=target, reason=reason)

    # ---------------------------------------------------------------- edits

    def _remember(self, what: str, index: int) -> None:
        self.undo_stack.append((what, index, list(self.rows)))
        del self.undo_stack[:-UNDO_LIMIT]
        self.dirty = True
        self.edits += 1

    def insert(self, index: int, row: Row) -> int:
        index = max(0, min(index, len(self.rows)))
        self._log({"op": "insert", "at": index, "text": row.text})
        self._remember("add", index)
        self.rows.insert(index, row)
        return index

    def replace(self, index: int, row: Row) -> None:
        _index(index, self.rows)
        self._log({"op": "replace", "at": index, "text": row.text})
        self._remember("edit", index)
        self.rows[index] = replace(row, key=self.rows[index].key, line=self.rows[index].line)

    def duplicate(self, index: int) -> int:
        _index(index, self.rows)
        self._log({"op": "duplicate", "at": index})
        self._remember("duplicate", index)
        source = self.rows[index]
        self.rows.insert(index + 1, Row(source.text, source.record, source.error, raw=source.raw))
        return index + 1

    def delete(self, index: int) -> Row:
        _index(index, self.rows)
        self._log({"op": "delete", "at": index})
        self._remember("delete", index)
        return self.rows.pop(index)

    def undo(self) -> tuple[str, int] | None:
        """Undo the last edit; returns (what was undone, the row it touched), or None."""
        if not self.undo_stack:
            return None
        self._log({"op": "undo"})
        what, index, rows = self.undo_stack.pop()
        self.rows = rows
        self.dirty = True
        self.edits += 1
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


def _landed_save(ops: list[dict[str, Any]], disk_digest: str | None) -> int | None:
    """Where, among a journal's entries, the save that wrote the file now on disk began."""
    began = {op.get("save"): i for i, op in enumerate(ops) if op.get("op") == "saving"}
    for i in reversed(range(len(ops))):
        op = ops[i]
        if op.get("digest") != disk_digest or disk_digest is None:
            continue
        if op.get("op") == "saving":  # a journal from before saves ran in the background
            return i
        if op.get("op") == "saved" and op.get("save") in began:
            return began[op["save"]]
    return None


def _index(index: int, rows: list[Row]) -> int:
    """A row index that exists (negative ones too would silently pick from the end)."""
    if not 0 <= index < len(rows):
        raise IndexError(f"row {index} does not exist ({len(rows)} rows)")
    return index


NEW_RECORDS: dict[str, dict[str, Any]] = {
    "messages": {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]},
    "conversations": {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": ""}]},
    "alpaca": {"instruction": "", "input": "", "output": ""},
}
