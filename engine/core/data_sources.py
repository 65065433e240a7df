"""Dataset sources other than one JSON file, read through `datasets`: .csv / .parquet / .arrow /
.txt files, folders written by `save_to_disk`, and hub ids already in the local Hugging Face or
ModelScope cache. Nothing is ever downloaded: a hub id that is not cached is refused with the
command that fetches it.

Each source yields (where, record) pairs for engine/core/data.py to check like JSON records;
JSON files themselves stay with data.py, whose reader names a bad record's line. `datasets` is
imported only when such a source is read, so the TUI's imports of data.py stay light.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataError
from .model_files import looks_like_hub_id, modelscope_folder

JSON_EXTENSIONS = (".jsonl", ".json")
# The `datasets` builder that reads each other file type.
BUILDERS = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}
DATA_EXTENSIONS = (*JSON_EXTENSIONS, *BUILDERS)
# Compressed files, and the command that gives back the file inside (a compressed .json or
# .jsonl is read as it is: json_file_suffix).
DECOMPRESS = {".gz": "gunzip -k", ".bz2": "bunzip2 -k", ".xz": "unxz -k", ".zst": "unzstd", ".zip": "unzip"}
# The standard library's readers of the compressions a JSON file may come in.
READ_COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}


def json_file_suffix(path: Path) -> str | None:
    """.json or .jsonl for a JSON file, compressed (data.jsonl.gz) or not; else None."""
    suffix = path.suffix.lower()
    if suffix in READ_COMPRESSED:
        suffix = Path(path.stem).suffix.lower()
    return suffix if suffix in JSON_EXTENSIONS else None


# What `save_to_disk` writes: a Dataset's folder, and a DatasetDict's (one folder per split).
SAVED_DATASET_FILES = ("state.json", "dataset_info.json")
SAVED_DATASET_DICT_FILE = "dataset_dict.json"
TRAIN_SPLIT = "train"


def fetch_commands(repo_id: str) -> str:
    hub = f"hf download --repo-type dataset {repo_id}"
    return f"{hub}  (or: modelscope download --dataset {repo_id})"


def saved_dataset_folder(path: Path) -> Path | None:
    """The `save_to_disk` folder that `path` is, or is a metadata file of; None if neither."""
    folder = path if path.is_dir() else path.parent
    if not (path.is_dir() or path.name in (*SAVED_DATASET_FILES, SAVED_DATASET_DICT_FILE)):
        return None
    if (folder / SAVED_DATASET_DICT_FILE).is_file():
        return folder
    if all((folder / name).is_file() for name in SAVED_DATASET_FILES):
        # A split folder inside a DatasetDict is a dataset too; the whole dict is what was saved.
        parent = folder.parent
        return parent if path.is_file() and (parent / SAVED_DATASET_DICT_FILE).is_file() else folder
    return None


def records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each row of a source that is not a JSON file; DataError says why a
    source cannot be read (not found, not cached, an unknown file type, a plain folder)."""
    saved = saved_dataset_folder(path)
    if saved is not None:
        yield from _rows(_load_saved(saved), str(saved))
    elif path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in DATA_EXTENSIONS)[:5]
        hint = "name a data file" + (f" such as {path / inside[0]}" if inside else "")
        raise DataError(
            f"{path} is a folder, not a dataset file (nor one written by save_to_disk)",
            hint=hint + f" ({', '.join(DATA_EXTENSIONS)})",
        )
    elif path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None and path.suffix.lower() in DECOMPRESS:
            raise DataError(
                f"{path} is compressed ({path.suffix}): datasets are read as they are written",
                hint=f"decompress it first ({DECOMPRESS[path.suffix.lower()]} {path}), then name the "
                f"file that comes out{f' ({path.stem})' if Path(path.stem).suffix else ''}",
            )
        if builder is None:
            raise DataError(
                f"{path}: unknown dataset extension {path.suffix or '(none)'!r}",
                hint="use .jsonl (one JSON object per line), .json (a list of objects), "
                ".csv, .parquet, .arrow, .txt, or a folder written by save_to_disk",
            )
        yield from _rows(_read_with(builder, [path], str(path)), str(path), by_row=builder == "csv")
    elif _is_hub_id(path):
        # ms-swift's `owner/name:subset` (openai/gsm8k:main): one configuration of the repository
        repo_id, _, subset = path.as_posix().partition(":")
        dataset, where = _load_cached_hub_id(repo_id, "" if subset == "default" else subset)
        yield from _rows(dataset, where)
    else:
        raise DataError(
            f"dataset file not found: {path}",
            hint=f"check the path; relative paths start from {Path.cwd()}",
        )


def _is_hub_id(path: Path) -> bool:
    """owner/name, not there as a path, and not named like a file (a mistyped data/file.jsonl)."""
    text = path.as_posix()
    return not path.is_absolute() and looks_like_hub_id(text) and path.suffix.lower() not in DATA_EXTENSIONS


