"""`tunebench deploy` against real clients: the official openai package, curl and raw HTTP, talking
to a real uvicorn server on 127.0.0.1 (a free port) that serves a tiny model and two adapters."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest
import torch
from test_generate import QUESTION, greedy, make_run
from tunebench.engine.cli.main import main as tunebench
from tunebench.engine.deploy.deployment import Deployment, bind_socket, is_loopback
from tunebench.engine.deploy.served import AdapterSpec, plan_deployment
from tunebench.engine.infer.prompts import StopText

MAX_MODEL_LEN = 256
MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deploy-runs")
    return {
        "bob": make_run(
            root, tiny_model_dir, "bob", seed=2, system="You are Bob, made by the TuneBench team."
        ),
        "plain": make_run(root, tiny_model_dir, "plain", seed=1),
    }


def start(plan, **options) -> tuple[Deployment, str]:
    deployment = Deployment.load(plan, max_model_len=MAX_MODEL_LEN, torch_dtype="float32", **options)
    return deployment, deployment.start_in_thread(bind_socket("127.0.0.1", 0))


@pytest.fixture(scope="module")
def plan(tiny_model_dir, runs):
    adapters = [AdapterSpec("bob", str(runs["bob"])), AdapterSpec("plain", str(runs["plain"]))]
    return plan_deployment(str(tiny_model_dir), adapters, served_model_name="tiny")


@pytest.fixture(scope="module")
def server(plan):
    deployment, url = start(
        plan, max_new_tokens=16, max_num_seqs=4, max_queue=8, max_request_bytes=MAX_REQUEST_BYTES
    )
    yield deployment, url
    deployment.stop()


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for_metric(url: str, name: str, at_least: float, timeout: float = 30.0) -> None:
    """Until /metrics shows `name` at `at_least` or more (a request running, or queued)."""
    deadline = time.monotonic() + timeout
    while metrics(url)[name] < at_least:
        assert time.monotonic() < deadline, f"{name} never reached {at_least}"
        time.sleep(0.01)


def sse_events(raw: str) -> list[str]:
    return [line[len("data: ") :] for line in raw.splitlines() if line.startswith("data: ")]


# ---------------------------------------------------------------- the official openai client


def test_models_lists_the_base_and_each_adapter(client):
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["tiny", "bob", "plain"]
    assert models["bob"].model_extra["parent"] == "tiny" and models["tiny"].model_extra["parent"] is None
    # One model's card, as the client's models.retrieve asks for it (it was a 404 "no such route").
    assert client.models.retrieve("bob").model_extra == models["bob"].model_extra
    from openai import NotFoundError

    with pytest.raises(NotFoundError, match="does not exist here"):
        client.models.retrieve("nobody")


def test_chat_answers_as_tunebench_chat_does_for_the_base_and_each_adapter(client, runs, tiny_model_dir):
    """The served answer is the engine's side-by-side answer: same run system prompt and template
    (the base with the first adapter's, as `tunebench chat --compare` asks it), same greedy tokens."""
    from tunebench.engine.infer.generate import GenerationSession

    session = GenerationSession(str(tiny_model_dir), torch_dtype="float32")
    bob, plain = str(runs["bob"]), str(runs["plain"])
    expected = session.generate(QUESTION, ["base", bob], greedy(12))
    expected_plain = session.generate(QUESTION, [plain], greedy(12))[plain]
    for name, want in (("tiny", expected["base"]), ("bob", expected[bob]), ("plain", expected_plain)):
        reply = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=12, temperature=0)
        assert reply.model == name
        assert reply.choices[0].message.content == want["text"], name
        assert reply.choices[0].finish_reason == ("length" if want["finish_reason"] == "length" else "stop")
        assert reply.usage.completion_tokens == want["tokens"]
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + want["tokens"]
    assert expected["base"]["text"] != expected[bob]["text"]  # the adapter really changes the answer


def test_chat_prompt_uses_the_runs_system_prompt_unless_the_request_brings_one(server):
    deployment, _ = server
    served = deployment.served
    with_run_system = served.encode_chat("bob", QUESTION)
    text = served.tokenizer.decode(with_run_system)
    assert "You are Bob, made by the TuneBench team." in text
    own = served.encode_chat("bob", [{"role": "system", "content": "Be brief."}, *QUESTION])
    assert "Be brief." in served.tokenizer.decode(own) and "Bob" not in served.tokenizer.decode(own)


def test_template_flag_renders_every_names_prompts_with_it(plan, server, capsys):
    """--template llama3: the base and each adapter are prompted in Llama 3's format, their runs'
    system prompts kept; an unknown name is refused before anything loads."""
    from tunebench.engine.deploy.served import load_served
    from tunebench.engine.infer.prompts import encode_prompt

    served = load_served(plan, template="llama3", torch_dtype="float32")
    for name in ("tiny", "bob", "plain"):
        target = served.targets[name]
        assert served.encode_chat(name, QUESTION) == encode_prompt(
            served.tokenizer, QUESTION, "llama3", target.system
        ), name
    assert served.encode_chat("bob", QUESTION) != server[0].served.encode_chat("bob", QUESTION)
    assert "Bob" in served.tokenizer.decode(served.encode_chat("bob", QUESTION))
    assert tunebench(["deploy", "--model", "demo", "--template", "vicuna"]) == 2
    err = capsys.readouterr().err
    assert "--template: unknown chat template 'vicuna'" in err and "chatml, qwen, llama3" in err


