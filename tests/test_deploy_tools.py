"""`tunebench deploy` and OpenAI tool calling, as vLLM serves it for Hermes / Qwen2.5 templates:
tools and tool history rendered into the prompt as training renders them, calls in the answer
read back as `tool_calls`, whole and streamed, through the official openai client on a real
server. A tiny model cannot be taught to call tools in a test, so the answers with calls are
scripted: the batcher's submit is replaced by one that emits the crafted text as the model would."""

from __future__ import annotations

import json

import httpx2 as httpx
import openai
import pytest
from test_generate import make_run
from tunebench.engine.core.encoding import IGNORE_INDEX, encode_messages, resolve_template
from tunebench.engine.deploy.batcher import Delta, Finished
from tunebench.engine.deploy.deployment import Deployment, bind_socket
from tunebench.engine.deploy.served import AdapterSpec, plan_deployment
from tunebench.engine.deploy.tool_parser import StreamedToolCalls, split_tool_calls

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TOOLS = [{"type": "function", "function": WEATHER}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# The conversation after the model called the tool and the tool answered, as OpenAI writes it.
HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_2 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>'


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """The tiny base, `agent` trained with --template chatml (Qwen2.5's tool format; the base
    answers with it too) and `plain` with the tokenizer's own template, which has no tools."""
    root = tmp_path_factory.mktemp("deploy-tool-runs")
    agent = make_run(root, tiny_model_dir, "agent", seed=2, template="chatml")
    plain = make_run(root, tiny_model_dir, "plain", seed=1)
    adapters = [AdapterSpec("agent", str(agent)), AdapterSpec("plain", str(plain))]
    plan = plan_deployment(str(tiny_model_dir), adapters, served_model_name="tiny")
    # The tool prompt takes ~600 tokens of the tiny tokenizer (a 512-token vocabulary): past the 256
    # test_deploy.py allows. Positions past the model's 512 still run (RoPE; the weights are random).
    deployment = Deployment.load(
        plan, max_model_len=1024, max_num_seqs=2, max_new_tokens=8, torch_dtype="float32"
    )
    url = deployment.start_in_thread(bind_socket("127.0.0.1", 0))
    yield deployment, url
    deployment.stop()


def record_prompts(monkeypatch, deployment) -> list:
    """The sequences the server hands the batcher (their prompt tokens), decoded as ever."""
    seen, submit = [], deployment.batcher.submit

    def recording(seq) -> None:
        seen.append(seq)
        submit(seq)

    monkeypatch.setattr(deployment.batcher, "submit", recording)
    return seen


def script_answer(monkeypatch, deployment, pieces: list[str], finish: str = "stop") -> None:
    """Every request from now on is answered with `pieces`, as the batcher emits decoded text."""

    def scripted(seq) -> None:
        for piece in pieces:
            seq.emit(Delta(piece))
        seq.emit(Finished(finish, len(seq.prompt), len(pieces)))

    monkeypatch.setattr(deployment.batcher, "submit", scripted)


# ---------------------------------------------------------------- the prompt


def test_tools_and_the_tool_history_are_in_the_prompt_as_training_renders_them(client, server, monkeypatch):
    deployment, _ = server
    seen = record_prompts(monkeypatch, deployment)
    reply = client.chat.completions.create(model="agent", messages=HISTORY, tools=TOOLS, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens
    (seq,) = seen
    tokenizer = deployment.served.tokenizer
    text = tokenizer.decode(seq.prompt)
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in text
    assert "<|im_start|>assistant\n" + CALL + "<|im_end|>" in text
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")
    # Token for token the prompt training gives this conversation before its next answer.
    answer = {"role": "assistant", "content": "It is 21 degrees."}
    chat = [*ASK, {**HISTORY[1], "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"})]}]
    chat += [{"role": "tool", "content": HISTORY[2]["content"]}, answer]
    ids, labels = encode_messages(chat, tokenizer, resolve_template(tokenizer, "chatml")[0], tools=TOOLS)
    trained = [label != IGNORE_INDEX for label in labels]
    last_answer = max(i for i in range(1, len(ids)) if trained[i] and not trained[i - 1])
    assert seq.prompt == ids[:last_answer]


def _call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_other_than_auto_or_none_is_400(client, choice):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="agent", messages=ASK, tools=TOOLS, tool_choice=choice)
    error = caught.value.body
    assert error["param"] == "tool_choice"
    assert 'supports only "auto"' in error["message"] and '"none"' in error["message"]


@pytest.mark.parametrize(
    ("messages", "tools", "param"),
    [(ASK, TOOLS, "tools"), (HISTORY, None, "messages")],
    ids=["tools", "tool-history"],
)
def test_a_template_without_tool_support_is_400_saying_what_to_do(client, messages, tools, param):
    """`plain` trained with the tiny tokenizer's own template, which drops tools and calls: the
    model would answer as if it had none."""
    extra = {"tools": tools} if tools else {}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="plain", messages=messages, **extra)
    error = caught.value.body
    assert error["code"] == "tools_not_supported" and error["param"] == param
    message = error["message"]
    assert "does not show tools or tool calls" in message and "'get_weather'" in message
    assert "--template qwen or chatml" in message


