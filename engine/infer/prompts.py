"""Prompts for generation: a chat turned into prompt tokens, and answer tokens back into text.

A chat is rendered with the chat template its run trained with (--template, else the tokenizer's
own) and tokenised the way training did, so an adapter sees the token boundaries it was trained
on. A turn ends at EOS or at an end-of-turn token; answer tokens become text as they stream,
never splitting a character.
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


def encode_prompt(
    tokenizer: Any, messages: Sequence[dict[str, str]], template: str = "", system: str = ""
) -> list[int]:
    """Token ids of the chat so far plus the assistant header, tokenised the way training did."""
    from ..core.encoding import assistant_spans

    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system:
        chat = [{"role": "system", "content": system}] + [m for m in chat if m["role"] != "system"]
    chat_template = chat_template_for(tokenizer, template)

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, chat_template=chat_template, tokenize=False, add_generation_prompt=generation_prompt
        )

    try:
        text = render(chat, True)
    except Exception as exc:  # jinja errors, raise_exception() in templates that refuse a role
        raise UserError(
            f"the chat template cannot render this conversation ({type(exc).__name__}: {exc})",
            "check the roles (system, user, assistant), or pick another template with --template",
        ) from None
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
