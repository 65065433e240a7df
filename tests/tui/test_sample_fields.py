"""Single-turn samples as text fields: split and joined back without changing the format."""

from __future__ import annotations

import pytest
from tunebench.engine.core.record_formats import normalise_record
from tunebench.tui.widgets.dataset.sample_fields import SampleFields, join_fields, split_fields

ALPACA = {"instruction": "Who are you?", "input": "", "output": "I am {{NAME}}.", "tag": "id"}
MESSAGES = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi", "weight": 1},
        {"role": "assistant", "content": "Hello!"},
    ]
}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}


def edited(record, **changes):
    fields = split_fields(record)
    assert fields is not None
    return join_fields(record, SampleFields(fields.style, {**fields.values, **changes}))


def test_alpaca_fields_keep_extra_keys_and_skip_empty_optional_ones():
    assert split_fields(ALPACA).values == {
        "system": "",
        "instruction": "Who are you?",
        "input": "",
        "output": "I am {{NAME}}.",
    }
    out = edited(ALPACA, output="I am TuneBee.")
    assert out == {**ALPACA, "output": "I am TuneBee."}
    assert list(out) == list(ALPACA)  # key order kept
    assert "system" not in out  # left empty: not added
    assert edited(ALPACA, system="Be kind.")["system"] == "Be kind."


def test_messages_keep_per_message_extras_and_drop_an_emptied_system_turn():
    out = edited(MESSAGES, user="Hey")
    assert out["messages"][1] == {"role": "user", "content": "Hey", "weight": 1}
    no_system = edited(MESSAGES, system="")
    assert [m["role"] for m in no_system["messages"]] == ["user", "assistant"]
    assert MESSAGES["messages"][0]["role"] == "system"  # the original is not mutated


def test_sharegpt_gets_a_system_turn_in_its_own_spelling():
    out = edited(SHAREGPT, system="Be brief.", assistant="Hi!")
    assert out["conversations"] == [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hi!"},
    ]
    top = {**SHAREGPT, "system": "old"}
    assert edited(top, system="new") == {**SHAREGPT, "system": "new"}


@pytest.mark.parametrize(
    "record",
    [
        {"instruction": "a", "output": "b", "history": [["q", "a"]]},
        {"messages": [{"role": "user", "content": "a"}] * 2},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ]
        },
        {"conversations": [{"from": "alien", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"instruction": ["not", "text"], "output": "b"},
        ["a", "list"],
        {"text": "pretraining style"},
        # Dolly: the alpaca fields have no place for context and response, which would be lost
        {"instruction": "Summarise.", "context": "Long text.", "response": "Short."},
        {"conversation": [{"human": "q", "assistant": "a"}]},
        {"prompt": "q", "completion": "a"},
    ],
)
def test_what_is_not_one_plain_exchange_stays_json(record):
    assert split_fields(record) is None


@pytest.mark.parametrize("speaker", ["bot", "model", "chatgpt", "GPT", "Assistant"])
def test_sharegpt_speakers_training_accepts_are_fields_too(speaker):
    record = {"conversations": [{"from": "Human", "value": "Hi"}, {"from": speaker, "value": "Hello!"}]}
    assert normalise_record(record)[-1] == {"role": "assistant", "content": "Hello!"}
    fields = split_fields(record)
    assert fields is not None and fields.values["assistant"] == "Hello!"
    out = edited(record, assistant="Hi!")
    assert out["conversations"][1] == {"from": speaker, "value": "Hi!"}  # the speaker's spelling kept


def test_a_developer_message_is_the_system_field_as_in_training():
    record = {"messages": [{"role": "developer", "content": "Be brief."}, *MESSAGES["messages"][1:]]}
    assert normalise_record(record)[0]["role"] == "system"
    assert split_fields(record).values["system"] == "Be brief."
    assert edited(record, system="Be kind.")["messages"][0] == {"role": "developer", "content": "Be kind."}