def test_streaming_gives_the_same_answer_in_openai_chunks(client):
    whole = client.chat.completions.create(model="bob", messages=QUESTION, max_tokens=14)
    chunks = list(
        client.chat.completions.create(
            model="bob", messages=QUESTION, max_tokens=14, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # streamed, not one lump


def test_stop_strings_cut_the_answer(client):
    whole = client.chat.completions.create(model="bob", messages=QUESTION, max_tokens=16).choices[0].message
    text = whole.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick another cut of {text!r}"
    expected = text[: text.find(stop)]
    cut = client.chat.completions.create(model="bob", messages=QUESTION, max_tokens=16, stop=[stop, "zzz"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="bob", messages=QUESTION, max_tokens=16, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_seed_makes_sampling_repeatable(client):
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model="plain", messages=QUESTION, max_tokens=12, temperature=1.5, top_p=0.95, seed=seed
        )
        return reply.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_unknown_model_is_404_for_the_openai_client(client):
    import openai

    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nobody", messages=QUESTION)
    error = caught.value.body
    assert error["code"] == "model_not_found" and "tiny, bob, plain" in error["message"]


# ---------------------------------------------------------------- curl


def curl(url: str, payload: dict, *extra: str) -> str:
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            f"{url}/v1/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(payload),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_ignore_eos_decodes_every_requested_token(url):
    """vLLM's ignore_eos extension (the benchmark uses it): the answer is max_tokens long."""
    payload = {"model": "bob", "prompt": "Hi", "max_tokens": 40, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=payload).json()
    assert (
        response["usage"]["completion_tokens"] == 40 and response["choices"][0]["finish_reason"] == "length"
    )


def test_a_batch_of_prompts_gets_a_choice_each_in_order(client, server):
    """OpenAI's list of prompts (eval harnesses send batches): one choice per prompt at its index,
    each the answer the prompt gets alone, whole and streamed; the usage summed. It was a 400."""
    served = server[0].served
    prompts = ["Who are you? I am", served.encode_text("The capital of France is"), "Hi"]
    alone = [client.completions.create(model="bob", prompt=p, max_tokens=6) for p in prompts]
    batch = client.completions.create(model="bob", prompt=prompts, max_tokens=6)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    texts, finished, usage = ["", "", ""], [None] * 3, None
    for chunk in client.completions.create(
        model="bob", prompt=prompts, max_tokens=6, stream=True, stream_options={"include_usage": True}
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finished[choice.index] = choice.finish_reason or finished[choice.index]
        usage = chunk.usage or usage
    assert texts == [c.text for c in batch.choices]
    assert finished == [c.finish_reason for c in batch.choices]
    assert usage.completion_tokens == batch.usage.completion_tokens
    # More than the server ever takes at once (4 decoding + 8 waiting): a 400 saying so, not a 429.
    too_many = httpx.post(
        f"{client.base_url}completions", json={"model": "bob", "prompt": ["Hi"] * 13, "max_tokens": 2}
    )
    assert too_many.status_code == 400 and "takes at most 12 at once" in too_many.json()["error"]["message"]


def test_curl_completions_whole_and_streamed(url, server):
    served = server[0].served
    payload = {"model": "bob", "prompt": "Who are you? I am", "max_tokens": 10}
    whole = json.loads(curl(url, payload))
    assert whole["object"] == "text_completion" and whole["model"] == "bob"
    usage = whole["usage"]
    assert usage["prompt_tokens"] == len(served.encode_text("Who are you? I am"))
    assert 0 < usage["completion_tokens"] <= 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    events = sse_events(curl(url, {**payload, "stream": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


# ---------------------------------------------------------------- batching


def test_concurrent_requests_answer_as_they_do_one_at_a_time(client, url):
    """Eight requests for the base and both adapters, with prompts and lengths that make them join
    and leave the batch at different steps: each answer equals the same request sent alone."""
    asks = [
        (name, [{"role": "user", "content": question}], tokens)
        for name, question, tokens in [
            ("tiny", "Who are you?", 16),
            ("bob", "Who are you?", 9),
            ("plain", "What is your name?", 14),
            ("bob", "Write a poem about the sea.", 16),
            ("tiny", "你是谁？", 5),
            ("plain", "Who made you?", 12),
            ("bob", "Translate the sentence.", 16),
            ("tiny", "Hello!", 11),
        ]
    ]

    def ask(item):
        name, messages, tokens = item
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=tokens)
        return reply.choices[0].message.content, reply.usage.completion_tokens

    alone = [ask(item) for item in asks]
    before = metrics(url)
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(ask, asks))
    after = metrics(url)
    assert together == alone
    steps = after["tunebench_decode_steps_total"] - before["tunebench_decode_steps_total"]
    rows = after["tunebench_decode_rows_total"] - before["tunebench_decode_rows_total"]
    assert rows / steps > 2.0, "the requests were not decoded together"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("payload", "status", "param", "code"),
    [
        (b"{not json", 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, "invalid_json"),
        ({"model": "tiny"}, 400, "messages", "missing_messages"),
        ({"model": "tiny", "messages": []}, 400, "messages", "missing_messages"),
        ({"messages": QUESTION}, 400, "model", "missing_model"),
        ({"model": 123, "messages": QUESTION}, 400, "model", "invalid_model"),
        (
            {"model": "tiny", "messages": QUESTION, "stream_options": {"include_usage": True}},
            400,
            "stream_options",
            None,
        ),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "seed": 1'
            + b"0" * 30
            + b"}",
            400,
            "seed",
            None,
        ),
        ({"model": "tiny", "messages": QUESTION, "seed": 2**64}, 400, "seed", None),
        ({"model": "nobody", "messages": QUESTION}, 404, "model", "model_not_found"),
        ({"model": "tiny", "messages": QUESTION, "temperature": 2.5}, 400, "temperature", None),
        ({"model": "tiny", "messages": QUESTION, "temperature": "hot"}, 400, "temperature", None),
        ({"model": "tiny", "messages": QUESTION, "top_p": 0}, 400, "top_p", None),
        ({"model": "tiny", "messages": QUESTION, "n": 2}, 400, "n", None),
        ({"model": "tiny", "messages": QUESTION, "n": True}, 400, "n", None),  # JSON true is not 1
        ({"model": "tiny", "messages": QUESTION, "best_of": True}, 400, "best_of", None),
        ({"model": "tiny", "messages": QUESTION, "stop": ["\n", ""]}, 400, "stop", None),
        ({"model": "tiny", "messages": QUESTION, "stop": ""}, 400, "stop", None),
        ({"model": "tiny", "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens", None),
        (
            {"model": "tiny", "messages": QUESTION, "max_tokens": MAX_MODEL_LEN},
            400,
            "max_tokens",
            "context_length_exceeded",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "Who? " * 300}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
        ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]", None),
        ({"model": "tiny", "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ({"model": "tiny", "messages": QUESTION, "logprobs": True}, 400, "logprobs", None),
    ],
)
def test_bad_requests_get_openai_error_bodies(url, payload, status, param, code):
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = httpx.post(
        f"{url}/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code and error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "payload", "said"),
    [
        ("chat/completions", {"n": True}, "n=true: this server returns one choice"),
        ("chat/completions", {"stop": ""}, "'stop' is an empty string: each stop string"),
        ("chat/completions", {"stop": ["a", ""]}, "'stop' has an empty string (stop[1])"),
        (
            "completions",
            {"prompt": True},
            "'prompt' must be a string, a list of token ids, or a list of those (got true)",
        ),
        (
            "completions",
            {"prompt": ["Hi", 3.5]},
            "'prompt[1]' must be a string or a list of token ids (got 3.5)",
        ),
    ],
)
def test_a_refused_value_is_named_as_the_client_wrote_it(url, path, payload, said):
    """JSON's spelling (true, not Python's True), and a value that was sent is not 'required'."""
    body = {"model": "tiny", **({"messages": QUESTION} if path.startswith("chat") else {}), **payload}
    response = httpx.post(f"{url}/v1/{path}", json=body)
    assert response.status_code == 400 and said in response.json()["error"]["message"]


def test_completion_prompt_longer_than_the_context_is_400(url, plan):
    response = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "Hello! " * 400})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    message = response.json()["error"]["message"]
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in message
    assert f"larger --max_model_len (up to the model's {plan.context_length})" in message


def test_a_server_at_the_models_whole_context_does_not_advise_a_larger_one():
    from tunebench.engine.deploy.validation import ApiError, Defaults, sampling_options

    with pytest.raises(ApiError) as err:
        sampling_options({"prompt": "x"}, 600, Defaults(16, 0.0, 1.0), 512, model_context=512)
    assert err.value.message.endswith(": shorten it"), err.value.message


@pytest.mark.parametrize("token", [-1, 10**9])
def test_completion_token_ids_outside_the_vocabulary_are_400(url, token):
    """They reached the embedding and came back as a 500 "IndexError" (a stream: 200, then an error)."""
    for stream in (False, True):
        response = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": [1, token], "max_tokens": 2, "stream": stream},
        )
        assert response.status_code == 400, response.text
        assert f"token id {token} in 'prompt' is out of the vocabulary" in response.json()["error"]["message"]


def assert_too_large(status: int, body: dict) -> None:
    assert status == 413
    error = body["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert (
        f"at most {MAX_REQUEST_BYTES:,} bytes" in error["message"]
        and "--max_request_bytes" in error["message"]
    )


def test_a_body_past_max_request_bytes_is_413_before_it_is_read(url, tmp_path):
    """A 60 MB request held 6-7 GB of the server's memory for good: now it is refused at once."""
    huge = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 2_000_000}]})
    response = httpx.post(
        f"{url}/v1/chat/completions", content=huge, headers={"Content-Type": "application/json"}
    )
    assert_too_large(response.status_code, response.json())
    # No Content-Length (chunked): refused once what arrived passes the limit.
    chunks = (huge[i : i + 16384].encode() for i in range(0, len(huge), 16384))
    response = httpx.post(f"{url}/v1/chat/completions", content=chunks)
    assert_too_large(response.status_code, response.json())
    # curl, as a person would send a file
    (tmp_path / "big.json").write_text(huge)
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            f"{url}/v1/completions",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            f"@{tmp_path / 'big.json'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    body, status = out.rsplit("\n", 1)
    assert_too_large(int(status), json.loads(body))
    # The answer comes before the body: a Content-Length of 60 MB and no body sent at all.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 60000000\r\n\r\n"
        )
        assert raw.recv(65536).startswith(b"HTTP/1.1 413 ")
    # Under the limit it answers as ever.
    ok = httpx.post(
        f"{url}/v1/chat/completions", json={"model": "tiny", "messages": QUESTION, "max_tokens": 2}
    )
    assert ok.status_code == 200


