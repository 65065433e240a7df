"""Tool calls in a generated answer, as Hermes / Qwen2.5 templates teach a model to write them.

A call is `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (engine/core/templates.py
renders training's calls that way); an answer may hold several, and text beside them. They come
back in OpenAI's form: `tool_calls` with an id and the arguments as JSON text, the rest as content.
An answer whose block does not parse is left as it is, content and all, as vLLM's hermes parser
leaves it. The JSON of each call is read by engine/core/tool_calls.py, as training reads a call.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from ..core.tool_calls import ToolFormatError, parse_call_text

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
# A block runs to its end tag, or for the last one to the end of the answer: a model that stops
# at its end-of-turn token right after the JSON has still made the call (vLLM reads it so too).
_BLOCK = re.compile(
    re.escape(CALL_START) + r"(.*?)" + re.escape(CALL_END) + "|" + re.escape(CALL_START) + r"(.*)", re.DOTALL
)


def split_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of an answer: the text outside the blocks (stripped, None if empty) and
    each call in OpenAI's form; (text, []) when there is no block or one does not parse."""
    calls: list[dict[str, Any]] = []
    outside: list[str] = []
    cursor = 0
    for match in _BLOCK.finditer(text):
        body = match.group(1) if match.group(1) is not None else match.group(2)
        try:
            parsed = parse_call_text(body.strip())
        except ToolFormatError:
            return text, []
        calls += [_openai_call(call["function"]) for call in parsed]
        outside.append(text[cursor : match.start()])
        cursor = match.end()
    if not calls:
        return text, []
    content = "".join([*outside, text[cursor:]]).strip()
    return content or None, calls


def _openai_call(function: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {
            "name": function["name"],
            "arguments": json.dumps(function["arguments"], ensure_ascii=False),
        },
    }


class StreamedToolCalls:
    """A streamed answer's text, passed on until it could be the start of a call: from there it
    is held, and the calls are read when the answer ends (they go out as the last chunks)."""

    def __init__(self) -> None:
        self.held = ""
        self.in_call = False

    def push(self, piece: str) -> str:
        """The text that may be streamed as content now."""
        text = self.held + piece
        if not self.in_call:
            at = text.find(CALL_START)
            if at < 0:
                # Hold back a tail that may grow into "<tool_call>", so no half tag is shown.
                keep = next(
                    (
                        n
                        for n in range(min(len(CALL_START) - 1, len(text)), 0, -1)
                        if text.endswith(CALL_START[:n])
                    ),
                    0,
                )
                self.held = text[len(text) - keep :]
                return text[: len(text) - keep]
            self.in_call = True
            self.held = text[at:]
            return text[:at]
        self.held = text
        return ""

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still to stream, calls) at the end of the answer. Without calls that parse,
        whatever was held is streamed as content."""
        content, calls = split_tool_calls(self.held)
        if not calls:
            return self.held, []
        return content or "", calls