def _rows(dataset: Any, where: str, by_row: bool = False) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row: where[index], or with `by_row` "where row N" as a spreadsheet
    numbers a CSV file's rows (the header is row 1, so the first record is row 2)."""
    for index, row in enumerate(dataset):
        yield (f"{where} row {index + 2}" if by_row else f"{where}[{index}]"), row


# ------------------------------------------------------------------ loading


def _datasets() -> Any:
    """`datasets`, offline and quiet: TuneBench never downloads, and its progress bars and
    cache notes would interleave with the engine's own output."""
    import datasets

    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _read_with(builder: str, paths: list[Path], where: str) -> Any:
    """Data files read by one `datasets` builder into memory."""
    import tempfile

    datasets = _datasets()
    # A private cache, dropped after reading: reading a file leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix="tunebench-data-") as cache:
        try:
            return datasets.load_dataset(
                builder,
                data_files=[str(p) for p in paths],
                split=TRAIN_SPLIT,
                cache_dir=cache,
                keep_in_memory=True,
                **(_csv_as_text(datasets, paths[0]) if builder == "csv" else {}),
            )
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow's parse errors have many types
            raise DataError(
                f"{where} cannot be read as {builder}: {_first_line(exc)}",
                hint="check that the file is complete and of the type its extension says",
            ) from None


def _csv_as_text(datasets: Any, path: Path) -> dict[str, Any]:
    """The csv builder's options that keep every cell the text in the file: pandas would read an
    answer of 4 as a number and True as a boolean (refused as not text), and NA, null, None or an
    empty cell as missing."""
    import pandas as pd

    sep = _check_csv_rows(path)
    first = pd.read_csv(path, nrows=1, sep=sep)  # the header, with duplicates named as pandas names them
    if first.empty:  # else datasets says: Instruction "train" corresponds to no data!
        raise DataError(
            f"{path} holds a header row and no records",
            hint=f"add one row per sample below the header ({', '.join(map(str, first.columns))})",
        )
    columns = first.columns
    string = datasets.Value("string")
    return {"features": datasets.Features({str(c): string for c in columns}), "na_filter": False, "sep": sep}


_SEPARATORS = {",": "a comma", ";": "a semicolon", "\t": "a tab"}


def _check_csv_rows(path: Path) -> str:
    """DataError for a row with more cells than the header: pandas would shift it (a first record
    with one cell too many makes its first cell an index, the rest move left and train as the
    wrong fields) or fail with a message of its own. An unquoted comma in an answer is the usual
    cause. Rows are numbered as a spreadsheet shows them (header: row 1).

    Returns the separator: whichever of comma, semicolon and tab the header holds most of. Excel
    saves CSV with semicolons where the comma is the decimal mark, and a table copied from a
    spreadsheet has tabs."""
    import csv

    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            header_line = file.readline()
            sep = max(_SEPARATORS, key=header_line.count)
            file.seek(0)
            rows = csv.reader(file, delimiter=sep)
            header = next((row for row in rows if row), [])  # pandas skips blank lines too
            if not header:
                raise DataError(
                    f"no valid training sample in {path}: the file is empty",
                    hint="write a header row (instruction,output) and one row per sample below it",
                )
            for number, row in enumerate(rows, start=2):
                if len(row) > len(header):
                    raise DataError(
                        f"{path} row {number}: {len(row)} cells where the header has {len(header)} "
                        f"({', '.join(header)})",
                        hint=f"put a cell that holds {_SEPARATORS[sep]} in double quotes "
                        '("Paris, of course"), as spreadsheets do when they save CSV',
                    )
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    return sep


def _not_utf8(path: Path) -> DataError:
    """Where a CSV file stops being UTF-8, as the row a spreadsheet shows (the reader decodes in
    blocks, so its error says neither). Excel's plain "CSV" is written in the Windows code page."""
    import csv
    import io

    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        raw.decode("utf-8")
        start = len(raw)  # the file changed since: the row after the last
    except UnicodeDecodeError as exc:
        start = exc.start
    before = raw[:start].decode("utf-8")
    rows = sum(1 for _ in csv.reader(io.StringIO(before, newline="")))
    row = rows + 1 if not before or before.endswith(("\n", "\r")) else rows
    found = f" (0x{raw[start]:02x})" if start < len(raw) else ""
    return DataError(
        f"{path} row {row}: bytes that are not UTF-8{found}",
        hint="save the file as UTF-8 (Excel: Save As, CSV UTF-8)",
    )


def _load_saved(folder: Path) -> Any:
    datasets = _datasets()
    try:
        saved = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001
        raise DataError(
            f"{folder} cannot be read as a saved dataset: {_first_line(exc)}",
            hint="save it again with save_to_disk, or export it to .jsonl",
        ) from None
    return _train_split(saved, str(folder))