def test_unknown_route_and_method_get_openai_error_bodies(url):
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["code"] == "not_found"
    response = httpx.get(f"{url}/v1/chat/completions")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_api_key_is_required_when_set(plan, monkeypatch):
    deployment, url = start(plan, api_key="sesame")
    try:
        from openai import AuthenticationError, OpenAI

        # The printed curl line works once the key is in the environment; the key is not printed.
        (try_it,) = [line for line in deployment.describe(url).splitlines() if line.startswith("try it")]
        assert "sesame" not in deployment.describe(url)
        # Given as --api_key, the key is not in the person's shell: the banner says to export it.
        monkeypatch.delenv("TUNEBENCH_API_KEY", raising=False)
        assert "export TUNEBENCH_API_KEY=KEY, then the curl line" in deployment.describe(url)
        monkeypatch.setenv("TUNEBENCH_API_KEY", "sesame")
        assert "export" not in deployment.describe(url)
        command = try_it.removeprefix("try it").replace('"Who are you?"}]', '"Hi"}], "max_tokens": 2')
        answer = subprocess.run(
            ["bash", "-c", command],
            env={**os.environ, "TUNEBENCH_API_KEY": "sesame"},
            capture_output=True,
            text=True,
        )
        assert json.loads(answer.stdout)["usage"]["completion_tokens"] == 2, answer.stdout

        missing = httpx.get(f"{url}/v1/models")
        assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
        empty = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer"})  # the variable unset
        assert empty.status_code == 401 and empty.json()["error"]["message"].startswith("no API key")
        wrong = OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(AuthenticationError):
            wrong.chat.completions.create(model="tiny", messages=QUESTION)
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        right = OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert right.chat.completions.create(
            model="tiny", messages=QUESTION, max_tokens=3
        ).usage.completion_tokens
    finally:
        deployment.stop()


