"""A single-turn sample as plain text fields (system, prompt, answer), in any of the three formats.

The editor shows these fields instead of JSON whenever a record is one exchange, so a person
edits text, not quotes and braces. `join_fields` writes the text back into a copy of the original
record: its format, key order, extra keys and per-message extras stay as they were.
Multi-turn records (history, several exchanges) are edited as JSON.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from tunebench.engine.core.record_formats import DOLLY_NAMES, message_role, sharegpt_role

# (record key or role, label) per format, in the order they are shown.
ALPACA_FIELDS = (
    ("system", "System"),
    ("instruction", "Instruction"),
    ("input", "Input"),
    ("output", "Output"),
)
CHAT_FIELDS = (("system", "System"), ("user", "User"), ("assistant", "Assistant"))


@dataclass(frozen=True)
class SampleFields:
    style: str  # "alpaca", "messages" or "conversations"
    values: dict[str, str]  # field key -> text, in display order

    def labels(self) -> list[tuple[str, str]]:
        return list(ALPACA_FIELDS if self.style == "alpaca" else CHAT_FIELDS)


def split_fields(record: Any) -> SampleFields | None:
    """The record's text fields, or None when it is not one plain exchange."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return _split_turns("messages", record["messages"], "role", "content", None)
    if isinstance(record.get("conversations"), list):
        return _split_turns("conversations", record["conversations"], "from", "value", record.get("system"))
    if "instruction" in record or "output" in record:
        # Dolly's context / response have no field here: writing back would lose them.
        if record.get("history") or any(record.get(name) is not None for name in DOLLY_NAMES.values()):
            return None
        values = {key: record.get(key, "") for key, _ in ALPACA_FIELDS}
        if not all(isinstance(v, str) for v in values.values()):
            return None
        return SampleFields("alpaca", values)
    return None


def _split_turns(
    style: str, turns: list, role_key: str, text_key: str, top_system: Any
) -> SampleFields | None:
    roles: list[str] = []
    texts: list[str] = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            return None
        role = _role(style, turn.get(role_key))
        roles.append(role)
        texts.append(turn[text_key])
    if top_system is not None and (not isinstance(top_system, str) or "system" in roles):
        return None
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        return None
    values = dict(zip(roles, texts, strict=True))
    values.setdefault("system", top_system or "")
    return SampleFields(style, {key: values[key] for key, _ in CHAT_FIELDS})


def _role(style: str, speaker: Any) -> str | None:
    """The chat role of a turn, by the rules training reads the record with (engine/core/data.py)."""
    return sharegpt_role(speaker) if style == "conversations" else message_role(speaker)


def join_fields(record: dict[str, Any], fields: SampleFields) -> dict[str, Any]:
    """A copy of `record` holding `fields`' text; optional fields left empty are not added."""
    out = copy.deepcopy(record)
    values = fields.values
    if fields.style == "alpaca":
        for key, _ in ALPACA_FIELDS:
            if values[key] or key in out or key in ("instruction", "output"):
                out[key] = values[key]
        return out
    role_key, text_key = ("role", "content") if fields.style == "messages" else ("from", "value")
    turns = out[fields.style]
    by_role = {}
    for turn in turns:
        role = _role(fields.style, turn[role_key])
        by_role[role] = turn
    for role in ("user", "assistant"):
        by_role[role][text_key] = values[role]
    if fields.style == "conversations" and "system" in out:  # sharegpt's top-level system prompt
        out["system"] = values["system"]
    elif "system" in by_role:
        if values["system"]:
            by_role["system"][text_key] = values["system"]
        else:
            turns.remove(by_role["system"])
    elif values["system"]:
        turns.insert(0, {role_key: "system", text_key: values["system"]})
    return out
