"""Training data: read JSON / JSONL conversations, check every record, mix, split and save them.

Every record becomes a Sample of checked messages (engine/core/record_formats.py: the formats
and their checks), or a RecordProblem that says which file, line or index, and why. Turning
samples into token ids and loss masks is engine/core/encoding.py's part.

JSON files are parsed with orjson rather than `datasets` so a problem can name its exact line;
other file types, save_to_disk folders and cached hub ids come through engine/core/data_sources.py.
Records of kinds this build does not train (KTO, DPO/ORPO, multimodal, plain pretraining text) are
refused by name. This module imports neither torch nor transformers: the TUI imports it to check
rows as they are typed.
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from . import data_sources
from .errors import DataUserError, raise_if_cancelled
from .files import atomic_write_bytes
from .limits import MAX_DATASET_BYTES, MAX_SAMPLES, gib
from .model_files import looks_like_hub_id
from .record_formats import (
    FORMAT_KEYS,
    InvalidRecord,
    Message,
    UnreadableRecord,
    kind_of,
    normalise_record,
    record_format,
    record_tools,
)

EXTENSIONS = data_sources.JSON_EXTENSIONS  # read here; every other source through data_sources
# A single record larger than this is almost always a mistake (a whole file on one line, a
# pasted binary); refusing it keeps the tokeniser and the TUI responsive.
MAX_RECORD_BYTES = 16 * 1024 * 1024
_SHOWN_PROBLEMS = 10
_BOM = b"\xef\xbb\xbf"

_PLACEHOLDER = re.compile(r"\{\{\s*(name|author)\s*\}\}", re.IGNORECASE)
# CJK Unified Ideographs, Extension A and the compatibility block: enough to tell Chinese text.
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

# ===================================================================== types


@dataclass(frozen=True)
class RecordProblem:
    """One record that will not be trained on: where it is ("file.jsonl:12", "file.json[3]") and why.

    `kind` is "record" for a readable record that is not a usable sample (skipped, as ms-swift
    skips rows its preprocessor rejects), "unreadable" for a line that is not JSON or not UTF-8,
    "untrained" for data of a kind this build does not train (UntrainedKind), and "empty" for a
    file with no records at all; load_dataset refuses a file with any of the last three, since a
    broken file, or one meant for another kind of training, is not something to train on part of.
    """

    source: str
    reason: str
    kind: str = field(default="record", compare=False)

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class DataError(DataUserError, ValueError):
    """The whole load failed (no file, unreadable file, no valid sample); `problems` says where."""

    def __init__(self, message: str, problems: Sequence[RecordProblem] = (), hint: str = ""):
        self.problems = list(problems)
        super().__init__(message, hint)

    def __str__(self) -> str:
        lines = [self.message]
        lines += [f"  {p}" for p in self.problems[:_SHOWN_PROBLEMS]]
        if len(self.problems) > _SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - _SHOWN_PROBLEMS} more")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


@dataclass
class Sample:
    """One conversation ready to train on; `source` is where it came from, for messages, and
    `tools` the functions its prompt offers (engine/core/tool_calls.py's form), if any."""

    messages: list[Message]
    source: str
    tools: list[dict] | None = None


# ============================================================= dataset specs


class DatasetSpec(NamedTuple):
    """A dataset as --dataset names it: the file, and how many samples to take (None: all)."""

    path: Path
    samples: int | None  # not `count`: a tuple's count() would be shadowed

    def __str__(self) -> str:
        return str(self.path) if self.samples is None else f"{self.path}#{self.samples}"


def parse_dataset_spec(spec: str, root: str | Path | None = None) -> DatasetSpec:
    """Split "path#N" into the file and the number of samples to take (None: all of them).

    A relative path is taken from `root` (the workspace) when given, else from the current folder;
    `~` is the home folder. A '#' that is part of an existing file's name is not a sample count.
    DataError says what is wrong with a spec that is neither.
    """
    text = spec.strip()
    if not text:
        raise DataError(
            "empty dataset name",
            hint="give a data file (.jsonl, .json, .csv, .parquet, ...), a folder written by "
            "save_to_disk, or a cached hub id, optionally as name#N",
        )
    whole = _dataset_path(text, root)
    head, sep, tail = text.rpartition("#")
    if not sep or whole.is_file():
        return DatasetSpec(whole, None)
    if not head.strip():
        raise DataError(f"dataset {spec!r} has no file name before '#'", hint="write it as path#N")
    digits = tail.strip()
    if not (digits.isascii() and digits.isdigit()) or int(digits) == 0:
        raise DataError(
            f"dataset {spec!r}: {tail!r} after '#' is not a positive whole number",
            hint=f"write {head}#N with N the number of samples to take (1 or more), or drop the #",
        )
    if int(digits) > MAX_SAMPLES:
        raise DataError(
            f"dataset {spec!r} asks for {int(digits):,} samples; one run takes at most {MAX_SAMPLES:,}",
            hint=f"write {head.strip()}#N with N up to {MAX_SAMPLES:,}, or raise --num_train_epochs instead",
        )
    return DatasetSpec(_dataset_path(head.strip(), root), int(digits))


def resolve_dataset_spec(spec: str, root: str | Path) -> str:
    """The spec with its file made absolute against `root` (the workspace), for a process whose
    current folder is elsewhere. A spec that does not parse keeps what follows its '#' as typed,
    so loading it says what is wrong with it, naming the file as the command line would."""
    try:
        return str(parse_dataset_spec(spec, root))
    except DataError:
        head, sep, tail = spec.strip().rpartition("#")
        return f"{_dataset_path(head.strip(), root)}#{tail}" if sep and head.strip() else spec


def _dataset_path(text: str, root: str | Path | None) -> Path:
    """`text` as a path from `root`; a hub id (owner/name) not found there is kept as typed, to
    be looked up in the local caches when read."""
    path = Path(text).expanduser()
    if root is None or path.is_absolute():
        return path
    rooted = Path(root) / path
    return path if looks_like_hub_id(text) and not rooted.exists() else rooted


# ================================================================== reading


def read_records(path: Path, cancel: Any = None) -> tuple[list[Sample], list[RecordProblem]]:
    """Read one dataset; bad records come back as problems, a bad source raises DataError.

    A .json / .jsonl file is read here, so a problem names its line; anything else (other file
    types, save_to_disk folders, cached hub ids) through engine/core/data_sources.py.
    Placeholders are left as they are here; load_dataset fills them. Once `cancel` (a
    threading.Event) is set, errors.Cancelled stops the reading between records.
    """
    path = Path(path)
    is_json_file = path.suffix.lower() in EXTENSIONS and path.exists() and not path.is_dir()
    if is_json_file and data_sources.saved_dataset_folder(path) is None:
        rows = _records(path, _read_bytes(path))
    else:
        rows = _source_records(path)
    samples: list[Sample] = []
    problems: list[RecordProblem] = []
    for source, record in rows:
        raise_if_cancelled(cancel)
        if len(samples) + len(problems) >= MAX_SAMPLES:
            raise _too_many_samples(str(path))
        try:
            if isinstance(record, InvalidRecord):
                raise record
            samples.append(Sample(normalise_record(record), source, record_tools(record) or None))
        except InvalidRecord as exc:
            problems.append(RecordProblem(source, str(exc), exc.kind))
    if not samples and not problems:
        problems.append(RecordProblem(str(path), "the file holds no records", "empty"))
    return samples, problems


def _source_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        yield from data_sources.records(path)
    except data_sources.SourceError as exc:
        raise DataError(exc.message, hint=exc.hint) from None


def _read_bytes(path: Path) -> bytes:
    """The bytes of a JSON file that exists (data_sources says what is wrong with a missing path
    or a folder)."""
    try:
        raw = _read_regular_file(path)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}", hint="check the file's permissions") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} is UTF-16 text", hint="save it as UTF-8 (most editors: Save with Encoding)")
    return raw[len(_BOM) :] if raw.startswith(_BOM) else raw