def gate_steps(deployment: Deployment, delay: float = 0.0) -> threading.Event:
    """Hold (or slow) the batcher's decode steps so a test controls how long requests run."""
    gate = threading.Event()
    step = deployment.batcher._step

    def gated_step() -> None:
        gate.wait(10)
        time.sleep(delay)
        step()

    deployment.batcher._step = gated_step
    return gate


def test_a_long_prompt_is_prefilled_in_pieces_with_the_same_keys_and_logits(server, monkeypatch):
    """Pieces of 16 tokens give the keys, values and last logits of the whole prompt at once."""
    import torch
    from tunebench.engine.deploy import batcher as batching

    batcher = server[0].batcher
    prompt = list(range(5, 105))  # 100 tokens: 7 pieces
    with torch.inference_mode():
        whole_logits, whole_kv = batcher._prefill("a0", prompt)
        monkeypatch.setattr(batching, "PREFILL_CHUNK_TOKENS", 16)
        between = []
        logits, kv = batcher._prefill("a0", prompt, between=lambda: between.append(1) or True)
    assert len(between) == 6  # after every piece but the last
    torch.testing.assert_close(logits, whole_logits, atol=1e-4, rtol=1e-4)
    for (keys, values), (whole_keys, whole_values) in zip(kv, whole_kv, strict=True):
        assert keys.shape == whole_keys.shape == (1, whole_keys.shape[1], 100, whole_keys.shape[3])
        torch.testing.assert_close(keys, whole_keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, whole_values, atol=1e-4, rtol=1e-4)


def test_running_streams_keep_decoding_while_a_long_prompt_prefills(plan, monkeypatch):
    """A stream in flight gets a decode step between every two pieces of a newcomer's long
    prefill, instead of waiting for all of it; the newcomer's answer is the one it gets alone."""
    from tunebench.engine.deploy import batcher as batching

    monkeypatch.setattr(batching, "PREFILL_CHUNK_TOKENS", 16)
    deployment, url = start(plan, max_num_seqs=2, max_new_tokens=120)
    gate_steps(deployment, delay=0.01).set()  # 120 tokens take over a second
    batcher, steps_between = deployment.batcher, []
    between = batcher._between_pieces

    def counted(row):
        before = batcher.metrics.decode_steps
        going_on = between(row)
        steps_between.append(batcher.metrics.decode_steps - before)
        return going_on

    batcher._between_pieces = counted
    long_prompt = {"model": "bob", "prompt": list(range(5, 105)), "max_tokens": 3, "temperature": 0}
    try:
        alone = httpx.post(f"{url}/v1/completions", json=long_prompt, timeout=30).json()
        payload = {"model": "tiny", "messages": QUESTION, "stream": True, "max_tokens": 120}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=payload, timeout=30) as response:
            lines = response.iter_lines()
            while '"content":"' not in next(lines).replace('"content":""', ""):
                pass  # until the first stream's first token: it is decoding
            steps_between.clear()  # its own prompt's pieces, with nothing else to decode
            beside = httpx.post(f"{url}/v1/completions", json=long_prompt, timeout=30).json()
            rest = list(lines)
        assert steps_between == [1] * 6, steps_between
        assert beside["choices"][0]["text"] == alone["choices"][0]["text"]
        assert [line for line in rest if line][-1] == "data: [DONE]"
    finally:
        deployment.stop()


def test_requests_waiting_behind_a_long_prefill_still_count_against_the_limit(plan, monkeypatch):
    """Two long prompts taken off the queue together: while the first prefills in pieces, the
    second is neither queued nor decoding. /metrics lost it between pieces, and a request past
    --max_num_seqs + --max_queue got in instead of a 429."""
    from tunebench.engine.deploy import batcher as batching

    monkeypatch.setattr(batching, "PREFILL_CHUNK_TOKENS", 16)
    deployment, url = start(plan, max_num_seqs=3, max_queue=0, max_new_tokens=40)
    gate = gate_steps(deployment)  # the first stream's decode step waits: the long prompts queue up
    batcher, seen = deployment.batcher, []
    between = batcher._between_pieces

    def look(row):
        going_on = between(row)  # a decode step for the first stream, and the counts it sets
        if len(row.seq.prompt) == 100 and not seen:  # the first long prompt, the other behind it
            running = metrics(url)["tunebench_requests_running"]
            try:
                extra = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi"}, timeout=2)
            except httpx.ReadTimeout:  # let in, and queued behind this very thread
                seen.append((running, "queued"))
            else:
                seen.append((running, extra.status_code))
        return going_on

    batcher._between_pieces = look
    long_prompt = {"model": "bob", "prompt": list(range(5, 105)), "max_tokens": 2, "temperature": 0}
    try:
        payload = {"model": "tiny", "messages": QUESTION, "max_tokens": 40}
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=payload, timeout=30)
            wait_for_metric(url, "tunebench_requests_running", 1)
            longs = [
                pool.submit(httpx.post, f"{url}/v1/completions", json=long_prompt, timeout=30) for _ in "ab"
            ]
            wait_for_metric(url, "tunebench_requests_waiting", 2)
            gate.set()
            assert [r.result().status_code for r in (first, *longs)] == [200, 200, 200]
        assert seen == [(3, 429)]
    finally:
        gate.set()
        deployment.stop()


