"""Dataset sources read through `datasets`: other file types, save_to_disk folders and hub ids in
the local Hugging Face and ModelScope caches, each with name#N; offline, and leaving nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from tunebench.engine.core.data import (
    load_dataset,
    parse_dataset_spec,
    read_records,
    resolve_dataset_spec,
)
from tunebench.engine.core.errors import DataError

datasets = pytest.importorskip("datasets")

# Records shaped like LLaMA-Factory's alpaca_en_demo: every row has every column.
ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
]
EXPECTED = [
    [
        {"role": "user", "content": "Give three tips for staying healthy."},
        {"role": "assistant", "content": "Eat well, sleep, move."},
    ],
    [
        {"role": "user", "content": "Translate to French.\nGood morning"},
        {"role": "assistant", "content": "Bonjour"},
    ],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
]


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and ModelScope caches of this test's own."""
    home = tmp_path / "cache"
    monkeypatch.setenv("HF_HOME", str(home / "huggingface"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(home / "modelscope"))
    for name in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    datasets.disable_progress_bars()
    return home


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def columnar(rows: list[dict]):
    """The rows as one table with every key of every row (Dataset.from_list keeps the first's)."""
    import pyarrow as pa

    return datasets.Dataset(pa.Table.from_struct_array(pa.array(rows)))


def messages(spec: str) -> list[list[dict]]:
    samples, problems = load_dataset([spec])
    assert problems == []
    return [s.messages for s in samples]


def test_csv_parquet_arrow_and_save_to_disk_read_like_json(tmp_path, caches):
    work = tmp_path / "work"
    work.mkdir()
    table = datasets.Dataset.from_list(ROWS)
    table.to_csv(work / "data.csv", index=False)
    table.to_parquet(work / "data.parquet")
    table.save_to_disk(work / "saved")
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(work / "saved_dict")
    (work / "data.arrow").write_bytes(next((work / "saved").glob("*.arrow")).read_bytes())
    before = hashes(work)

    for name in ("data.csv", "data.parquet", "data.arrow", "saved", "saved_dict"):
        assert messages(str(work / name)) == EXPECTED, name
        assert len(messages(f"{work / name}#5")) == 5  # name#N: the whole set once, then two of it
        assert len(messages(f"{work / name}#2")) == 2
    samples, _ = load_dataset([str(work / "data.csv")])
    assert samples[1].source == f"{work / 'data.csv'} row 3"  # the header is row 1

    assert hashes(work) == before  # the user's files are as they were
    assert not caches.exists()  # and no cache was written anywhere


def test_csv_cells_are_the_text_in_the_file(tmp_path):
    """pandas made '4' a number and 'True' a boolean (refused as not text), and 'NA', 'null',
    'None' and empty cells missing; every cell is now the text the file holds."""
    path = tmp_path / "answers.csv"
    answers = ["4", "True", "NA", "null", "None", "N/A", "nan", "0.10"]
    lines = ["instruction,input,output"] + [f"Say {a}.,,{a}" for a in answers]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [m[-1]["content"] for m in messages(str(path))] == answers
    assert messages(str(path))[0][0] == {"role": "user", "content": "Say 4."}  # an empty input is none


def test_csv_problems_name_the_row_a_spreadsheet_shows(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('instruction,output\nq1,a1\nq2,\n"q3\nspread over two lines",a3\nq4,\n', encoding="utf-8")
    samples, problems = read_records(path)
    assert [s.source for s in samples] == [f"{path} row 2", f"{path} row 4"]
    assert [p.source for p in problems] == [f"{path} row 3", f"{path} row 5"]
    assert "output is empty" in problems[0].reason


def test_a_csv_with_only_its_header_says_so(tmp_path):
    """datasets said 'Instruction "train" corresponds to no data!' for it."""
    path = tmp_path / "empty.csv"
    path.write_text("instruction,output\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_records(path)
    assert str(path) in caught.value.message and "no records" in caught.value.message
    assert "instruction, output" in caught.value.hint


@pytest.mark.parametrize("where", ["first", "later"])
def test_a_csv_row_with_an_unquoted_comma_is_named_not_shifted(tmp_path, where):
    """pandas took a first record with one cell too many as an index and trained its answer as
    the question; a later one failed with pandas' own message."""
    rows = ["What is 2+2?,4", "What is the capital of France?,Paris, of course"]
    if where == "first":
        rows.reverse()
    path = tmp_path / "comma.csv"
    path.write_text("instruction,output\n" + "\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_records(path)
    row = 2 if where == "first" else 3
    assert f"{path} row {row}: 3 cells where the header has 2" in caught.value.message
    assert "double quotes" in caught.value.hint
    path.write_text('instruction,output\nWhat is the capital?,"Paris, of course"\n', encoding="utf-8")
    assert messages(str(path))[0][-1]["content"] == "Paris, of course"


@pytest.mark.parametrize(("encoding", "row"), [("cp1252", 3), ("utf-16", 1)], ids=["excel-csv", "utf-16"])
def test_a_csv_not_in_utf8_names_its_row_and_the_fix(tmp_path, encoding, row):
    """Excel's plain "CSV" is the Windows code page: the message was pandas' "cannot be read as
    csv: 'utf-8' codec can't decode byte 0xe9 in position 43", with a hint to check the file type."""
    path = tmp_path / "excel.csv"
    path.write_text("instruction,output\nHello?,Hi\nCoffee?,Un café\n", encoding=encoding)
    with pytest.raises(DataError) as caught:
        read_records(path)
    assert caught.value.message.startswith(f"{path} row {row}: bytes that are not UTF-8 (0x")
    assert "UTF-8" in caught.value.hint and "codec" not in str(caught.value)


@pytest.mark.parametrize("sep", [";", "\t"], ids=["semicolon", "tab"])
def test_a_csv_separated_by_semicolons_or_tabs_reads_its_cells(tmp_path, sep):
    """Excel in many languages saves CSV with semicolons, and a pasted table has tabs: every row
    was refused as 'unknown format (keys: instruction;output)'."""
    path = tmp_path / "sep.csv"
    rows = [["instruction", "input", "output"], ["Add 1,5 and 2.", "", "3,5"], ["Say hi.", "", '"Hi; hello"']]
    path.write_text("\ufeff" + "\r\n".join(sep.join(r) for r in rows) + "\r\n", encoding="utf-8")
    assert messages(str(path)) == [
        [{"role": "user", "content": "Add 1,5 and 2."}, {"role": "assistant", "content": "3,5"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi; hello"}],
    ]


def test_an_empty_csv_is_said_to_be_empty(tmp_path):
    """It was 'cannot be read as csv: No columns to parse from file'."""
    path = tmp_path / "empty.csv"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_records(path)
    assert caught.value.message == f"no valid training sample in {path}: the file is empty"


def test_columnar_files_of_mixed_formats_keep_every_row(tmp_path):
    """Parquet, arrow and save_to_disk give every row every column, null where a record had none:
    a null column used to count as present, so the alpaca rows here were read as messages and
    skipped."""
    rows = [
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
        {"instruction": "q2", "output": "a2"},
        {"conversations": [{"from": "human", "value": "q3"}, {"from": "gpt", "value": "a3"}]},
        {"conversations": [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "a4"}]},
        {"query": "q5", "response": "a5"},
    ]
    table = columnar(rows)
    assert table[1]["messages"] is None and table[2]["conversations"][0]["role"] is None
    table.to_parquet(tmp_path / "mixed.parquet")
    table.save_to_disk(tmp_path / "saved")
    expected = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(1, 6)
    ]
    assert messages(str(tmp_path / "mixed.parquet")) == expected
    assert messages(str(tmp_path / "saved")) == expected

    # plain pretraining text among chat rows is still named as what it is
    columnar([rows[0], {"text": "Once upon a time"}]).to_parquet(tmp_path / "pt.parquet")
    with pytest.raises(DataError, match="does not train") as err:
        load_dataset([str(tmp_path / "pt.parquet")])
    assert "plain text for continued pretraining" in str(err.value)


def test_save_to_disk_metadata_file_reads_its_folder(tmp_path):
    """The folder error used to point at dataset_dict.json, which then failed as a JSON dataset."""
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(tmp_path / "saved")
    assert messages(str(tmp_path / "saved" / "dataset_dict.json")) == EXPECTED
    assert messages(str(tmp_path / "saved" / "train" / "state.json")) == EXPECTED


def test_save_to_disk_without_a_train_split_says_which_it_has(tmp_path):
    table = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"dev": table, "test": table}).save_to_disk(tmp_path / "saved")
    with pytest.raises(DataError, match="no 'train' split \\(it has dev, test\\)") as err:
        read_records(tmp_path / "saved")
    assert "save the split to train on as 'train'" in err.value.hint


def test_hub_id_in_the_hugging_face_hub_cache(caches, tmp_path, monkeypatch):
    """What `hf download --repo-type dataset tatsu-lab/alpaca-mini` leaves: a
    snapshot with parquet shards named as the hub names them, and a README."""
    repo = caches / "huggingface" / "hub" / "datasets--tatsu-lab--alpaca-mini"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (snapshot / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# alpaca mini\n")
    datasets.Dataset.from_list(ROWS).to_parquet(snapshot / "data" / "train-00000-of-00001.parquet")
    datasets.Dataset.from_list(ROWS[:1]).to_parquet(snapshot / "data" / "test-00000-of-00001.parquet")
    monkeypatch.chdir(tmp_path)

    assert messages("tatsu-lab/alpaca-mini") == EXPECTED  # the train split only
    assert len(messages("tatsu-lab/alpaca-mini#7")) == 7
    # typed in the TUI, relative to a workspace: kept as the hub id, not made a path there
    assert resolve_dataset_spec("tatsu-lab/alpaca-mini#2", tmp_path / "ws") == "tatsu-lab/alpaca-mini#2"
    assert parse_dataset_spec("tatsu-lab/alpaca-mini#2", tmp_path / "ws") == (
        Path("tatsu-lab/alpaca-mini"),
        2,
    )


def test_a_hub_id_with_a_subset_reads_that_configuration(caches, tmp_path, monkeypatch):
    """ms-swift's owner/name:subset (openai/gsm8k:main, whose repository keeps main/ and socratic/):
    the subset was read as part of the id, so the copy in the cache was never found, and the
    fetch command named a repository that does not exist."""
    repo = caches / "huggingface" / "hub" / "datasets--openai--gsm8k"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    snapshot = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for subset, answer in (("main", "4"), ("socratic", "How many? 4")):
        (snapshot / subset).mkdir(parents=True)
        rows = [{"question": "2 + 2?", "answer": answer}]
        datasets.Dataset.from_list(rows).to_parquet(snapshot / subset / "train-00000-of-00001.parquet")
    monkeypatch.chdir(tmp_path)

    (sample,) = load_dataset(["openai/gsm8k:main"])[0]
    assert sample.messages[-1] == {"role": "assistant", "content": "4"}
    (sample,) = load_dataset(["openai/gsm8k:socratic#1"])[0]
    assert sample.messages[-1]["content"] == "How many? 4"
    with pytest.raises(DataError, match="has no subset 'nope'") as err:
        load_dataset(["openai/gsm8k:nope"])
    assert "main, socratic" in err.value.hint
    with pytest.raises(DataError) as err:
        load_dataset(["someone/absent:main#5"])
    assert "hf download --repo-type dataset someone/absent " in err.value.hint

    # configs declared in the README, in folders deeper down (as HuggingFaceTB/smoltalk keeps them)
    repo = caches / "huggingface" / "hub" / "datasets--someone--talk"
    snapshot = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    configs = ""
    for subset in ("all", "smol"):
        (snapshot / "data" / subset).mkdir(parents=True)
        rows = [{"question": "Hi?", "answer": f"hi {subset}"}]
        datasets.Dataset.from_list(rows).to_parquet(
            snapshot / "data" / subset / "train-00000-of-00001.parquet"
        )
        configs += (
            f"- config_name: {subset}\n  data_files:\n  - split: train\n    path: data/{subset}/train-*\n"
        )
    (snapshot / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# talk\n")
    (sample,) = load_dataset(["someone/talk:smol"])[0]
    assert sample.messages[-1]["content"] == "hi smol"
    with pytest.raises(DataError, match="has no subset 'nope'") as err:
        load_dataset(["someone/talk:nope"])
    assert "(all, smol)" in err.value.hint


def test_hub_id_in_the_datasets_cache(caches, tmp_path, monkeypatch):
    """What `datasets.load_dataset("someone/alpaca-mini")` leaves in HF_DATASETS_CACHE when it
    ran once with network: found offline by `datasets` itself."""
    from datasets.packaged_modules.json.json import Json

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    cache = caches / "huggingface" / "datasets"
    builder = Json(
        cache_dir=str(cache), dataset_name="alpaca-mini", data_files={"train": str(source)}, hash="0a1b2c3d"
    )
    builder.download_and_prepare()
    # the hub's layout: <owner>___<name>/<config>/<version>/<commit>
    (cache / "alpaca-mini").rename(cache / "someone___alpaca-mini")
    (config,) = (cache / "someone___alpaca-mini").iterdir()
    config.rename(config.with_name("default"))
    monkeypatch.chdir(tmp_path)

    assert messages("someone/alpaca-mini") == EXPECTED
    assert len(messages("someone/alpaca-mini#2")) == 2


def test_hub_id_in_the_modelscope_cache(caches, tmp_path, monkeypatch):
    """What `modelscope download --dataset AI-ModelScope/alpaca-gpt4-data-en` leaves."""
    folder = caches / "modelscope" / "hub" / "datasets" / "AI-ModelScope" / "alpaca-gpt4-data-en"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (folder / "README.md").write_text("# alpaca gpt4 en\n")
    monkeypatch.chdir(tmp_path)
    assert messages("AI-ModelScope/alpaca-gpt4-data-en") == EXPECTED
    assert len(messages("AI-ModelScope/alpaca-gpt4-data-en#4")) == 4


def test_hub_id_whose_cached_files_are_compressed_json(caches, tmp_path, monkeypatch):
    """A repository that ships its splits as .jsonl.gz (as many do): read like the user's own
    compressed files; it was "files of several or unknown types (.gz)"."""
    import gzip

    folder = caches / "modelscope" / "hub" / "datasets" / "someone" / "zipped"
    (folder / "data").mkdir(parents=True)
    with gzip.open(folder / "data" / "train-00000-of-00001.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(row) + "\n" for row in ROWS))
    monkeypatch.chdir(tmp_path)
    assert messages("someone/zipped") == EXPECTED


def test_a_hub_id_not_cached_says_so_and_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(["tatsu-lab/alpaca#100"])
    message = str(err.value)
    assert "'tatsu-lab/alpaca' is not a file or folder here" in message
    assert "not in the local Hugging Face or ModelScope cache" in message and "downloads nothing" in message
    assert "hf download --repo-type dataset tatsu-lab/alpaca" in err.value.hint
    assert "modelscope download --dataset tatsu-lab/alpaca" in err.value.hint
    # a mistyped file name is a missing file, not a hub id
    with pytest.raises(DataError, match="dataset file not found: data/trian.jsonl"):
        load_dataset(["data/trian.jsonl"])
    assert sorted(os.listdir(tmp_path)) == []


def test_openai_content_parts_of_text_are_accepted(tmp_path):
    record = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi."}, {"type": "text", "text": "Who are you?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A small model."}]},
        ]
    }
    path = tmp_path / "parts.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert messages(str(path)) == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi.\nWho are you?"},
            {"role": "assistant", "content": "A small model."},
        ]
    ]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz", ".jsonl.bz2", ".jsonl.xz"])
