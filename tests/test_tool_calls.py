"""Tool calling: LLaMA-Factory's glaive sharegpt and OpenAI tool_calls read into one form, rendered
through the chat template's own tool support, with the loss on the assistant's calls and answers."""

from __future__ import annotations

import copy
import json

import pytest
from test_data import labelled_runs, write_jsonl
from tunebench.engine.core import templates
from tunebench.engine.core.data import load_dataset
from tunebench.engine.core.encoding import check_sample, tokenize_samples
from tunebench.engine.core.record_formats import normalise_record, record_tools

CONVERT = {
    "name": "convert_currency",
    "description": "Convert an amount from one currency to another",
    "parameters": {
        "type": "object",
        "properties": {
            "amount": {"type": "number", "description": "The amount to convert"},
            "from_currency": {"type": "string"},
            "to_currency": {"type": "string"},
        },
        "required": ["amount", "from_currency", "to_currency"],
    },
}
ARGS = {"amount": 500, "from_currency": "USD", "to_currency": "EUR"}
RESULT = '{"converted_amount": 420.5, "from_currency": "USD", "to_currency": "EUR"}'

# Shaped like LLaMA-Factory's glaive_toolcall_en_demo: tools as JSON text, a call, its result.
GLAIVE_CALL = {
    "conversations": [
        {"from": "human", "value": "Hi, I need to convert 500 USD to Euros. Can you help me with that?"},
        {"from": "function_call", "value": json.dumps({"name": "convert_currency", "arguments": ARGS})},
        {"from": "observation", "value": RESULT},
        {"from": "gpt", "value": "Sure, 500 USD is approximately 420.50 Euros."},
    ],
    "tools": json.dumps([CONVERT]),
}
# ... and one of its records that offers the tool but answers without calling it.
GLAIVE_NO_CALL = {
    "conversations": [
        {"from": "human", "value": "Can you book me a flight to Paris?"},
        {"from": "gpt", "value": "I'm sorry, I can only convert currencies."},
    ],
    "tools": json.dumps([CONVERT]),
}
# The same call as OpenAI writes it: arguments as JSON text, the result tied to the call's id.
OPENAI_CALL = {
    "messages": [
        {"role": "user", "content": "Hi, I need to convert 500 USD to Euros. Can you help me with that?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "convert_currency", "arguments": json.dumps(ARGS)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
        {"role": "assistant", "content": "Sure, 500 USD is approximately 420.50 Euros."},
    ],
    "tools": [{"type": "function", "function": CONVERT}],
}


@pytest.fixture
def tool_tokenizer(tiny_tokenizer):
    """A tokenizer whose own chat template takes tools, as Qwen2.5's does."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = templates.QWEN
    return tokenizer


def test_glaive_and_openai_tool_calls_read_the_same():
    messages = normalise_record(GLAIVE_CALL)
    assert messages == normalise_record(OPENAI_CALL)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    call = {"type": "function", "function": {"name": "convert_currency", "arguments": ARGS}}
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert (
        record_tools(GLAIVE_CALL) == record_tools(OPENAI_CALL) == [{"type": "function", "function": CONVERT}]
    )
    assert record_tools(GLAIVE_NO_CALL) == [{"type": "function", "function": CONVERT}]


def test_tools_are_in_the_prompt_and_only_calls_and_answers_are_trained(tmp_path, tool_tokenizer):
    path = write_jsonl(tmp_path / "glaive.jsonl", [GLAIVE_CALL, GLAIVE_NO_CALL])
    samples, problems = load_dataset([str(path)])
    assert problems == [] and len(samples) == 2 and samples[0].tools == record_tools(GLAIVE_CALL)
    tokenized, report = tokenize_samples(samples, tool_tokenizer, 2048)
    assert report.dropped == 0 and report.problems == []
    call, no_call = tokenized
    text = tool_tokenizer.decode(call.input_ids)
    assert "<tools>" in text and '"name": "convert_currency"' in text and "<tool_response>" in text
    assert labelled_runs(tool_tokenizer, call.input_ids, call.labels) == [
        '<tool_call>\n{"name": "convert_currency", "arguments": '
        + json.dumps(ARGS)
        + "}\n</tool_call><|im_end|>",
        "Sure, 500 USD is approximately 420.50 Euros.<|im_end|>",
    ]
    # the record without a call still shows the tool it declines
    assert "convert_currency" in tool_tokenizer.decode(no_call.input_ids)
    assert labelled_runs(tool_tokenizer, no_call.input_ids, no_call.labels) == [
        "I'm sorry, I can only convert currencies.<|im_end|>"
    ]


def test_a_template_without_tool_support_is_refused_not_trained_without_tools(tmp_path, tiny_tokenizer):
    """The tiny model's own template has no tools: the glaive records would train with the tools
    silently gone. Both are dropped, saying why and what to pass; --template qwen carries them."""
    path = write_jsonl(tmp_path / "glaive.jsonl", [GLAIVE_CALL, GLAIVE_NO_CALL])
    samples, _ = load_dataset([str(path)])
    kept, report = tokenize_samples(samples, tiny_tokenizer, 2048)
    assert kept == [] and report.dropped == 2
    reason = report.problems[0].reason
    assert "does not show the tools or tool calls" in reason and "'convert_currency'" in reason
    assert "--template qwen or chatml" in reason
    kept, report = tokenize_samples(samples, tiny_tokenizer, 2048, template="chatml")
    assert len(kept) == 2 and report.dropped == 0
    # the TUI's row check says the same
    (message,) = check_sample(GLAIVE_CALL, tokenizer=tiny_tokenizer, max_length=2048)
    assert "does not show the tools" in message
    assert check_sample(GLAIVE_CALL, tokenizer=tiny_tokenizer, max_length=2048, template="qwen") == []


@pytest.mark.parametrize(
    ("turns", "words"),
    [
        (
            [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{name: convert}"}],
            ["conversations[1]", "the function_call is not valid JSON"],
        ),
        (
            [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": '{"name": "convert_currency", "arguments": {}}'},
                {"from": "gpt", "value": "done"},
            ],
            ["conversations[2] is from the assistant but the tool should speak here"],
        ),
        (
            [{"from": "human", "value": "q"}, {"from": "observation", "value": "{}"}],
            ["conversations[1] is from the tool but the assistant should speak here"],
        ),
    ],
)
def test_broken_tool_turns_say_where_and_why(turns, words):
    (message,) = check_sample({"conversations": turns, "tools": json.dumps([CONVERT])})
    for word in words:
        assert word in message


def test_a_broken_tools_field_is_the_records_problem():
    (message,) = check_sample({**GLAIVE_NO_CALL, "tools": "[{broken"})
    assert "'tools' is not valid JSON" in message
