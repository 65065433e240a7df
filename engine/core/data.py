"""Training data: read JSON / JSONL conversations, check every record, mix, split and save them.

Every record becomes a Sample of checked messages (engine/core/record_formats.py: the formats
and their checks), or a RecordProblem that says which file, line or index, and why. Turning
samples into token ids and loss masks is engine/core/encoding.py's part.

JSON and JSONL files are read by engine/core/json_records.py (with orjson, so that a problem names
its line); other file types, save_to_disk folders and cached hub ids come through
engine/core/data_sources.py.
Records of kinds this build does not train (KTO, DPO/ORPO, multimodal, plain pretraining text) are
refused by name. This module imports neither torch nor transformers: the TUI imports it to check
rows as they are typed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from . import data_sources, json_records
from .errors import DataError, raise_if_cancelled
from .files import atomic_write_bytes
from .limits import MAX_SAMPLES
from .model_files import looks_like_hub_id
from .record_formats import (
    InvalidRecord,
    Message,
    column_map,
    normalise_record,
    record_tools,
    renamed,
    with_loss_scale,
)

if TYPE_CHECKING:
    from .config import TrainConfig

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


def read_records(
    path: Path, cancel: Any = None, columns: dict[str, str] | None = None
) -> tuple[list[Sample], list[RecordProblem]]:
    """Read one dataset; bad records come back as problems, a bad source raises DataError.
    `columns` (--columns) renames each record's fields before its format is read.

    A .json / .jsonl file is read by engine/core/json_records.py, so a problem names its line;
    anything else (other file types, save_to_disk folders, cached hub ids) through
    engine/core/data_sources.py.
    Placeholders are left as they are here; load_dataset fills them. Once `cancel` (a
    threading.Event) is set, errors.Cancelled stops the reading between records.
    """
    path = Path(path)
    is_json_file = data_sources.json_file_suffix(path) is not None and path.exists() and not path.is_dir()
    if is_json_file and data_sources.saved_dataset_folder(path) is None:
        rows = json_records.records(path)
    else:
        rows = data_sources.records(path)
    samples: list[Sample] = []
    problems: list[RecordProblem] = []
    for source, record in rows:
        raise_if_cancelled(cancel)
        if len(samples) + len(problems) >= MAX_SAMPLES:
            raise _too_many_samples(str(path))
        try:
            if isinstance(record, InvalidRecord):
                raise record
            record = renamed(record, columns or {})
            samples.append(Sample(normalise_record(record), source, record_tools(record) or None))
        except InvalidRecord as exc:
            problems.append(RecordProblem(source, str(exc), exc.kind))
    if not samples and not problems:
        problems.append(RecordProblem(str(path), "the file holds no records", "empty"))
    return samples, problems


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
    columns: str = "",
    loss_scale: str = "default",
) -> tuple[list[Sample], list[RecordProblem]]:
    """Read, check and mix datasets ("path" or "path#N"); DataError when no valid sample remains.
    `columns` is --columns (renamed fields), `loss_scale` --loss_scale (last_round: the last
    answer alone trained). Once `cancel` (a threading.Event) is set, errors.Cancelled stops it
    between records."""
    if not specs:
        raise DataError("no dataset given", hint="pass --dataset FILE.jsonl (or FILE.jsonl#N)")
    samples: list[Sample] = []
    problems: list[RecordProblem] = []
    unfilled: list[RecordProblem] = []
    read = 0
    for index, spec in enumerate(specs):
        path, count = parse_dataset_spec(spec)
        records, bad = read_records(path, cancel, column_map(columns))
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
                ready.append(Sample(with_loss_scale(messages, loss_scale), record.source, record.tools))
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


def load_dataset_for(
    cfg: TrainConfig, specs: Sequence[str], cancel: Any = None
) -> tuple[list[Sample], list[RecordProblem]]:
    """load_dataset with a run's settings for its data: --system, --model_name, --model_author,
    --seed, --columns and --loss_scale, the same wherever a run's data is read."""
    return load_dataset(
        specs,
        system=cfg.system,
        model_name=cfg.model_name,
        model_author=cfg.model_author,
        seed=cfg.seed,
        cancel=cancel,
        columns=cfg.columns,
        loss_scale=cfg.loss_scale,
    )


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


def _too_many_samples(where: str) -> DataError:
    return DataError(
        f"{where} holds more than {MAX_SAMPLES:,} samples, the most one run takes",
        hint="train on a part of it (split the file, or take fewer with path#N)",
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