@pytest.mark.parametrize(
    ("message", "said"),
    [
        ({"content": "hi"}, "messages[0] has no role: give it one of system, user, assistant or tool"),
        (
            {"role": "user", "content": [{"type": "text", "txt": "hi"}]},
            "messages[0].content[0] is a text part without a string 'text' (got null)",
        ),
        (
            {"role": "tool", "content": "21"},
            "messages[0] is a tool result, but no assistant message with tool_calls comes before it",
        ),
    ],
)
def test_bad_messages_say_what_is_wrong(url, message, said):
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "agent", "messages": [message]})
    assert response.status_code == 400 and response.json()["error"]["message"] == said


def test_bad_tools_and_calls_name_the_field(url):
    bad_call = [
        *ASK,
        {**HISTORY[1], "tool_calls": [{"function": {"name": "get_weather", "arguments": "{city"}}]},
    ]
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "agent", "messages": bad_call})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages[1].tool_calls"
    assert "tool_calls[0]'s arguments is not valid JSON" in error["message"]
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "agent", "messages": ASK, "tools": [{"type": "function"}]},
    )
    error = response.json()["error"]
    assert (
        response.status_code == 400
        and error["param"] == "tools"
        and "has no function 'name'" in error["message"]
    )


# ---------------------------------------------------------------- the answer


def test_a_call_in_the_answer_comes_back_as_tool_calls(client, server, monkeypatch):
    script_answer(monkeypatch, server[0], ["Let me check.\n", CALL[:20], CALL[20:], "\n", CALL_2])
    reply = client.chat.completions.create(model="agent", messages=ASK, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}),
        ("function", "get_weather", {"city": "Lyon"}),
    ]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    # A call alone: no content at all, as OpenAI sends it.
    script_answer(monkeypatch, server[0], [CALL])
    alone = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS).choices[0]
    assert alone.message.content is None and alone.finish_reason == "tool_calls"


def test_a_streamed_call_comes_at_the_end_as_tool_call_chunks(client, server, monkeypatch):
    """The text before the call streams as content; nothing of the tag does, even split over
    pieces; the calls come as delta.tool_calls chunks, then finish_reason tool_calls."""
    pieces = ["Let me ", "check. <to", "ol_call>\n", CALL.removeprefix("<tool_call>\n")[:15]]
    pieces += [CALL.removeprefix("<tool_call>\n")[15:], CALL_2]
    script_answer(monkeypatch, server[0], pieces)
    chunks = list(
        client.chat.completions.create(
            model="agent",
            messages=ASK,
            tools=TOOLS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me check. "
    assert not any("<" in (d.content or "") for d in deltas)
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert [(c.index, c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "function", "get_weather", {"city": "Paris"}),
        (1, "function", "get_weather", {"city": "Lyon"}),
    ]
    assert all(c.id.startswith("call_") for c in calls)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["tool_calls"] and chunks[-1].usage.completion_tokens == len(pieces)
    # The client's own stream helper puts the calls together (strict tools: it parses arguments).
    strict = [{"type": "function", "function": {**WEATHER, "strict": True}}]
    with client.chat.completions.stream(model="agent", messages=ASK, tools=strict) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [c.function.parsed_arguments for c in final.message.tool_calls] == [
        {"city": "Paris"},
        {"city": "Lyon"},
    ]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("answer", "tool_choice"),
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>', "auto"),
        (CALL, "none"),
        ("No <tool here, only text <tool_", "auto"),
    ],
    ids=["malformed", "tool_choice-none", "no-call"],
)
def test_an_answer_without_a_call_that_parses_stays_text(
    client, server, monkeypatch, stream, answer, tool_choice
):
    script_answer(monkeypatch, server[0], [answer[:7], answer[7:]])
    asked = client.chat.completions.create(
        model="agent", messages=ASK, tools=TOOLS, tool_choice=tool_choice, stream=stream
    )
    if stream:
        deltas = [c.choices[0].delta for c in asked if c.choices]
        assert "".join(d.content or "" for d in deltas) == answer
        assert not any(d.tool_calls for d in deltas)
    else:
        assert asked.choices[0].message.content == answer and asked.choices[0].message.tool_calls is None
        assert asked.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- pieces


def test_split_tool_calls():
    content, calls = split_tool_calls(f"Sure.\n{CALL}\n{CALL_2}\nDone.")
    assert content == "Sure.\n\n\nDone." and [c["function"]["arguments"] for c in calls] == [
        '{"city": "Paris"}',
        '{"city": "Lyon"}',
    ]
    # arguments as JSON text inside the block, and a last block the model ended without closing
    content, calls = split_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": \\"é\\"}"}')
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": '{"x": "é"}'}
    assert split_tool_calls("plain text") == ("plain text", [])
    broken = f'{CALL}<tool_call>{{"arguments": {{}}}}</tool_call>'  # the second has no name
    assert split_tool_calls(broken) == (broken, [])


def test_streamed_tool_calls_hold_back_only_what_may_be_a_call():
    stream = StreamedToolCalls()
    assert [stream.push(p) for p in ["a <", "tool", "s> b <tool_", "call>", '{"name": "f"}']] == [
        "a ",
        "",
        "<tools> b ",
        "",
        "",
    ]
    content, calls = stream.finish()
    assert content == "" and calls[0]["function"] == {"name": "f", "arguments": "{}"}
    held = StreamedToolCalls()
    assert held.push("x <tool_call> oops") == "x " and held.finish() == ("<tool_call> oops", [])
