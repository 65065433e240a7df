"""Tokenising: how a conversation becomes token ids and a loss mask, through the chat template.

A sample's messages are rendered with the chat template (the tokenizer's own, or one of
engine/core/templates.py's by --template), the assistant answers are found in the rendered text, and the
text is tokenised piece by piece; labels are the ids on the answers (content and end-of-turn token)
and IGNORE_INDEX everywhere else, so the loss is on answers only. A sample over max_length keeps
its start; one whose answers would all be cut away is dropped with a RecordProblem saying why.
check_sample is the whole check of one record for the TUI: data.py's normalising and placeholders,
then this tokenising, against max_length when a tokenizer is given.

Like engine/core/data.py, this module imports neither torch nor transformers: it works on any tokenizer
object passed in (an `apply_chat_template`, and a `__call__` returning input_ids) and returns plain
lists of ints, so the TUI's row checks and preview tokenise exactly as training does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import TrainConfig
from .data import RecordProblem, Sample, fill_placeholders
from .errors import DataError, raise_if_cancelled
from .record_formats import (
    REASONING_KEYS,
    InvalidRecord,
    Message,
    normalise_record,
    record_tools,
    trained_answers,
    with_loss_scale,
)
from .templates import DEFAULT_TEMPLATE, TEMPLATES, get_template, named_template, template_words
from .tool_calls import call_names, tool_names

IGNORE_INDEX = -100  # label of a token the loss skips (the Hugging Face / PyTorch convention)
# The largest --max_length TrainConfig accepts: past it, "raise --max_length" is no fix.
MAX_LENGTH_LIMIT = next(f.metadata["max"] for f in dataclasses.fields(TrainConfig) if f.name == "max_length")


# ===================================================================== types


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE_INDEX on every non-assistant token
    source: str


@dataclass
class TokenizeReport:
    samples: int  # samples returned
    tokens: int  # tokens in the returned samples, after truncation
    truncated: int  # returned samples whose end was cut at max_length
    dropped: int  # samples not returned: answers cut away entirely, or the template failed
    problems: list[RecordProblem] = field(default_factory=list)
    template: str = ""  # which chat template was used, in words


class PromptTooLong(InvalidRecord):
    """The text before the first answer is longer than max_length tokens, found without
    tokenising all of it (a multi-megabyte prompt would take seconds)."""


# ============================================================== tokenising


def resolve_template(tokenizer: Any, template: str = "") -> tuple[str | None, str]:
    """The Jinja source to render with (None = the tokenizer's own) and a note saying which."""
    try:
        source = named_template(template)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if source is not None:
        return source, f"{template} (--template)"
    if getattr(tokenizer, "chat_template", None):
        return None, template_words(template)
    if template:
        raise DataError(
            f"--template {template} names the model's own chat format (an ms-swift name), but this "
            f"model's tokenizer has no chat template",
            hint=f"pass one of {', '.join(TEMPLATES)}",
        )
    return get_template(DEFAULT_TEMPLATE), f"{DEFAULT_TEMPLATE} (the tokenizer has no chat template)"


def tokenize_samples(
    samples: Sequence[Sample], tokenizer: Any, max_length: int, template: str = "", cancel: Any = None
) -> tuple[list[TokenizedSample], TokenizeReport]:
    """Render each conversation with the chat template and label only the assistant's tokens.
    Once `cancel` (a threading.Event) is set, errors.Cancelled stops it between samples."""
    chat_template, note = resolve_template(tokenizer, template)
    out: list[TokenizedSample] = []
    problems: list[RecordProblem] = []
    tokens = truncated = dropped = 0
    # path#N repeats Sample objects; encode each distinct one once.
    cache: dict[int, tuple[list[int], list[int]]] = {}
    for sample in samples:
        raise_if_cancelled(cancel)
        try:
            if id(sample) not in cache:
                cache[id(sample)] = encode_messages(
                    sample.messages, tokenizer, chat_template, max_length, sample.tools
                )
            ids, labels = cache[id(sample)]
        except InvalidRecord as exc:
            dropped += 1
            problems.append(RecordProblem(sample.source, str(exc)))
            continue
        if len(ids) > max_length:
            # Keep the start: the prompt and the first answer matter more than a long tail.
            if all(label == IGNORE_INDEX for label in labels[:max_length]):
                dropped += 1
                problems.append(RecordProblem(sample.source, _all_answers_cut(len(ids), max_length)))
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
        out.append(TokenizedSample(list(ids), list(labels), sample.source))
        tokens += len(ids)
    return out, TokenizeReport(len(out), tokens, truncated, dropped, problems, note)


def _all_answers_cut(tokens: int, max_length: int) -> str:
    fix = (
        f"raise --max_length to {tokens}, or shorten the prompt"
        if tokens <= MAX_LENGTH_LIMIT
        else f"shorten the prompt (--max_length goes up to {MAX_LENGTH_LIMIT}), or delete the record"
    )
    return f"{tokens} tokens, and --max_length {max_length} cuts away every answer token: {fix}"


# Prompts longer than a chunk, and than this many characters per allowed token, are counted
# chunk by chunk first, so a multi-megabyte prompt is dropped in milliseconds instead of being
# tokenised whole (shorter ones are tokenised whole: that is fast, and gives the exact count).
_LONG_PROMPT_CHARS_PER_TOKEN = 4
_CHUNK_CHARS = 1 << 16


def prompt_over(text: str, tokenizer: Any, max_length: int) -> bool:
    """True when `text` surely holds more than max_length tokens, counted on whitespace-cut
    chunks until the count is past max_length with a margin for the cuts (each cut may split
    what would have been one token in two); False when it may fit."""
    limit = max_length + max_length // 20 + 16
    counted, start = 0, 0
    while start < len(text) and counted <= limit:
        end = min(len(text), start + _CHUNK_CHARS)
        if end < len(text):
            space = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = space if space > start else end
        counted += len(tokenizer([text[start:end]], add_special_tokens=False)["input_ids"][0])
        counted -= 1 if start else 0  # the cut may have cost a token
        start = end
    return counted > limit


def encode_messages(
    messages: list[Message],
    tokenizer: Any,
    chat_template: str | None = None,
    max_length: int | None = None,
    tools: list[dict] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation (labels = ids on assistant spans, else IGNORE_INDEX).

    The text is cut at the assistant spans and each piece tokenised on its own, which is also how
    the prompt is tokenised at inference time (it ends at the assistant header). With max_length,
    a prompt that surely leaves no answer token within it raises PromptTooLong without being
    tokenised in full; the ids of every other conversation do not depend on max_length.
    `tools` go to the template, which shows them in the prompt; the assistant's calls are
    trained like its answers.
    """
    # assistant_spans and the reasoning check both render prefixes of `messages`: each once
    renders: dict[tuple[int, bool], str] = {}

    def render(prefix: list[Message], gen: bool) -> str:
        key = (len(prefix), gen)
        if key not in renders:
            renders[key] = _render(tokenizer, prefix, chat_template, gen, tools)
        return renders[key]

    text, spans = assistant_spans(messages, render)
    _check_tools_rendered(text, messages, spans, tools or [])
    _check_reasoning_rendered(messages, render)
    if max_length and spans:
        prompt = text[: spans[0][0]]
        long = max(_CHUNK_CHARS, max_length * _LONG_PROMPT_CHARS_PER_TOKEN)
        if len(prompt) > long and prompt_over(prompt, tokenizer, max_length):
            raise PromptTooLong(
                f"the prompt before the first answer is over {max_length} tokens ({len(prompt):,} "
                f"characters), so --max_length {max_length} cuts away every answer token: shorten "
                "the prompt, or delete the record"
            )
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    # An answer the loss skips is still its own piece: its tokens are the ones inference gives it.
    for (start, end), trained in zip(spans, trained_answers(messages), strict=True):
        pieces += [(text[cursor:start], False), (text[start:end], trained)]
        cursor = end
    pieces.append((text[cursor:], False))
    pieces = [(piece, trained) for piece, trained in pieces if piece]
    encoded = tokenizer([piece for piece, _ in pieces], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    labels: list[int] = []
    for (_, trained), piece_ids in zip(pieces, encoded, strict=True):
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
    if not any(trained for _, trained in pieces):
        raise InvalidRecord(
            'no answer of this record is trained (each is "loss": false, or --loss_scale last_round '
            'leaves only a last answer marked "loss": false): mark one to train, or delete the record'
        )
    return ids, labels


def _check_tools_rendered(
    text: str, messages: list[Message], spans: list[tuple[int, int]], tools: list[dict]
) -> None:
    """A template without tool support drops the tools and calls silently: the model would learn
    answers about tools its prompt never shows. Each tool's name must be in the text, and each
    call's name in its trained span."""
    calls = [m.get("tool_calls") or [] for m in messages if m["role"] == "assistant"]
    missing = [name for name in tool_names(tools) if name not in text]
    missing += [
        name
        for (start, end), made in zip(spans, calls, strict=True)
        for name in call_names(made)
        if name not in text[start:end]
    ]
    if missing:
        raise InvalidRecord(
            f"the chat template does not show the tools or tool calls ({missing[0]!r} is not in the "
            "rendered text), so training would teach calls to tools the prompt never shows: use a "
            "model whose chat template takes tools (Qwen2.5's does), or pass --template qwen or "
            "chatml (both carry Qwen2.5's tool format)"
        )


def _check_reasoning_rendered(messages: list[Message], render: Callable[[list[Message], bool], str]) -> None:
    """A template that does not render reasoning_content / thinking drops it silently: the model
    would learn the answers without the reasoning the data holds. Each answer's reasoning must
    show when that answer ends the chat (Qwen3's template shows it there only, on purpose)."""
    for index, message in enumerate(messages):
        key = next((k for k in REASONING_KEYS if message["role"] == "assistant" and message.get(k)), None)
        if key is not None and message[key].strip() not in render(messages[: index + 1], False):
            raise InvalidRecord(
                f"the chat template does not show the answer's reasoning ('{key}'), so training would "
                "drop it: use a model whose chat template renders it (Qwen3's does), or write it into "
                "the answer itself as <think>...</think>"
            )


def assistant_spans(
    messages: list[Message], render: Callable[[list[Message], bool], str]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) characters of each trained assistant span.

    A span is the assistant content plus its end-of-turn token. It is found by rendering the
    conversation up to the turn with the generation prompt (where the answer starts) and up to
    the end of the turn (where it ends); this works for any template whose renderings extend each
    other. Templates that rewrite earlier turns fall back to finding the content in the text; a
    template that does not render the content at all makes the record a problem.
    """
    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = full if i == len(messages) - 1 else render(messages[: i + 1], False)
        # The newline after an end token belongs to the next header, as at inference time.
        end = len(upto.rstrip())
        extends = full.startswith(upto) and upto.startswith(before) and cursor <= len(before) < end
        if extends and message["content"].strip() in full[len(before) : end]:
            spans.append((len(before), end))
        elif message.get("tool_calls"):
            raise InvalidRecord(
                "the chat template rewrites earlier turns, so the tokens of a tool call cannot be "
                "found: pass --template qwen or chatml (both carry Qwen2.5's tool format)"
            )
        else:
            spans.append(_find_answer(full, message["content"], upto, cursor))
        cursor = spans[-1][1]
    return full, spans


def _find_answer(full: str, content: str, upto: str, cursor: int) -> tuple[int, int]:
    for candidate in (content, content.strip()):
        start = full.find(candidate, cursor)
        if start >= 0:
            end = start + len(candidate)
            # Whatever this turn's own rendering puts right after the content is its end token.
            at = upto.rfind(candidate)
            closing = upto[at + len(candidate) :].strip() if at >= 0 else ""
            if closing and full.startswith(closing, end):
                end += len(closing)
            return start, end
    raise InvalidRecord(
        "the chat template does not render the assistant's answer as written, so the tokens to "
        f"train on cannot be found: pass --template ({', '.join(TEMPLATES)})"
    )


def _render(
    tokenizer: Any, messages: list[Message], chat_template: str | None, gen: bool, tools: list[dict] | None
) -> str:
    extra = {"tools": tools} if tools else {}  # not tools=None: not every tokenizer takes it
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=gen, **extra
        )
    except Exception as exc:  # jinja2 errors, raise_exception() in the template, ...
        raise InvalidRecord(
            f"the chat template failed on this conversation ({type(exc).__name__}: {exc}): "
            f"fix the record, or pass --template ({', '.join(TEMPLATES)})"
        ) from None


# ================================================================ checking


def check_sample(
    sample_dict: dict,
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    model_name: Sequence[str] = (),
    model_author: Sequence[str] = (),
    system: str = "",
    template: str = "",
    loss_scale: str = "default",
) -> list[str]:
    """Everything wrong with one record (its fields renamed by --columns already, if any), as
    messages for a person (empty when it is fine); `loss_scale` is --loss_scale's."""
    try:
        messages = normalise_record(sample_dict)
        tools = record_tools(sample_dict)
    except InvalidRecord as exc:
        return [str(exc)]
    filled, problems = fill_placeholders(messages, model_name, model_author, system=system)
    filled = with_loss_scale(filled, loss_scale)
    if tokenizer is None or not max_length:
        return problems
    try:
        chat_template, _ = resolve_template(tokenizer, template)
        ids, labels = encode_messages(filled, tokenizer, chat_template, max_length, tools)
    except (InvalidRecord, DataError) as exc:
        return [*problems, str(exc)]
    if len(ids) > max_length:
        first_answer = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        if first_answer >= max_length:
            problems.append(
                f"{len(ids)} tokens: --max_length {max_length} cuts away every answer token, so this "
                f"sample would be dropped; raise --max_length to {len(ids)} or shorten the prompt"
            )
        else:
            problems.append(f"{len(ids)} tokens, over --max_length {max_length}: the end would be cut")
    return problems