def _train_split(dataset: Any, where: str) -> Any:
    """The train split of a DatasetDict (or its only split); a Dataset as it is."""
    if not hasattr(dataset, "keys"):
        return dataset
    splits = list(dataset.keys())
    if TRAIN_SPLIT in splits or len(splits) == 1:
        return dataset[TRAIN_SPLIT if TRAIN_SPLIT in splits else splits[0]]
    raise DataError(
        f"{where} has no '{TRAIN_SPLIT}' split (it has {', '.join(splits)})",
        hint=f"save the split to train on as '{TRAIN_SPLIT}', or save that split alone",
    )


def _load_cached_hub_id(repo_id: str, subset: str = "") -> tuple[Any, str]:
    """A hub id's train split (of its configuration `subset`, if named) from whichever local
    cache holds it, and where that is."""
    folder = _hub_snapshot(repo_id) or modelscope_folder(repo_id, "datasets")
    named = f"{repo_id}:{subset}" if subset else repo_id
    if folder is not None:
        return _load_subset(folder, repo_id, subset), f"{named} ({folder})"
    datasets = _datasets()
    cache = Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets").expanduser()
    try:
        return datasets.load_dataset(repo_id, subset or None, split=TRAIN_SPLIT, cache_dir=str(cache)), named
    except Exception:  # noqa: BLE001 - any failure here means "not in the local cache"
        pass
    raise DataError(
        f"dataset {named!r} is not a file or folder here, and as a hub id it is not in the local "
        "Hugging Face or ModelScope cache; TuneBench downloads nothing",
        hint=f"fetch it where there is network: {fetch_commands(repo_id)}; "
        f"or check the path (relative paths start from {Path.cwd()})",
    )


def _load_subset(folder: Path, repo_id: str, subset: str) -> Any:
    """A downloaded repository's train split of its configuration `subset` (all of it for none):
    the folder of that name (openai/gsm8k keeps main/ and socratic/), else the configs its README
    declares, as `datasets` reads them; DataError naming the configs there are."""
    if not subset:
        return _load_folder(folder, repo_id)
    if (folder / subset).is_dir():
        return _load_folder(folder / subset, f"{repo_id}:{subset}")
    datasets = _datasets()
    try:
        return datasets.load_dataset(str(folder), subset, split=TRAIN_SPLIT)
    except Exception:  # noqa: BLE001 - no such config: say which there are
        pass
    try:
        names = [n for n in datasets.get_dataset_config_names(str(folder)) if n != "default"]
    except Exception:  # noqa: BLE001 - a repository without configs
        names = []
    # ... or its folders that hold data files themselves (main/, socratic/)
    names = names or sorted(
        p.name
        for p in folder.iterdir()
        if p.is_dir() and any(_builder(f) for f in p.iterdir() if f.is_file())
    )
    raise DataError(
        f"{repo_id} has no subset {subset!r} in its cached copy ({folder})",
        hint=f"name one it has, as {repo_id}:NAME ({', '.join(names)})"
        if names
        else f"it has no subsets: leave out :{subset}",
    )


def _hf_home() -> Path:
    """HF_HOME as huggingface_hub reads it, read now rather than when the hub was imported."""
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(os.environ.get("HF_HOME") or Path(cache) / "huggingface").expanduser()


def _hub_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder `hf download --repo-type dataset` left in the hub cache."""
    from huggingface_hub import snapshot_download

    cache = Path(os.environ.get("HF_HUB_CACHE") or _hf_home() / "hub").expanduser()
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", cache_dir=cache, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not in this cache"
        return None


def _load_folder(folder: Path, repo_id: str) -> Any:
    """A downloaded dataset repository: save_to_disk output, or data files split as the hub
    splits them (datasets' own rules: train-* files, a train/ folder, ...)."""
    saved = saved_dataset_folder(folder)
    if saved is not None:
        return _load_saved(saved)
    _datasets()
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except Exception:  # noqa: BLE001 - datasets raises EmptyDatasetError for a folder without data
        files = {}
    split = files.get(TRAIN_SPLIT) or (next(iter(files.values())) if len(files) == 1 else None)
    if not split:
        raise DataError(
            f"{repo_id}: the cached copy in {folder} holds no data files for a '{TRAIN_SPLIT}' split",
            hint=f"name one of its files as --dataset, or fetch it again: {fetch_commands(repo_id)}",
        )
    paths = [Path(f) for f in split]
    builders = {_builder(p) for p in paths}
    if len(builders) != 1 or None in builders:
        types = ", ".join(sorted({p.suffix or p.name for p in paths}))
        raise DataError(
            f"{repo_id}: the cached copy in {folder} holds files of several or unknown types ({types})",
            hint="name one of its files as --dataset",
        )
    return _read_with(builders.pop() or "", paths, f"{repo_id} ({folder})")


def _builder(path: Path) -> str | None:
    """The `datasets` builder for a file of a downloaded repository (JSON ones too, compressed
    or not: unlike the user's own files, these need no line-exact messages)."""
    return "json" if json_file_suffix(path) else BUILDERS.get(path.suffix.lower())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
