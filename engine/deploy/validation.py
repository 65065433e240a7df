"""OpenAI request bodies checked field by field, for `tunebench deploy`'s routes.

Each problem a client can cause becomes an ApiError naming the field (`param`) and what is
allowed, answered with OpenAI's error body and a 400 (404 for an unknown model). Parameters that
would change the answer and that this server does not implement are refused, not ignored.
Messages and tools come out in the form training gives the chat template (engine/core/tool_calls.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..core.context import prompt_overflow
from ..core.tool_calls import ToolFormatError, parse_tool_calls, parse_tools
from .batcher import SamplingOptions

# A request body past this is refused with 413 before it is read whole: 8 MiB holds a chat that
# fills any context this server loads (~2M tokens of text), even JSON-escaped.
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20

TEMPERATURE_RANGE = (0.0, 2.0)  # OpenAI's documented range
MAX_STOP_STRINGS = 4  # as OpenAI allows
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# OpenAI parameters that change what is generated and that this server does not implement: a
# request that sets one to anything but its neutral value is refused rather than half-answered.
UNSUPPORTED = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "functions": (None, []),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}


@dataclass(frozen=True)
class Defaults:
    """What a request that leaves a setting out gets: the server's --max_new_tokens and so on."""

    max_new_tokens: int
    temperature: float
    top_p: float


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


async def read_json(request: Any, max_bytes: int) -> dict[str, Any]:
    raw = await _read_body(request, max_bytes)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


async def _read_body(request: Any, max_bytes: int) -> bytes:
    """The body, refused with a 413 past `max_bytes` before more is read: a body held whole (and
    its parsed JSON, and its tokens) grows the server's memory for good."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(f"{int(declared):,} bytes", max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:  # no Content-Length (chunked), or one that understated it
            raise _too_large(f"more than {max_bytes:,} bytes", max_bytes)
    return bytes(body)


def _too_large(size: str, max_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is {size}; this server takes at most {max_bytes:,} bytes "
        "(--max_request_bytes): send a shorter prompt or conversation, or start the server with a "
        "larger --max_request_bytes",
        code="request_too_large",
    )


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's messages as the chat template takes them, in training's form (engine/core/
    tool_calls.py): {role, content}, plus "tool_calls" on an assistant message that calls tools."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400,
            '\'messages\' is required: a non-empty list of {"role": ..., "content": ...}',
            param="messages",
            code="missing_messages",
        )
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if role is None:
            raise ApiError(
                400, f"{where} has no role: give it one of system, user, assistant or tool", param=where
            )
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(
                400,
                f"{where}.role {role!r} is not supported: use system, user, assistant or tool",
                param=where,
            )
        if role == "assistant" and message.get("tool_calls"):
            # OpenAI sends a call's content as null (or leaves it out) when there is no text beside it.
            content = message.get("content")
            text = "" if content is None else _text_content(content, where)
            out.append({"role": role, "content": text, "tool_calls": _calls(message["tool_calls"], where)})
            continue
        if role == "tool" and not (out and (out[-1]["role"] == "tool" or out[-1].get("tool_calls"))):
            raise ApiError(
                400,
                f"{where} is a tool result, but no assistant message with tool_calls comes before it",
                param=where,
            )
        out.append({"role": role, "content": _text_content(message.get("content"), where)})
    return out


def _calls(value: Any, where: str) -> list[dict]:
    try:
        return parse_tool_calls(value)
    except ToolFormatError as exc:
        raise ApiError(400, f"{where}: {exc}", param=f"{where}.tool_calls") from None


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, f"{where}.content: only text parts are supported", param=where)
            if not isinstance(part.get("text"), str):
                raise ApiError(
                    400,
                    f"{where}.content[{j}] is a text part without a string 'text' "
                    f"(got {_as_json(part.get('text'))})",
                    param=where,
                )
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=where)


def chat_tools(body: dict[str, Any]) -> tuple[list[dict], bool]:
    """The request's tools, in the form the chat template takes (engine/core/tool_calls.py's), and
    whether the answer is read for calls: tool_choice "auto" (the default with tools) or "none"
    (the tools stay in the prompt, the answer stays text). A call forced by "required" or a named
    function needs constrained decoding, which this server does not do: refused, not ignored."""
    try:
        tools = parse_tools(body.get("tools"))
    except ToolFormatError as exc:
        raise ApiError(400, str(exc), param="tools") from None
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise ApiError(
            400,
            f'tool_choice {_as_json(choice)} is not supported: this server supports only "auto" '
            '(the model decides; the default) and "none"',
            param="tool_choice",
        )
    return tools, bool(tools) and choice != "none"


MAX_PROMPTS = 256  # prompts in one /v1/completions request (each is a sequence of the batch)


def completion_prompts(body: dict[str, Any], vocab_size: int) -> list[str | list[int]]:
    """The request's prompts, as OpenAI's API takes them: a string, a list of token ids, or a
    list of either (eval harnesses send a batch of prompts in one request)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(
            400,
            "'prompt' is required: a string (or a list of token ids, or a list of those)",
            param="prompt",
            code="missing_prompt",
        )
    if isinstance(prompt, str) or _token_ids(prompt):
        return [_one_prompt(prompt, "prompt", vocab_size)]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(
            400,
            f"'prompt' must be a string, a list of token ids, or a list of those (got {_as_json(prompt)})",
            param="prompt",
        )
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(
            400, f"'prompt' holds {len(prompt)} prompts; at most {MAX_PROMPTS} a request", param="prompt"
        )
    return [_one_prompt(p, f"prompt[{i}]", vocab_size) for i, p in enumerate(prompt)]


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _one_prompt(prompt: Any, where: str, vocab_size: int) -> str | list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, f"'{where}' is empty", param="prompt")
        return prompt
    if not _token_ids(prompt):
        raise ApiError(
            400, f"'{where}' must be a string or a list of token ids (got {_as_json(prompt)})", param="prompt"
        )
    wrong = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if wrong is not None:
        raise ApiError(
            400,
            f"token id {wrong} in '{where}' is out of the vocabulary: ids run from 0 to {vocab_size - 1}",
            param="prompt",
        )
    return list(prompt)