def test_queue_full_is_429(plan):
    deployment, url = start(plan, max_num_seqs=1, max_queue=1, max_new_tokens=4)
    gate = gate_steps(deployment)
    try:
        payload = {"model": "tiny", "messages": QUESTION}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=payload, timeout=30)
            wait_for_metric(url, "tunebench_requests_running", 1)
            second = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=payload, timeout=30)
            wait_for_metric(url, "tunebench_requests_waiting", 1)
            third = httpx.post(f"{url}/v1/chat/completions", json=payload)
            assert third.status_code == 429 and third.headers["retry-after"] == "1"
            error = third.json()["error"]
            assert error["code"] == "queue_full" and "(--max_num_seqs 1 + --max_queue 1)" in error["message"]
            assert "2 requests are in (1 decoding, 1 waiting to start)" in error["message"]
            gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert metrics(url)["tunebench_requests_rejected_total"] == 1
    finally:
        gate.set()
        deployment.stop()


@pytest.mark.parametrize("stream", [True, False])
def test_client_gone_cancels_the_work_and_frees_the_slot(plan, stream):
    deployment, url = start(plan, max_num_seqs=1, max_new_tokens=200)
    gate = gate_steps(deployment, delay=0.02)  # 200 tokens would take 4 s
    gate.set()
    try:
        payload = {"model": "bob", "messages": QUESTION, "stream": stream}
        if stream:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=0.3)
        deadline = time.monotonic() + 5
        while (
            metrics(url).get('tunebench_requests_finished_total{model="bob",finish_reason="cancelled"}') != 1
        ):
            assert time.monotonic() < deadline, "the request was not cancelled"
            time.sleep(0.05)
        numbers = metrics(url)
        assert (
            numbers["tunebench_requests_running"] == 0 and numbers["tunebench_generation_tokens_total"] < 100
        )
        # The freed slot serves the next request at once.
        reply = httpx.post(f"{url}/v1/chat/completions", json={**payload, "stream": False, "max_tokens": 3})
        assert reply.json()["usage"]["completion_tokens"] == 3
    finally:
        deployment.stop()


def test_a_client_that_leaves_while_queued_is_counted_and_frees_its_place(plan):
    deployment, url = start(plan, max_num_seqs=1, max_queue=1, max_new_tokens=200)
    gate = gate_steps(deployment, delay=0.02)
    gate.set()
    try:
        long = {"model": "tiny", "messages": QUESTION, "max_tokens": 200}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=long, timeout=30)
            wait_for_metric(url, "tunebench_requests_running", 1)
            queued = {"model": "bob", "messages": QUESTION, "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=queued) as response:
                assert next(response.iter_lines()).startswith("data: ")  # the role chunk, sent while queued
            deadline = time.monotonic() + 10
            while (
                metrics(url).get('tunebench_requests_finished_total{model="bob",finish_reason="cancelled"}')
                != 1
            ):
                assert time.monotonic() < deadline, "the queued request was not counted as cancelled"
                time.sleep(0.02)
            numbers = metrics(url)
            assert numbers["tunebench_requests_waiting"] == 0 and numbers["tunebench_requests_running"] == 1
            # Its place in the queue (max_queue 1) is free again.
            second = pool.submit(
                httpx.post, f"{url}/v1/chat/completions", json={**long, "max_tokens": 2}, timeout=30
            )
            assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        deployment.stop()


def test_stopping_the_server_ends_open_answers_with_an_error_and_done(plan):
    """Ctrl-C with answers open: a stream ends with an error chunk and [DONE] (the openai client
    raises, saying why), a whole answer gets 503; before, both were cut after the grace period
    with an ASGI traceback."""
    from openai import APIError, OpenAI

    deployment, url = start(plan, max_num_seqs=4, max_new_tokens=400)
    gate = gate_steps(deployment, delay=0.05)  # 400 tokens would take 20 s
    gate.set()
    payload = {"model": "bob", "messages": QUESTION, "ignore_eos": True}
    client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

    def raw_stream() -> list[str]:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**payload, "stream": True}) as response:
            return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]

    def openai_stream() -> str:
        text = ""
        try:
            asked = client.chat.completions.create(
                model="bob", messages=QUESTION, stream=True, extra_body={"ignore_eos": True}
            )
            for chunk in asked:
                text += chunk.choices[0].delta.content or ""
        except APIError as exc:
            return f"raised: {exc.message}"
        return "ended without an error"

    try:
        with ThreadPoolExecutor(3) as pool:
            streamed = pool.submit(raw_stream)
            with_openai = pool.submit(openai_stream)
            whole = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=payload, timeout=30)
            deadline = time.monotonic() + 10
            # all three decoding, with a few tokens streamed
            while (m := metrics(url))["tunebench_requests_running"] < 3 or m[
                "tunebench_generation_tokens_total"
            ] < 9:
                assert time.monotonic() < deadline, "the three requests did not start"
                time.sleep(0.02)
            deployment.stop()
            events = streamed.result(timeout=10)
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["type"] == "server_error" and "shutting down" in error["message"]
            assert len(events) > 3  # some answer came before the end
            assert "raised: the server is shutting down" in with_openai.result(timeout=10)
            response = whole.result(timeout=10)
            assert (
                response.status_code == 503
                and "send the request again" in response.json()["error"]["message"]
            )
    finally:
        gate.set()
        deployment.stop()


def test_ctrl_c_exits_130_without_a_traceback(tiny_model_dir):
    """`tunebench deploy` stopped with Ctrl-C says so in its exit status, as a shell expects (it
    was 0, as if it had ended by itself), also when it started with SIGINT ignored, as a job that a
    script starts with `&` does (uvicorn's re-raise then went nowhere; the end-to-end test below
    covers the usual handler)."""
    import signal

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunebench.engine.cli.main",
            "deploy",
            "--model",
            str(tiny_model_dir),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        for line in process.stderr:
            if line.startswith("listening on "):
                url = line.split()[2].removesuffix("/v1")
                break
        else:
            raise AssertionError("the server did not start")
        deadline = time.monotonic() + 30
        while True:  # listening is printed just before uvicorn listens
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.1)
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "Shutting down" in err
    # The access log keeps the request a person made, not the polls (the workbench's every second).
    assert '"GET /v1/models HTTP/1.1" 200' in out, out
    assert "GET /health" not in out and "GET /metrics" not in out, out


