"""The tool-calling parts of a training record, as LLaMA-Factory's sharegpt (glaive: a `tools`
JSON text, `function_call` / `observation` turns) and OpenAI messages (`tools`, `tool_calls`,
`tool` messages) write them, in the one form chat templates take: `tools` as a list of
{"type": "function", "function": {name, description, parameters}}, and each call as
{"type": "function", "function": {"name": ..., "arguments": {...}}} with the arguments an object.

Torch-free and without imports of its own; engine/core/data.py places the errors (ToolFormatError)
in the record.
"""

from __future__ import annotations

import json
from typing import Any


class ToolFormatError(ValueError):
    """A tools field or a call that is not in a form this module reads; the message says why."""


def parse_tools(value: Any) -> list[dict]:
    """A record's `tools` (a list, or JSON text of one, as LLaMA-Factory writes it); [] for none."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = _json(value, "'tools'")
    if not isinstance(value, list):
        raise ToolFormatError(
            f"'tools' must be a list of function descriptions, found {type(value).__name__}"
        )
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise ToolFormatError(f"tools[{i}] must be an object describing a function")
        inner = tool.get("function")
        function: dict = inner if isinstance(inner, dict) else tool
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolFormatError(f"tools[{i}] has no function 'name'")
        tools.append({"type": "function", "function": function})
    return tools


def parse_call_text(text: str) -> list[dict]:
    """A sharegpt `function_call` turn's value: JSON of one {"name", "arguments"} or a list of them."""
    value = _json(text, "the function_call")
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise ToolFormatError("the function_call holds no call")
    return [_call(call, f"call {i}") for i, call in enumerate(calls)]


def parse_tool_calls(value: Any) -> list[dict]:
    """An OpenAI assistant message's `tool_calls`."""
    if not isinstance(value, list) or not value:
        raise ToolFormatError("'tool_calls' must be a non-empty list of calls")
    calls = []
    for i, call in enumerate(value):
        if not isinstance(call, dict):
            raise ToolFormatError(f"tool_calls[{i}] must be an object")
        function = call.get("function", call)
        calls.append(_call(function, f"tool_calls[{i}]"))
    return calls


def tool_names(tools: list[dict]) -> list[str]:
    return [tool["function"]["name"] for tool in tools]


def call_names(calls: list[dict]) -> list[str]:
    return [call["function"]["name"] for call in calls]


def _call(call: Any, where: str) -> dict:
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise ToolFormatError(f'{where} must be {{"name": ..., "arguments": {{...}}}} with a name')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI sends the arguments as JSON text
        arguments = _json(arguments, f"{where}'s arguments") if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise ToolFormatError(f"{where}'s arguments must be an object of named values")
    return {"type": "function", "function": {"name": call["name"], "arguments": arguments}}


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ToolFormatError(f"{what} is not valid JSON ({exc.msg} at column {exc.colno})") from None
