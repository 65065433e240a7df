"""One template from training to serving: an export renders the same conversations through the
template the run trained with, the exported chat_template and the Modelfile's TEMPLATE (run by
core/go_template.py as Ollama runs it), and refuses to finish where they differ.

Compared for each assistant turn: the text before the answer, which is what the model saw in
training and what each server writes before it generates. The exported chat_template is also
compared on the whole conversation, answers and end-of-turn tokens included. The conversations
are a few fixed ones plus the first samples of the run's own dataset, when it is still there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import UserError
from ..core.go_template import GoTemplateError, ollama_prompt
from ..core.templates import writes_bos

Progress = Callable[[str], None]
RUN_SAMPLES = 3  # of the run's dataset, besides the fixed conversations

FIXED_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am your assistant."}],
    [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ],
    [
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "我是一个人工智能助手。"},
        {"role": "user", "content": "Write two lines:\nsea and sky."},
        {"role": "assistant", "content": "The sea is wide,\nthe sky is high."},
    ],
]


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    where: str
    tools: list[dict] | None = None


def run_conversations(train_config: dict[str, Any], say: Progress) -> list[Conversation]:
    """The first RUN_SAMPLES samples of the run's first dataset, placeholders filled as training
    filled them; none (said so) when the dataset is gone or unreadable."""
    from ..core.data import fill_placeholders, parse_dataset_spec, read_records
    from ..core.errors import DataUserError
    from ..core.record_formats import column_map

    specs = train_config.get("dataset") or []
    if not specs:
        return []
    try:
        path, _ = parse_dataset_spec(str(specs[0]))
        samples, _ = read_records(path, columns=column_map(str(train_config.get("columns") or "")))
    except (DataUserError, OSError, ValueError) as exc:
        say(
            f"the run's dataset {specs[0]} cannot be read here ({str(exc).splitlines()[0][:120]}): "
            "the templates are compared on the fixed conversations only"
        )
        return []
    names = [str(v) for v in train_config.get("model_name") or []]
    authors = [str(v) for v in train_config.get("model_author") or []]
    out = []
    for sample in samples:
        filled, reasons = fill_placeholders(sample.messages, names, authors)
        if reasons:
            continue
        # Go templates cannot trim; what a person types into Ollama is what it sends. A sample's
        # stray whitespace around a message is no difference between the templates.
        messages = [{**m, "content": (m.get("content") or "").strip()} for m in filled]
        out.append(Conversation(messages, sample.source, sample.tools))
        if len(out) == RUN_SAMPLES:
            break
    return out


def check_templates(
    tokenizer: Any,
    trained: str,
    run_system: str,
    exported: str,
    modelfile_template: str | None,
    modelfile_system: str,
    conversations: list[Conversation],
    say: Progress,
) -> None:
    """UserError naming the first character where the exported chat_template or the Modelfile's
    TEMPLATE renders a conversation differently from the template the run trained with.
    `modelfile_template` None: the Modelfile has none to check (said so)."""
    from ..core.encoding import assistant_spans

    bos = tokenizer.bos_token or ""
    skipped_go = checked = unrenderable = 0
    for number, conversation in enumerate(conversations, 1):
        chat = conversation.messages
        extra = {"tools": conversation.tools} if conversation.tools else {}
        # Training put the run's system prompt in front of a sample that had none (data.load_dataset).
        trained_chat = chat
        if run_system and chat[0]["role"] != "system":
            trained_chat = [{"role": "system", "content": run_system}, *chat]
        offset = len(trained_chat) - len(chat)

        def train_render(msgs: list[dict[str, Any]], gen: bool, extra: dict = extra) -> str:
            return tokenizer.apply_chat_template(
                msgs, chat_template=trained, tokenize=False, add_generation_prompt=gen, **extra
            )

        def serve_render(msgs: list[dict[str, Any]], gen: bool, extra: dict = extra) -> str:
            return tokenizer.apply_chat_template(
                msgs, chat_template=exported, tokenize=False, add_generation_prompt=gen, **extra
            )

        label = f"conversation {number} ({conversation.where})"
        try:
            full, spans = assistant_spans(trained_chat, train_render)
        except Exception:  # noqa: BLE001 - e.g. a template that refuses a system turn: not trained on
            unrenderable += 1
            continue
        checked += 1
        _same(full, _attempt(serve_render, chat, False), "the exported chat_template", label, "whole")
        go_ok = modelfile_template is not None and not _has_tools(conversation)
        skipped_go += modelfile_template is not None and not go_ok
        turns = [i for i, m in enumerate(trained_chat) if m["role"] == "assistant"]
        for (start, _), index in zip(spans, turns, strict=True):
            before = full[:start]
            prompt = chat[: index - offset]
            where = f"{label}, the prompt before answer {turns.index(index) + 1}"
            _same(before, _attempt(serve_render, prompt, True), "the exported chat_template", where, "prompt")
            if go_ok:
                assert modelfile_template is not None
                try:
                    served = ollama_prompt(modelfile_template, modelfile_system, prompt)
                except GoTemplateError as exc:
                    raise UserError(
                        f"the Modelfile's TEMPLATE cannot be checked: {exc}",
                        "this is a fault in TuneBench's export: report it with the Modelfile",
                    ) from None
                # Where the template writes BOS, llama.cpp adds it instead (gguf_file's add_bos_token).
                _same(
                    before.removeprefix(bos) if writes_bos(trained, bos) else before,
                    served,
                    "the Modelfile's TEMPLATE",
                    where,
                    "prompt",
                )
    if unrenderable:
        say(
            f"chat templates: {unrenderable} conversations left out, which the trained template cannot render"
        )
    if not checked:
        raise UserError(
            "the template the run trained with renders none of the sample conversations, so the "
            "exported templates cannot be checked against it",
            "this is a fault in TuneBench's export: report it with the run's config.json",
        )
    counted = f"{checked} conversations"
    if modelfile_template is None:
        say(
            f"chat templates: the trained and the exported one render {counted} alike "
            "(the Modelfile has no TEMPLATE of its own to check)"
        )
    else:
        note = (
            f" ({skipped_go} with tools skipped for the Modelfile, whose TEMPLATE has no tools)"
            if skipped_go
            else ""
        )
        say(f"chat templates: the trained, the exported and the Modelfile's render {counted} alike{note}")


def _attempt(render: Callable[..., str], messages: list[dict[str, Any]], gen: bool) -> str:
    """What the template renders, or its failure in words (which then differs from the trained text)."""
    try:
        return render(messages, gen)
    except Exception as exc:  # noqa: BLE001 - jinja errors of every kind
        return f"(the template failed: {type(exc).__name__}: {exc})"


def _has_tools(conversation: Conversation) -> bool:
    return bool(conversation.tools) or any(
        m["role"] == "tool" or m.get("tool_calls") for m in conversation.messages
    )


def _same(trained: str, other: str, what: str, where: str, part: str) -> None:
    if trained == other:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(trained, other, strict=False)) if a != b),
        min(len(trained), len(other)),
    )
    raise UserError(
        f"{what} renders {where} differently from the template the run trained with: they differ from "
        f"character {at} of the {part} on (line {trained.count(chr(10), 0, at) + 1}): trained "
        f"{trained[max(0, at - 20) : at + 40]!r}, exported {other[max(0, at - 20) : at + 40]!r}",
        "nothing was exported: a model served with another template than it trained with answers "
        "worse. "
        + (
            "TuneBench has no exact Ollama TEMPLATE for this chat format: export without --quant_method "
            "for transformers or vLLM, or write the Modelfile's TEMPLATE by hand"
            if "Modelfile" in what
            else "This is a fault in TuneBench's export: report it with the run's config.json"
        ),
    )
