"""Training data meant for other kinds of training, recognised from a record's keys before the
chat formats read it: KTO labels, DPO/ORPO preference pairs, multimodal records and plain text for
continued pretraining. Read as supervised samples, each would train the wrong targets silently
(the rejected answers, the literal <image> tag, ...), so engine/core/data.py refuses them by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

_SFT_ONLY = "this build trains supervised answers only (SFT)"
# Placeholders multimodal datasets (LLaMA-Factory, ms-swift) put where an image, video or sound goes.
_MEDIA_TAGS = ("<image>", "<video>", "<audio>")
_MEDIA_KEYS = ("images", "videos", "audios")


def untrained_kind(record: dict, chat_format: bool) -> str | None:
    """What the record is and why it is not trained, for data meant for another kind of training;
    None for a record the chat formats may read. `chat_format`: the record has the fields of one
    of them (record_formats.record_format). A null field is absent, as there."""
    if isinstance(record.get("label"), bool) or isinstance(record.get("kto_tag"), bool):
        key = "label" if "label" in record else "kto_tag"
        return (
            f"KTO data ('{key}': true/false marks each answer good or bad): {_SFT_ONLY}, which would "
            f"teach the bad answers too; keep the records marked true without '{key}', or train it "
            "with a KTO trainer (ms-swift: swift rlhf --rlhf_type kto)"
        )
    rejected = [
        k for k in ("rejected", "rejected_response", "rejected_messages") if record.get(k) is not None
    ]
    if rejected:
        return (
            f"preference data for DPO/ORPO (a chosen and a '{rejected[0]}' answer): {_SFT_ONLY}; to "
            f"learn the chosen answers, write each as the assistant's answer and drop '{rejected[0]}', "
            "or train it with a preference trainer (ms-swift: swift rlhf --rlhf_type dpo)"
        )
    if record.get("text") is not None and not chat_format:
        return (
            "plain text for continued pretraining (a 'text' field; a .txt file reads as one per "
            f"line): {_SFT_ONLY}, not the loss on every token that pretraining takes (ms-swift: "
            "swift pt); to fine-tune on it here, write it as questions and answers"
        )
    media = (
        next((f"an '{key}' field" for key in _MEDIA_KEYS if record.get(key)), None)
        or next((f"an '{kind}' content part" for kind in _media_parts(record)), None)
        or next(
            (f"'{tag}' in its text" for tag in _MEDIA_TAGS if any(tag in s for s in _texts(record))), None
        )
    )
    if media:
        return (
            f"multimodal data ({media}): {_SFT_ONLY} of text models, and would train on the "
            "text without the media; leave the file out, or use a vision-language trainer"
        )
    return None


def _media_parts(record: dict) -> Iterator[str]:
    """The types of OpenAI content parts that are not text ("image_url", "input_audio", ...)."""
    for message in record.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") not in (None, "text"):
                yield str(part.get("type"))


def _texts(value: Any) -> Iterator[str]:
    """Every string inside a record, at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