def test_a_compressed_json_file_reads_as_the_file_inside(tmp_path, suffix):
    """A .jsonl.gz was 'unknown dataset extension .gz' with the list of types, as if it were one."""
    import bz2
    import gzip
    import lzma

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[Path(suffix).suffix]
    records = [{"instruction": "q", "output": "a"}, {"bad": 1}]
    text = json.dumps(records) if suffix.startswith(".json.") else "\n".join(map(json.dumps, records))
    path = tmp_path / f"train{suffix}"
    path.write_bytes(compress(text.encode()))
    samples, problems = load_dataset([str(path)])
    assert [s.messages[-1]["content"] for s in samples] == ["a"]
    where = f"{path}:2" if suffix.startswith(".jsonl") else f"{path}[1]"
    assert [p.source for p in problems] == [where]


def test_a_compressed_file_that_is_not_whole_or_not_json_says_what_to_do(tmp_path):
    import gzip

    cut = tmp_path / "train.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"instruction": "q", "output": "a"}\n' * 100)[:40])
    with pytest.raises(DataError, match="cannot be decompressed") as caught:
        load_dataset([str(cut)])
    assert "check that it is whole" in str(caught.value)
    table = tmp_path / "train.csv.gz"  # read through datasets: decompressed first
    table.write_bytes(gzip.compress(b"instruction,output\nq,a\n"))
    with pytest.raises(DataError) as caught:
        load_dataset([str(table)])
    said = str(caught.value)
    assert said.startswith(f"{table} is compressed (.gz): datasets are read as they are written")
    hint = f"decompress it first (gunzip -k {table}), then name the file that comes out (train.csv)"
    assert hint in said