def test_health_and_metrics(url, client):
    assert httpx.get(f"{url}/health").json() == {
        "status": "ok",
        "models": ["tiny", "bob", "plain"],
        "running": 0,
        "waiting": 0,
    }
    before = metrics(url)
    client.chat.completions.create(model="plain", messages=QUESTION, max_tokens=5)
    after = metrics(url)
    key = 'tunebench_requests_finished_total{model="plain",finish_reason="length"}'
    assert after.get(key, 0) == before.get(key, 0) + 1
    assert after["tunebench_generation_tokens_total"] - before["tunebench_generation_tokens_total"] == 5
    assert after['tunebench_http_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert "tunebench_requests_waiting 0" in httpx.get(f"{url}/metrics").text


# ---------------------------------------------------------------- speed: what the GPU path needs


def spy_on_forward_passes(monkeypatch, deployment_of=lambda: None) -> list[tuple[int, int, int]]:
    """Every forward pass the batcher runs from now on: (rows, tokens per row, address of the
    first layer's key cache, 0 when there is none yet)."""
    from tunebench.engine.infer import decode_steps

    seen: list[tuple[int, int, int]] = []
    real = decode_steps.decode_forward

    def spy(model, cache, ids, mask, positions):
        deployment = deployment_of()
        row_cache = deployment.batcher._cache if deployment is not None else None
        seen.append((ids.shape[0], ids.shape[1], row_cache.keys[0].data_ptr() if row_cache else 0))
        return real(model, cache, ids, mask, positions)

    monkeypatch.setattr(decode_steps, "decode_forward", spy)
    return seen


def test_the_model_runs_every_path_before_the_server_listens(plan, monkeypatch):
    """The first forward passes pay start-up costs (CUDA, cuBLAS, the allocator; on CUDA each
    batch size's graph capture): they run when the server starts, not in a client's request. A
    prefill for each served name and a decode step at each batch size, none of it in the metrics."""
    seen = spy_on_forward_passes(monkeypatch)
    deployment, url = start(plan, max_num_seqs=4)
    try:
        prefills = [rows for rows, tokens, _ in seen if rows == 1]
        decode_batches = sorted(rows for rows, tokens, _ in seen if rows > 1)
        # On CUDA each batch size runs twice: once to warm up, once inside its graph's capture.
        runs_per_size = 2 if torch.cuda.is_available() else 1
        assert len(prefills) == 3 and decode_batches == [2] * runs_per_size + [4] * runs_per_size
        numbers = metrics(url)
        assert numbers["tunebench_decode_steps_total"] == 0
        assert numbers["tunebench_generation_tokens_total"] == 0
        assert numbers["tunebench_prompt_tokens_total"] == 0
    finally:
        deployment.stop()


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on CUDA the steps replay captured graphs, which no forward hook sees"
)
def test_rows_join_and_leave_without_moving_the_cache_or_changing_step_shapes(plan, monkeypatch):
    """What replaying a CUDA graph per batch size needs: while requests join and leave the batch,
    every decode step runs a batch size of the few the batcher has (padded with idle rows) and the
    KV cache stays where it is. Checked on the CPU, where the same steps run eagerly."""
    deployment, url = start(plan, max_num_seqs=4, max_new_tokens=16)
    sizes = deployment.batcher.batch_sizes
    seen = spy_on_forward_passes(monkeypatch, lambda: deployment)
    try:
        asks = [("tiny", 3), ("bob", 16), ("plain", 5), ("bob", 12), ("tiny", 8), ("plain", 2)]

        def ask(item):
            name, tokens = item
            payload = {"model": name, "messages": QUESTION, "max_tokens": tokens, "ignore_eos": True}
            return httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=60).status_code

        with ThreadPoolExecutor(len(asks)) as pool:
            assert list(pool.map(ask, asks)) == [200] * len(asks)
        steps = [(rows, address) for rows, tokens, address in seen if rows > 1]
        assert len(steps) >= 8
        assert {rows for rows, _ in steps} <= set(sizes) and len({rows for rows, _ in steps}) > 1
        assert len({address for _, address in steps}) == 1, "the KV cache moved"
    finally:
        deployment.stop()


# ---------------------------------------------------------------- pieces


def test_stop_text_holds_back_what_could_become_a_stop_string():
    stop = StopText(("END", "\n\n"))
    assert stop.push("Hello E") == ("Hello ", False)
    assert stop.push("N") == ("", False)
    assert stop.push("x") == ("ENx", False)
    assert stop.push(" more\n") == (" more", False)
    assert stop.push("\nlast") == ("", True)
    assert StopText(()).push("any") == ("any", False)


def test_loopback_rule():
    assert (
        is_loopback("127.0.0.1")
        and is_loopback("localhost")
        and is_loopback("::1")
        and is_loopback("127.8.0.1")
    )
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.com")


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("args", "named", "allowed"),
    [
        (["--port", "abc"], "--port", "not a whole number"),
        (["--port", "70000"], "--port", "at most 65535"),
        (["--max_request_bytes", "10"], "--max_request_bytes", "at least 1024"),
        (["--temperature", "3"], "--temperature", "at most 2.0"),
        (["--top_p", "0"], "--top_p", "more than 0.0"),
        (["--max_num_seqs", "0"], "--max_num_seqs", "at least 1"),
        (["--max_new_tokens", "-5"], "--max_new_tokens", "at least 1"),
        (["--infer_backend", "tgi"], "--infer_backend", "choose from"),
        (["--merge_lora", "true"], "--merge_lora", "only with --infer_backend vllm"),
        (["--host", "0.0.0.0"], "--host 0.0.0.0", "--api_key"),
        (["--adapters", "=runs/x"], "--adapters", "served model name"),
        (["--lora_rnak", "8"], "--lora_rnak", "unknown flag"),
    ],
)
def test_bad_flags_name_the_flag_and_what_is_allowed(capsys, args, named, allowed):
    try:
        code = tunebench(["deploy", *args])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert named in err and allowed in err and "Traceback" not in err