def _read_regular_file(path: Path) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_DATASET_BYTES: a FIFO would block
    the reader forever and a device such as /dev/zero never ends (through a symlink as well)."""
    # O_NONBLOCK: opening a FIFO would otherwise wait for a writer; a regular file ignores it.
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DataError(
                f"{path} is {_file_kind(info.st_mode)}, not a regular file",
                hint="name a .jsonl or .json file saved on disk (copy the data into one first)",
            )
        if info.st_size > MAX_DATASET_BYTES:
            raise _too_large(path, info.st_size)
        raw = fh.read(MAX_DATASET_BYTES + 1)  # the file may have grown since fstat
    if len(raw) > MAX_DATASET_BYTES:
        raise _too_large(path, len(raw))
    return raw


def _too_large(path: Path, size: int) -> DataError:
    return DataError(
        f"{path} is {gib(size)}; dataset files over {gib(MAX_DATASET_BYTES)} are not read",
        hint="split it into several files and pass each to --dataset, or keep the part you need",
    )


def _too_many_samples(where: str) -> DataError:
    return DataError(
        f"{where} holds more than {MAX_SAMPLES:,} samples, the most one run takes",
        hint="train on a part of it (split the file, or take fewer with path#N)",
    )


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((word for test, word in kinds if test(mode)), "not a plain file")


def _records(path: Path, raw: bytes) -> Iterator[tuple[str, Any]]:
    """(source, record or InvalidRecord) for each record in the file, in order.

    The extension decides, except that a file holding another layout is read as what it is: a
    .json with one object per line, and JSON spread over lines (pretty-printed: a list, one
    object, or objects one after another as `jq` writes them) in a .jsonl too.
    """
    if _spread_over_lines(raw):
        yield from _document_records(path, raw)
    elif path.suffix.lower() == ".jsonl":
        yield from _jsonl_records(path, raw)
    else:
        try:
            document = orjson.loads(_utf8(path, raw))
        except orjson.JSONDecodeError as exc:
            if _first_byte(raw) == b"{":  # one object per line
                yield from _jsonl_records(path, raw)
                return
            raise _bad_json(path, exc) from None
        yield from _listed_records(path, document)


def _spread_over_lines(raw: bytes) -> bool:
    """Whether the file is JSON spread over lines (a list, or a first record that goes on past
    its line): read line by line, each of its lines would be a "bad JSON" of its own."""
    first = _first_byte(raw)
    if first != b"{":
        return first == b"["
    start = raw.index(first)
    end = raw.find(b"\n", start)
    first_line = raw[start:end].rstrip() if end >= 0 else raw[start:]
    try:
        orjson.loads(first_line)
    except orjson.JSONDecodeError as exc:
        return exc.pos >= len(first_line)  # the line ended inside the object, not at a mistake
    return False


def _first_byte(raw: bytes) -> bytes:
    """The first byte that is not whitespace (b"" for none), without copying a large file."""
    found = re.search(rb"\S", raw)
    return found.group() if found else b""


def _document_records(path: Path, raw: bytes) -> Iterator[tuple[str, Any]]:
    text = _utf8(path, raw)
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as whole:
        try:
            values = _json_values(text)
        except json.JSONDecodeError as exc:
            # orjson names a mistake better ("trailing comma is not allowed"), unless all it saw
            # was a good first record with more after it: then the mistake is further on.
            past_first = whole.msg.startswith("unexpected content after document")
            raise _bad_json(path, exc if past_first else whole, spread="\n" in text.strip()) from None
        if len(values) > 1:
            for line, record in values:
                yield f"{path}:{line}", record
            return
        document = values[0][1]
    yield from _listed_records(path, document)


# The start of a JSON value: anything but the whitespace JSON allows between values, which
# json.JSONDecoder.raw_decode does not skip.
_NOT_JSON_SPACE = re.compile(r"[^ \t\n\r]")


def _json_values(text: str) -> list[tuple[int, Any]]:
    """(line where it starts, value) for each JSON value in `text`, one after another."""
    decoder = json.JSONDecoder()
    values: list[tuple[int, Any]] = []
    line, last, pos = 1, 0, 0
    while found := _NOT_JSON_SPACE.search(text, pos):
        line, last = line + text.count("\n", last, found.start()), found.start()
        value, pos = decoder.raw_decode(text, last)
        values.append((line, value))
    return values


def _bad_json(path: Path, exc: json.JSONDecodeError, spread: bool = False) -> DataError:
    """One error for a file read as one JSON document; `spread`: pretty-printed over lines,
    whose lines are no records of their own to report one by one."""
    hint = "fix the JSON there; a missing comma, quote or bracket is the usual cause"
    if spread:
        hint += (
            " (the file holds JSON spread over lines, pretty-printed, read as a whole; or write "
            "one complete record per line, as .jsonl)"
        )
    return DataError(f"{path}:{exc.lineno}: bad JSON at column {exc.colno}: {exc.msg}", hint=hint)


def _utf8(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: bytes that are not UTF-8 (0x{raw[exc.start]:02x})",
            hint="save the file as UTF-8",
        ) from None


def _listed_records(path: Path, document: Any) -> Iterator[tuple[str, Any]]:
    """The records of a file that is one JSON document: a list of them, or one record."""
    if isinstance(document, dict):
        document = [_lone_record(path, document)]
    if not isinstance(document, list):
        raise DataError(
            f"{path}: expected a JSON list of records, found {kind_of(document)}",
            hint="write the file as [{...}, {...}], or as .jsonl with one object per line",
        )
    for index, record in enumerate(document):
        yield f"{path}[{index}]", record


def _lone_record(path: Path, document: dict) -> dict:
    """A .json holding one object is a one-record file; an object wrapping the samples
    ({"data": [...]}) or holding anything but a record must not train as a single sample."""
    wraps = [
        key
        for key, value in document.items()
        if key not in FORMAT_KEYS | {"tools"}  # a record's own lists (of turns, of tools)
        and isinstance(value, list)
        and any(isinstance(item, dict) for item in value)
    ]
    if wraps or record_format(document) is None:
        keys = ", ".join(sorted(map(str, document))[:8]) or "none"
        raise DataError(
            f"{path}: expected a JSON list of records, found an object with keys: {keys}",
            hint='write the file as [{...}, {...}] (from a wrapper such as {"data": [...]}, keep '
            "only the list), or as .jsonl with one object per line",
        )
    return document


def _jsonl_records(path: Path, raw: bytes) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue  # blank lines separate nothing, but keep the line numbers true
        source = f"{path}:{lineno}"
        if line.startswith(_BOM):  # files joined with `cat` keep each one's BOM
            line = line[len(_BOM) :]
        if len(line) > MAX_RECORD_BYTES:
            yield (
                source,
                InvalidRecord(
                    f"record is {len(line) / 2**20:.0f} MiB; records over {MAX_RECORD_BYTES // 2**20} MiB "
                    "are not read (is the whole file on one line?)"
                ),
            )
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield (
                source,
                UnreadableRecord(
                    f"bytes that are not UTF-8 at byte {exc.start + 1} (0x{line[exc.start]:02x}): "
                    "save the file as UTF-8"
                ),
            )
            continue
        try:
            yield source, orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            yield source, UnreadableRecord(f"bad JSON at column {exc.colno}: {exc.msg}")


# ==================================================== placeholders, mixing


def fill_placeholders(
    messages: list[Message],
    model_name: Sequence[str] = (),
    model_author: Sequence[str] = (),
    *,
    system: str = "",
) -> tuple[list[Message], list[str]]:
    """The messages as training sees them: `system` (the --system prompt) first where the record
    has no system message, and {{NAME}} / {{AUTHOR}} (any case) replaced; the reasons list is
    non-empty when one stays unfilled.

    With two values the first is for samples with Chinese text, the second for the rest. The
    record's user and assistant turns decide, not a system prompt (its own or --system): a Chinese
    default prompt must not give every English sample the Chinese name.
    """
    chinese = any(_CJK.search(m["content"]) for m in messages if m["role"] != "system")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    found = {m.group(1).lower() for msg in messages for m in _PLACEHOLDER.finditer(msg["content"])}
    if not found:
        return messages, []
    values = {"name": list(model_name), "author": list(model_author)}
    reasons = [
        f"uses {{{{{key.upper()}}}}} but no --model_{key} was given: pass --model_{key} "
        "(one value, or two: Chinese then English)"
        for key in ("name", "author")
        if key in found and not values[key]
    ]
    if reasons:
        return messages, reasons
    chosen = {key: (v[0] if len(v) == 1 or chinese else v[1]) for key, v in values.items() if v}
    filled = [
        {**m, "content": _PLACEHOLDER.sub(lambda match: chosen[match.group(1).lower()], m["content"])}
        for m in messages
    ]
    return filled, []


def load_dataset(
    specs: Sequence[str],
    *,
    system: str = "",
    model_name: Sequence[str] = (),
    model_author: Sequence[str] = (),
    seed: int = 42,
    cancel: Any = None,
) -> tuple[list[Sample], list[RecordProblem]]:
    """Read, check and mix datasets ("path" or "path#N"); DataError when no valid sample remains.
    Once `cancel` (a threading.Event) is set, errors.Cancelled stops it between records."""
    if not specs:
        raise DataError("no dataset given", hint="pass --dataset FILE.jsonl (or FILE.jsonl#N)")
    samples: list[Sample] = []
    problems: list[RecordProblem] = []
    unfilled: list[RecordProblem] = []
    read = 0
    for index, spec in enumerate(specs):
        path, count = parse_dataset_spec(spec)
        records, bad = read_records(path, cancel)
        _refuse_broken_file(path, bad)
        problems += bad
        read += len(records)
        ready = []
        for record in records:
            raise_if_cancelled(cancel)
            messages, reasons = fill_placeholders(record.messages, model_name, model_author, system=system)
            if reasons:
                unfilled.append(RecordProblem(record.source, "; ".join(reasons)))
            else:
                ready.append(Sample(messages, record.source, record.tools))
        if count is not None and ready:
            # One generator per file, so adding a dataset does not change what another one samples.
            ready = _take(ready, count, random.Random(f"{seed}:{index}"))
        samples += ready
        if len(samples) > MAX_SAMPLES:
            raise _too_many_samples(", ".join(specs))
    if unfilled:
        raise _unfilled_placeholders(unfilled, read, specs)
    if not samples:
        raise DataError(
            f"no valid training sample in {', '.join(specs)}",
            problems,
            hint="fix the records listed above (each line says where and why)",
        )
    return samples, problems


def _unfilled_placeholders(unfilled: list[RecordProblem], read: int, specs: Sequence[str]) -> DataError:
    """Refuse the whole load: skipping the records that use placeholders would train on what is
    left, usually the few that do not teach the identity the dataset is for."""
    flags = [flag for flag in ("--model_name", "--model_author") if any(flag in p.reason for p in unfilled)]
    return DataError(
        f"{len(unfilled)} of {read} records in {', '.join(specs)} use {{{{NAME}}}}/{{{{AUTHOR}}}} "
        f"placeholders, and {' and '.join(flags)} {'was' if len(flags) == 1 else 'were'} not given",
        unfilled,
        hint=f"pass {' and '.join(flags)} (one value, or two: Chinese then English) to fill them, "
        "or write the names into the records",
    )


def _refuse_broken_file(path: Path, problems: list[RecordProblem]) -> None:
    """A file with lines that are not JSON (or not UTF-8), with data of a kind this build does not
    train, or with no records, is not trained on in part: like `datasets` under ms-swift, the
    load fails and says where."""
    unreadable = [p for p in problems if p.kind == "unreadable"]
    if unreadable:
        lines = "a line that is" if len(unreadable) == 1 else f"{len(unreadable)} lines that are"
        raise DataError(
            f"{path} has {lines} not readable as JSON, so it was not used",
            unreadable,
            hint="fix or delete the line(s) listed (JSON lines: one complete {...} object per line); "
            "records that are valid JSON but not usable samples are only skipped",
        )
    untrained = [p for p in problems if p.kind == "untrained"]
    if untrained:
        raise DataError(
            f"{path} holds data of a kind this build does not train, so it was not used",
            untrained,
            hint="train it with the trainer named above, or convert it to supervised samples "
            "(a question and the answer to learn); records of other kinds are refused, never "
            "trained as answers",
        )
    if any(p.kind == "empty" for p in problems):
        raise DataError(
            f"no valid training sample in {path}: the file is empty",
            problems,
            hint="add samples (one JSON object per line), or leave the file out of --dataset",
        )


def _take(items: list[Sample], count: int, rng: random.Random) -> list[Sample]:
    """N samples as ms-swift takes them: whole copies of the file, then a random remainder."""
    copies, remainder = divmod(count, len(items))
    picked = items * copies
    if remainder:
        picked += [items[i] for i in rng.sample(range(len(items)), remainder)]
    return picked


def split_eval(samples: Sequence[Sample], val_ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out round(len * val_ratio) samples (at least one, and never all) for evaluation."""
    if val_ratio <= 0 or len(samples) < 2:
        return list(samples), []
    n_eval = min(len(samples) - 1, max(1, round(len(samples) * val_ratio)))
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [s for i, s in enumerate(samples) if i not in held]
    return train, [samples[i] for i in sorted(held)]


# ================================================================== saving


def jsonl_bytes(records: Sequence[Any]) -> bytes:
    """Records as the bytes of a JSON lines file (one compact object per line, UTF-8)."""
    return b"".join(orjson.dumps(record) + b"\n" for record in records)


def save_jsonl(path: str | Path, records: list[dict], keep_backup: bool = True) -> None:
    """Write records as JSON lines atomically: the file is either the old or the new one, never half.

    The previous version stays as `<name>.jsonl.bak` when keep_backup is set.
    """
    # Serialise first: a record that cannot be written must not cost the file on disk.
    atomic_write_bytes(path, jsonl_bytes(records), keep_backup=keep_backup, sync_dir=True)
