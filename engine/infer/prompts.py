"""Prompts for generation: a chat turned into prompt tokens, and answer tokens back into text.

A chat is rendered with the chat template its run trained with (--template, else the tokenizer's
own) and tokenised the way training did, so an adapter sees the token boundaries it was trained
on. A turn ends at EOS or at an end-of-turn token, or where a stop text appears (StopText: chat's
and probe's --stop_words, the HTTP API's stop); answer tokens become text as they stream, never
splitting a character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..core.errors import UserError

# End-of-turn tokens of the common chat formats; a turn also ends at the tokenizer's EOS.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
)


def chat_template_for(tokenizer: Any, template: str = "") -> str | None:
    """The Jinja source a run's --template names, or None for the tokenizer's own."""
    from ..core.encoding import resolve_template

    return resolve_template(tokenizer, template)[0]


class TemplateWithoutTools(UserError):
    """Tools (or earlier tool calls) in a chat whose template does not show them."""


def encode_prompt(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    template: str = "",
    system: str = "",
    tools: list[dict] | None = None,
) -> list[int]:
    """Token ids of the chat so far plus the assistant header, tokenised the way training did.
    `tools` and assistant messages' "tool_calls" are in engine/core/tool_calls.py's form, and go
    to the template as training gives them (encoding.encode_messages)."""
    from ..core.encoding import assistant_spans

    chat = [_chat_message(m) for m in messages]
    if system:
        chat = [{"role": "system", "content": system}] + [m for m in chat if m["role"] != "system"]
    chat_template = chat_template_for(tokenizer, template)

    def render(msgs: list[dict[str, Any]], generation_prompt: bool, with_tools: bool = True) -> str:
        # not tools=None: not every tokenizer takes it
        extra = {"tools": tools} if tools and with_tools else {}
        return tokenizer.apply_chat_template(
            msgs,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            **extra,
        )

    try:
        text = render(chat, True)
    except Exception as exc:  # jinja errors, raise_exception() in templates that refuse a role
        raise UserError(
            f"the chat template cannot render this conversation ({type(exc).__name__}: {exc})",
            "check the roles (system, user, assistant, tool), or pick another template with --template",
        ) from None
    _check_tools_shown(text, chat, tools or [], template, lambda: render(chat, True, with_tools=False))
    pieces = [text]
    if any(m["role"] == "assistant" for m in chat):
        # Training tokenises each assistant answer on its own (encoding.encode_messages); doing the same
        # here gives earlier turns the token boundaries the adapter saw.
        try:
            full, spans = assistant_spans(chat, render)
        except Exception:  # noqa: BLE001 - a template the span finder cannot follow: one piece is fine
            full, spans = "", []
        if spans and text.startswith(full):
            pieces, cursor = [], 0
            for start, end in spans:
                pieces += [text[cursor:start], text[start:end]]
                cursor = end
            pieces.append(text[cursor:])
            pieces = [p for p in pieces if p]
    ids: list[int] = []
    for piece_ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]:
        ids += piece_ids
    return ids


def _chat_message(message: dict[str, Any]) -> dict[str, Any]:
    """Role and content, and an assistant's calls where it makes some: what training renders."""
    out = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        out["tool_calls"] = message["tool_calls"]
    return out


def _check_tools_shown(
    text: str, chat: list[dict[str, Any]], tools: list[dict], template: str, without_tools: Any
) -> None:
    """A template without tool support drops the tools and earlier calls silently, and the model
    would answer as if it had none: each tool's and call's name must be in the prompt, and the
    tools must change it (a name may also be in the question)."""
    from ..core.tool_calls import call_names, tool_names

    calls = [call for m in chat for call in m.get("tool_calls", [])]
    names = tool_names(tools) + call_names(calls)
    missing = [name for name in names if name not in text]
    if not missing and not (tools and text == without_tools()):
        return
    which = f"--template {template}" if template else "the tokenizer's own"
    raise TemplateWithoutTools(
        f"the chat template ({which}) does not show tools or tool calls"
        + (f" ({missing[0]!r} is not in the prompt)" if missing else "")
        + ", so the model would never see them",
        "serve an adapter trained with --template qwen or chatml (both carry Qwen2.5's tool "
        "format; deploy answers with the template each run trained with), or a model whose own "
        "chat template takes tools (Qwen2.5's does)",
    )


def stop_token_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """EOS and every end-of-turn token this tokenizer knows as a special token."""
    ids: set[int] = set()
    sources = [tokenizer.eos_token_id]
    if model is not None and getattr(model, "generation_config", None) is not None:
        sources.append(model.generation_config.eos_token_id)
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    special = set(getattr(tokenizer, "all_special_tokens", [])) | set(
        getattr(tokenizer, "added_tokens_encoder", {})
    )
    for token in END_OF_TURN_TOKENS:
        if token in special:
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return ids


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces without ever splitting a character.

    Byte-level tokenizers can end a token in the middle of a multi-byte character (most Chinese
    characters take three bytes); such text decodes to U+FFFD until the next token completes it,
    so a piece is only released once it does not end in U+FFFD. Decoding a short window that
    starts a few tokens back keeps the spacing right for SentencePiece tokenizers, which drop the
    leading space of whatever they decode first, and keeps each step O(1).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window that gives the context
        self._read = 0  # end of the text already released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd") and text.startswith(done):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        done = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(done) :] if text.startswith(done) else text


class StopText:
    """Cuts the answer at the first stop string. Text that could still grow into one is held back
    until it cannot, so a streamed answer never shows part of a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text that may be shown now, whether a stop string was met)."""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        keep = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:size]):
                    keep = size
                    break
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text

    def end(self, tail: str) -> tuple[str, bool]:
        """At the answer's end: `tail` (the detokenizer's last text) through the cut, then what
        was held back unless a stop string came; (text, whether one came)."""
        text, stopped = self.push(tail)
        return (text, True) if stopped else (text + self.flush(), False)
