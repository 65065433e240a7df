"""JSON and JSONL dataset files: their records, each with the line or index it came from.

Parsed with orjson rather than `datasets` so that a problem names its exact line. A record comes
back as it is, or as an InvalidRecord saying why it cannot be read; a file that cannot be read at
all (not UTF-8, not JSON, too large, not a regular file) raises DataError. Checking each record
is engine/core/data.py's part.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from .data_sources import READ_COMPRESSED, json_file_suffix
from .errors import DataError
from .limits import MAX_DATASET_BYTES, gib
from .record_formats import (
    FORMAT_KEYS,
    InvalidRecord,
    UnreadableRecord,
    in_format_case,
    kind_of,
)

# A single record larger than this is almost always a mistake (a whole file on one line, a
# pasted binary); refusing it keeps the tokeniser and the TUI responsive.
MAX_RECORD_BYTES = 16 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"


def records(path: Path) -> Iterator[tuple[str, Any]]:
    """(source, record or InvalidRecord) for each record of the JSON or JSONL file at `path`."""
    return _records(path, _read_bytes(path))


def _read_bytes(path: Path) -> bytes:
    """The bytes of a JSON file that exists (data_sources says what is wrong with a missing path
    or a folder)."""
    try:
        raw = _read_regular_file(path)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}", hint="check the file's permissions") from None
    compression = READ_COMPRESSED.get(path.suffix.lower())
    if compression:
        raw = _decompressed(path, raw, compression)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or _utf16_without_bom(raw):
        raise DataError(f"{path} is UTF-16 text", hint="save it as UTF-8 (most editors: Save with Encoding)")
    return raw[len(_BOM) :] if raw.startswith(_BOM) else raw


def _decompressed(path: Path, raw: bytes, module: str) -> bytes:
    """The JSON inside a compressed file, read up to MAX_DATASET_BYTES (a small file may hold a
    great deal)."""
    import importlib
    import io
    import lzma

    opener = importlib.import_module(module).open
    try:
        with opener(io.BytesIO(raw), "rb") as inner:
            data = inner.read(MAX_DATASET_BYTES + 1)
    except (OSError, EOFError, lzma.LZMAError) as exc:  # gzip's BadGzipFile and bz2's are OSErrors
        raise DataError(
            f"{path} cannot be decompressed: {exc}",
            hint="check that it is whole, or decompress it yourself and name the file that comes out",
        ) from None
    if len(data) > MAX_DATASET_BYTES:
        raise _too_large(path, len(data))
    return data


def _utf16_without_bom(raw: bytes) -> bool:
    """JSON in UTF-16 written without its byte-order mark: its first characters are ASCII ({, [,
    quotes, spaces), so every other byte of them is zero. UTF-8 JSON holds no zero bytes there."""
    even, odd = raw[:64:2], raw[1:64:2]
    return len(odd) >= 2 and (any(even) != any(odd))  # not a file of zeros (a write cut short)


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
    if not _first_byte(raw):
        return  # empty or blank: no records, which data.py says as such (not as "bad JSON")
    if _spread_over_lines(raw):
        yield from _document_records(path, raw)
    elif json_file_suffix(path) == ".jsonl":
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
    if wraps or in_format_case(document)[1] is None:
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
            if text.startswith("\0"):  # what a disk leaves where a write was cut short (a crash, a full disk)
                yield (
                    source,
                    UnreadableRecord("NUL bytes where a record goes: was the file cut off while written?"),
                )
                continue
            yield source, UnreadableRecord(f"bad JSON at column {exc.colno}: {exc.msg}")