def test_open_host_without_key_says_why_and_what_to_do(capsys):
    assert tunebench(["deploy", "--host", "0.0.0.0", "--port", "9000"]) == 2
    err = capsys.readouterr().err
    assert "anyone who can reach 0.0.0.0:9000" in err
    assert "--api_key KEY" in err and "ssh -L 9000:127.0.0.1:9000" in err


def test_taken_port_fails_before_the_model_loads(capsys, tiny_model_dir):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    started = time.perf_counter()
    try:
        assert tunebench(["deploy", "--model", str(tiny_model_dir), "--port", str(port)]) == 2
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen there" in err and "--port (0 takes any free one)" in err
    assert time.perf_counter() - started < 5


def test_duplicate_served_names_are_refused(capsys, tiny_model_dir, runs):
    code = tunebench(
        ["deploy", "--model", str(tiny_model_dir), "--adapters", f"x={runs['bob']}", f"x={runs['plain']}"]
    )
    assert code == 2 and "'x' is given twice" in capsys.readouterr().err


# ---------------------------------------------------------------- vLLM hand-off


def test_vllm_command_line_serves_the_base_and_adapters_as_lora_modules(
    capsys, monkeypatch, tmp_path, tiny_model_dir, runs
):
    import shlex

    from tunebench.engine.deploy.vllm import vllm_available

    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path))  # where the chat template file goes
    if vllm_available():
        pytest.skip("vLLM is installed here: the hand-off would start it")
    code = tunebench(
        [
            "deploy",
            "--adapters",
            f"bob={runs['bob']}",
            f"plain={runs['plain']}",
            "--infer_backend",
            "vllm",
            "--served_model_name",
            "tiny",
            "--port",
            "8001",
            "--max_model_len",
            "256",
            "--temperature",
            "0.5",
            "--api_key",
            "sesame",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "vLLM is not installed" in err and "pip install vllm" in err and "sesame" not in err
    command = shlex.split(err.split("the command would be:\n  ", 1)[1].splitlines()[0])
    template = command[command.index("--chat-template") + 1]
    assert command[:3] == ["VLLM_API_KEY=...", sys.executable, "-m"]
    assert command[3:] == [
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_model_dir),
        "--served-model-name",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        "8001",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "8",
        "--chat-template",
        template,
        "--override-generation-config",
        '{"temperature": 0.5, "top_p": 1.0, "max_new_tokens": 512}',
        "--enable-lora",
        "--max-loras",
        "2",
        "--max-lora-rank",
        "8",
        "--lora-modules",
        f"bob={runs['bob'] / 'adapter'}",
        f"plain={runs['plain'] / 'adapter'}",
    ]
    # The run's system prompt reaches vLLM as the chat template's default.
    assert "You are Bob, made by the TuneBench team." in Path(template).read_text()


def test_vllm_reads_tool_calls_back_where_the_template_writes_them(
    capsys, monkeypatch, tmp_path, tiny_model_dir
):
    """A run trained with --template chatml (Qwen2.5's <tool_call> blocks): vLLM is told to parse
    them, as the pt backend does; the tiny tokenizer's own template has no tools, so no flag."""
    from tunebench.engine.deploy.vllm import vllm_available

    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path))
    if vllm_available():
        pytest.skip("vLLM is installed here: the hand-off would start it")
    agent = make_run(tmp_path / "runs", tiny_model_dir, "agent", seed=2, template="chatml")
    for adapter, parsed in ((agent, True), (None, False)):
        args = ["deploy", "--model", str(tiny_model_dir), "--infer_backend", "vllm"]
        assert tunebench(args + (["--adapters", f"agent={adapter}"] if adapter else [])) == 2
        command = capsys.readouterr().err.split("the command would be:\n  ", 1)[1].splitlines()[0].split()
        tools = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
        assert (" ".join(tools) in " ".join(command)) is parsed


def test_vllm_serves_a_run_trained_with_ms_swifts_template_name_with_the_tokenizers_own(
    capsys, monkeypatch, tmp_path, tiny_model_dir
):
    """--template qwen2_5 (copied from an ms-swift command) trained with the tokenizer's own
    template: vLLM gets no template of its own for it, as for a run without --template."""
    from tunebench.engine.deploy.vllm import vllm_available

    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path))
    if vllm_available():
        pytest.skip("vLLM is installed here: the hand-off would start it")
    run = make_run(tmp_path / "runs", tiny_model_dir, "copied", seed=2, template="qwen2_5")
    args = ["deploy", "--model", str(tiny_model_dir), "--infer_backend", "vllm"]
    args += ["--adapters", f"copied={run}"]
    assert tunebench(args) == 2
    command = capsys.readouterr().err.split("the command would be:\n  ", 1)[1].splitlines()[0].split()
    assert "--chat-template" not in command and "--lora-modules" in command