def _as_json(value: Any) -> str:
    """A request's value as the client wrote it (true, not Python's True), cut short."""
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def _is(value: Any, neutral: Any) -> bool:
    """value == neutral, without Python's True == 1: JSON's true is not the number 1."""
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


def check_unsupported(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and not _is(n, 1):
        raise ApiError(400, f"n={_as_json(n)}: this server returns one choice per request (n=1)", param="n")
    for name, neutral in UNSUPPORTED.items():
        if name not in body:
            continue
        value = body[name]
        allowed = neutral if isinstance(neutral, tuple) else (neutral, None)
        if not any(_is(value, a) for a in allowed):
            raise ApiError(400, f"{name!r} is not supported by this server; leave it out", param=name)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, 'only response_format {"type": "text"} is supported', param="response_format")


def sampling_options(
    body: dict[str, Any],
    prompt_tokens: int,
    defaults: Defaults,
    max_model_len: int,
    model_context: int | None = None,
) -> SamplingOptions:
    """The request's sampling settings, each checked, with the server's defaults for the rest.
    `model_context`: the model's own context length, past which --max_model_len cannot go."""
    problem = prompt_overflow(prompt_tokens, max_model_len)
    if problem:
        grow = ""
        if model_context is None or max_model_len < model_context:
            upto = f" (up to the model's {model_context})" if model_context else ""
            grow = f", or start the server with a larger --max_model_len{upto}"
        raise ApiError(
            400,
            f"{problem}: shorten it{grow}",
            param="messages" if "messages" in body else "prompt",
            code="context_length_exceeded",
        )
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, int, 1, None)
    if max_tokens is None:
        max_tokens = min(defaults.max_new_tokens, max_model_len - prompt_tokens)
    elif prompt_tokens + max_tokens > max_model_len:
        raise ApiError(
            400,
            f"this model's maximum context length is {max_model_len} tokens, but "
            f"{prompt_tokens + max_tokens} were requested ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion): lower {key} to at most {max_model_len - prompt_tokens}",
            param=key,
            code="context_length_exceeded",
        )
    temperature = _number(body, "temperature", float, *TEMPERATURE_RANGE)
    top_p = _number(body, "top_p", float, 0.0, 1.0, exclusive_low=True)
    seed = _number(body, "seed", int, *SEED_RANGE)
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        seed=seed,
        stop=_stop_strings(body),
        ignore_eos=flag(body, "ignore_eos"),
    )


def _number(
    body: dict[str, Any],
    name: str,
    kind: type,
    low: float | None,
    high: float | None,
    exclusive_low: bool = False,
) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if kind is int and isinstance(value, float) and value.is_integer() and abs(value) >= 2**63:
        # JSON's parser hands a whole number past 64 bits over as a float
        raise ApiError(400, f"'{name}' is out of range (got {_as_json(value)})", param=name)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        word = "a whole number" if kind is int else "a number"
        raise ApiError(400, f"'{name}' must be {word} (got {_as_json(value)})", param=name)
    if (
        value != value
        or (low is not None and (value <= low if exclusive_low else value < low))
        or (high is not None and value > high)
    ):
        low_text = "" if low is None else f"{'more than' if exclusive_low else 'at least'} {low}"
        high_text = "" if high is None else f"at most {high}"
        allowed = " and ".join(t for t in (low_text, high_text) if t)
        raise ApiError(400, f"'{name}' must be {allowed} (got {_as_json(value)})", param=name)
    return kind(value)


def _stop_strings(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(
            400, f"'stop' takes at most {MAX_STOP_STRINGS} strings (got {len(stops)})", param="stop"
        )
    if "" in stops:
        # An empty stop string matches at once: every answer would be empty.
        which = (
            "is an empty string"
            if isinstance(stop, str)
            else f"has an empty string (stop[{stops.index('')}])"
        )
        raise ApiError(
            400,
            f"'stop' {which}: each stop string needs at least one character; leave the empty one out",
            param="stop",
        )
    return tuple(stops)


def flag(body: dict[str, Any], name: str, where: str = "") -> bool:
    if not isinstance(body, dict):
        raise ApiError(400, f"'{where}' must be an object", param=where)
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false (got {_as_json(value)})", param=where or name)
    return value