def test_a_copied_swift_deploy_line_reaches_vllm_with_its_engine_flags(capsys, monkeypatch, tmp_path, runs):
    """ms-swift's deploy line (--vllm_max_model_len, --vllm_gpu_memory_utilization, --lora_modules,
    --use_hf, ...) stopped at its first flag; vLLM's engine flags now reach vLLM as its own."""
    from tunebench.engine.deploy.vllm import vllm_available

    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path))
    if vllm_available():
        pytest.skip("vLLM is installed here: the hand-off would start it")
    line = f"deploy --lora_modules bob={runs['bob']} --infer_backend vllm --vllm_max_model_len 256 "
    line += (
        "--vllm_gpu_memory_utilization 0.85 --vllm_tensor_parallel_size 2 --vllm_enforce_eager "  # bare: true
    )
    line += "--vllm_max_num_seqs 16 --use_hf true --verbose true"
    assert tunebench(line.split()) == 2  # no vLLM here: the command it would run is said
    err = capsys.readouterr().err
    command = err.split("the command would be:\n  ", 1)[1].splitlines()[0].split()
    for flag, value in (("--max-model-len", "256"), ("--gpu-memory-utilization", "0.85")):
        assert command[command.index(flag) + 1] == value
    assert command[command.index("--tensor-parallel-size") + 1] == "2" and "--enforce-eager" in command
    assert command[command.index("--max-num-seqs") + 1] == "16"
    assert f"bob={runs['bob'] / 'adapter'}" in command
    assert "note: --use_hf true:" in err and "note: --verbose true:" in err


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("--tensor_parallel_size 2", "--tensor_parallel_size: 2 GPUs: the pt backend serves from one GPU"),
        ("--gpu_memory_utilization 1.5", "--gpu_memory_utilization: a fraction of the GPU's memory"),
        ("--enforce_eager maybe", "--enforce_eager: 'maybe' is not true or false"),
        ("--ssl_keyfile key.pem", "--ssl_keyfile: 'key.pem' is not done here: TLS comes from an SSH tunnel"),
    ],
)
def test_swift_deploy_flags_the_pt_backend_cannot_honour_are_refused_before_loading(capsys, line, said):
    assert tunebench(["deploy", "--model", "demo", *line.split()]) == 2
    err = capsys.readouterr().err
    assert said in err and "loading" not in err and "Traceback" not in err


def test_vllm_hand_off_execs_vllm_with_the_key_in_its_environment(tmp_path, tiny_model_dir, runs):
    """A stand-in `vllm` package on PYTHONPATH records how it was started: the process really is
    replaced by `python -m vllm.entrypoints.openai.api_server ...`, the key in VLLM_API_KEY."""
    server = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    server.mkdir(parents=True)
    for folder in (server, server.parent, server.parent.parent):
        (folder / "__init__.py").write_text("")
    (server / "api_server.py").write_text(
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'key': os.environ.get('VLLM_API_KEY')}))\n"
    )
    # The stand-in goes first on the path; what was there stays (the GPU box imports tunebench that way).
    path = os.pathsep.join(p for p in (str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TUNEBENCH_CACHE": str(tmp_path / "cache")}
    args = ["deploy", "--model", str(tiny_model_dir), "--adapters", f"bob={runs['bob']}"]
    args += ["--infer_backend", "vllm", "--host", "0.0.0.0", "--api_key", "sesame"]
    result = subprocess.run(
        [sys.executable, "-m", "tunebench.engine.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    started = json.loads(result.stdout.strip().splitlines()[-1])
    argv = started["argv"]
    assert started["key"] == "sesame" and "sesame" not in " ".join(argv)
    assert argv[argv.index("--model") + 1] == str(tiny_model_dir)
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--lora-modules") + 1] == f"bob={runs['bob'] / 'adapter'}"
    assert "handing over to vLLM" in result.stderr


def test_vllm_merged_command_serves_the_export(capsys, monkeypatch, tmp_path, runs):
    from tunebench.engine.deploy.vllm import vllm_available

    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path))  # where a chat template file goes
    if vllm_available():
        pytest.skip("vLLM is installed here: the hand-off would merge and start it")
    code = tunebench(
        ["deploy", "--adapters", f"mine={runs['bob']}", "--infer_backend", "vllm", "--merge_lora", "true"]
    )
    err = capsys.readouterr().err
    command = err.split("the command would be:\n  ", 1)[1].splitlines()[0].split()
    assert code == 2
    assert command[command.index("--model") + 1] == str(runs["bob"].parent.parent / "exports" / "bob")
    assert command[command.index("--served-model-name") + 1] == "mine"
    assert "--enable-lora" not in command and "--chat-template" not in command
    # --template overrides the template the export carries, as it does a run's
    args = ["deploy", "--adapters", f"mine={runs['bob']}", "--infer_backend", "vllm", "--merge_lora"]
    assert tunebench([*args, "true", "--template", "llama3"]) == 2
    command = capsys.readouterr().err.split("the command would be:\n  ", 1)[1].splitlines()[0].split()
    template = Path(command[command.index("--chat-template") + 1]).read_text()
    assert "<|start_header_id|>" in template and "You are Bob" in template


# ---------------------------------------------------------------- the demo model, end to end


@pytest.mark.slow
def test_demo_model_end_to_end_with_an_adapter(tmp_path):
    """`tunebench deploy --model demo --adapters mine=...` as its own process; the openai client
    asks the base and the adapter, curl asks for a completion, Ctrl-C stops it cleanly (130)."""
    import signal

    from openai import OpenAI
    from tunebench.engine.models.loading import resolve_model

    run = make_run(tmp_path, resolve_model("demo").path, "demo-run", seed=3, system="You are TuneBee.")
    config = json.loads((run / "config.json").read_text())
    config["config"]["model"] = "demo"
    (run / "config.json").write_text(json.dumps(config))
    port_holder = socket.socket()
    port_holder.bind(("127.0.0.1", 0))
    port = port_holder.getsockname()[1]
    port_holder.close()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunebench.engine.cli.main",
            "deploy",
            "--adapters",
            f"mine={run}",
            "--port",
            str(port),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:  # refused until the model has loaded
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["demo", "mine"]
        base = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=20)
        mine = client.chat.completions.create(model="mine", messages=QUESTION, max_tokens=20)
        assert base.usage.completion_tokens and mine.usage.completion_tokens
        assert base.choices[0].message.content != mine.choices[0].message.content
        streamed = client.chat.completions.create(model="mine", messages=QUESTION, max_tokens=20, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == mine.choices[0].message.content
        completion = json.loads(
            curl(url, {"model": "demo", "prompt": "The capital of France is", "max_tokens": 5})
        )
        assert "Paris" in completion["choices"][0]["text"]
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err  # 128 + SIGINT, as a shell reports a Ctrl-C
    assert "serving demo (base), mine (adapter" in err and "Traceback" not in err
