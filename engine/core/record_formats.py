"""What a training record may look like, and the chat messages it becomes.

Formats are detected per record (FORMATS): OpenAI messages (role / content), sharegpt
(conversations of from / value), ms-swift's conversation (human / assistant pairs), prompt /
completion (texts, or TRL's lists of messages), alpaca (instruction / input / output, optional
system and history; Dolly's instruction / context / response too), ms-swift's query /
response / history, and GSM8K's question / answer and MATH's problem / solution. A record
becomes a list of {role, content} messages (system, then user and assistant turns alternating,
ending with the assistant; an answer the loss skips carries "loss": False), or raises
InvalidRecord with the reason a person reads. Reading the files they are in is
engine/core/data.py's part. Standard library only: the TUI checks rows with it as they are typed.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from typing import Any, NamedTuple

from . import tool_calls
from .record_kinds import untrained_kind

# A chat message: role and content, plus "tool_calls" on an assistant message that calls tools.
Message = dict[str, Any]


# Speaker names as sharegpt exports write them (compared in any case), and the chat role each is.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
    # LLaMA-Factory's tool-calling turns (glaive): the assistant's call, and the tool's answer.
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
# An assistant message's reasoning beside its answer, as chat templates read it (Qwen3's and
# DeepSeek-R1's reasoning_content, gpt-oss's and SmolLM3's thinking): kept for the template.
REASONING_KEYS = ("reasoning_content", "thinking")
MESSAGE_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def sharegpt_role(speaker: Any) -> str | None:
    """The chat role (system, user, assistant or tool) a sharegpt speaker stands for; None if unknown."""
    return SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None


def message_role(role: Any) -> str | None:
    """The chat role an OpenAI message's role stands for ("developer" is the system); None if unknown."""
    return MESSAGE_ROLES.get(role) if isinstance(role, str) else None


class InvalidRecord(ValueError):
    """One record is unusable; the message is the reason shown to the person (no location)."""

    kind = "record"  # RecordProblem.kind


class UnreadableRecord(InvalidRecord):
    """A line that is not JSON, or not UTF-8: the file itself is broken there."""

    kind = "unreadable"


class UntrainedKind(InvalidRecord):
    """A record of a kind of training this build does not do (preference pairs, KTO labels,
    images): the file is refused whole, since training its text as answers would be wrong."""

    kind = "untrained"


def column_map(text: str) -> dict[str, str]:
    """ms-swift's --columns: a JSON object from a dataset's field names to the ones read here
    ('{"text1": "query", "text2": "response"}'); {} for none. ValueError says what is wrong."""
    if not text.strip():
        return {}
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f'not JSON ({exc.msg} at character {exc.pos}): write it as \'{{"text1": "query"}}\''
        ) from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and v for v in mapping.values()):
        raise ValueError(
            'a JSON object from each field\'s name to the name to read it as, e.g. \'{"text1": "query"}\''
        )
    return mapping


def renamed(record: Any, columns: dict[str, str]) -> Any:
    """The record with its fields renamed by `columns` (column_map's), before anything reads it:
    a renamed field wins over one that already has its new name."""
    if not columns or not isinstance(record, dict):
        return record
    taken = {columns[str(key)] for key in record if str(key) in columns}
    out = {key: value for key, value in record.items() if str(key) not in columns and key not in taken}
    out.update({columns[str(key)]: value for key, value in record.items() if str(key) in columns})
    return out


def normalise_record(record: Any) -> list[Message]:
    """Any supported format -> checked messages; raises InvalidRecord with the reason.

    Tool calls come out as assistant messages with "tool_calls" (and empty content unless the
    record has text beside the call), tool results as "tool" messages; record_tools gives the
    tools the record offers."""
    if not isinstance(record, dict):
        raise InvalidRecord(
            f"expected a JSON object {{...}} holding the record's fields, found {kind_of(record)}"
        )
    record, found = in_format_case(record)
    kind = untrained_kind(record, chat_format=found is not None)
    if kind:
        raise UntrainedKind(kind)
    record_tools(record)  # a broken tools field is the record's problem, whichever format it is in
    system = _optional_text(record, "system")
    if found is None:
        keys = ", ".join(sorted(str(k) for k, v in record.items() if v is not None)[:8]) or "none"
        nulls = sorted(k for k in FORMAT_KEYS if k in record and record[k] is None)
        null = f"; null: {', '.join(nulls)}" if nulls else ""
        shapes = [f.shape for f in FORMATS]
        example = f'{{"{_first_key(record)}": "query", ...}}'
        raise InvalidRecord(
            f"unknown format (keys: {keys}{null}): expected {', '.join(shapes[:-1])} or {shapes[-1]}; "
            f"or rename the fields to these with --columns '{example}'"
        )
    turns = found.read(record)
    # An empty system prompt is how many exported datasets say "none".
    turns = [t for t in turns if not (t.role == "system" and not t.content.strip())]
    if system and not (turns and turns[0].role == "system"):
        turns.insert(0, _Turn("system", system, "system"))
    _check_turns(turns)
    return [{"role": t.role, "content": t.content, **t.extra} for t in turns]


def _first_key(record: dict) -> str:
    return next((str(key) for key, value in record.items() if value is not None), "text1")


def record_format(record: dict) -> RecordFormat | None:
    """The format a record is in, by the fields it holds; None if it is in none of them.

    A null field counts as absent: parquet, arrow and save_to_disk files give every row every
    column, null where the row had none, so a file mixing formats must still read each row as its
    own."""
    present = {key for key, value in record.items() if value is not None}
    return next((f for f in FORMATS if present.intersection(f.keys)), None)


def in_format_case(record: dict) -> tuple[dict, RecordFormat | None]:
    """The record and its format (record_format's), with its field names lower-cased where they
    are in another case (a spreadsheet's Instruction,Output header, as ms-swift reads it) and
    that makes it a record of some format with no two names made one."""
    found = record_format(record)
    if found is None:
        lowered = {str(key).lower(): value for key, value in record.items()}
        found_lowered = record_format(lowered) if len(lowered) == len(record) else None
        if found_lowered is not None:
            return lowered, found_lowered
    return record, found


def record_tools(record: dict) -> list[dict]:
    """The tools a record offers its assistant ([] for none); InvalidRecord if unreadable."""
    try:
        return tool_calls.parse_tools(record.get("tools"))
    except tool_calls.ToolFormatError as exc:
        raise InvalidRecord(str(exc)) from None


class _Turn(NamedTuple):
    role: str
    content: str
    where: str  # where it came from in the record, for messages
    extra: dict[str, Any] = {}  # noqa: RUF012 - never mutated; "tool_calls" of an assistant call


def _from_messages(items: Any, key: str = "messages") -> list[_Turn]:
    turns = []
    for i, item in enumerate(_list_of_objects(items, key)):
        where = f"{key}[{i}]"
        role = _required_text(item, "role", where)
        canonical = message_role(role)
        if canonical is None:
            raise InvalidRecord(f"{where}: unknown role {role!r}: use system, user, assistant or tool")
        extra = _answer_extras(item, where) if canonical == "assistant" else {}
        if canonical == "assistant" and item.get("tool_calls"):
            calls = _parsed(tool_calls.parse_tool_calls, item["tool_calls"], where)
            content = _message_content(item, where) if item.get("content") else ""
            turns.append(_Turn("assistant", content, where, {"tool_calls": calls, **extra}))
        else:
            turns.append(_Turn(canonical, _message_content(item, where), where, extra))
    return turns


def _answer_extras(message: dict, where: str) -> dict[str, Any]:
    """What an assistant message carries beside its text: "loss": False when the loss skips it,
    and its reasoning under the key it came with."""
    trained = _trained(message, where)
    # an explicit "loss": true stays (it wins over --loss_scale last_round, as in ms-swift)
    extras: dict[str, Any] = {} if trained and message.get("loss") is None else {"loss": trained}
    for key in REASONING_KEYS:
        if message.get(key) is not None:
            reasoning = _required_text(message, key, where)
            if reasoning.strip():
                extras[key] = reasoning
    return extras


def with_loss_scale(messages: list[Message], loss_scale: str) -> list[Message]:
    """The messages as --loss_scale has them trained: as they are for default; for ms-swift's
    last_round every answer but the last is context, unless the record marks it "loss": true."""
    if loss_scale != "last_round":
        return messages
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return [
        {**m, "loss": False} if m["role"] == "assistant" and i != last and m.get("loss") is not True else m
        for i, m in enumerate(messages)
    ]


def trained_answers(messages: list[Message]) -> list[bool]:
    """Per assistant message, in order, whether the loss learns it: all but those marked
    "loss": false (ms-swift's mark, OpenAI's "weight": 0, or --loss_scale last_round)."""
    return [m.get("loss") is not False for m in messages if m["role"] == "assistant"]


def _trained(message: dict, where: str) -> bool:
    """Whether the loss learns this answer: not with ms-swift's "loss": false, nor with OpenAI's
    "weight": 0 (a turn kept as context only)."""
    loss, weight = message.get("loss"), message.get("weight")
    if isinstance(loss, str) and loss.strip().lower() in ("true", "false"):  # a CSV's cell
        loss = loss.strip().lower() == "true"
    if loss is not None and (not isinstance(loss, (bool, int)) or loss not in (0, 1)):
        raise InvalidRecord(
            f"{where}: 'loss' must be true or false (whether this answer is trained), found {kind_of(loss)}"
        )
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise InvalidRecord(
            f"{where}: 'weight' must be 0 or 1 (OpenAI's: 0 = not trained), found {kind_of(weight)}"
        )
    return (loss is None or bool(loss)) and weight != 0


def _parsed(parse: Any, value: Any, where: str) -> Any:
    try:
        return parse(value)
    except tool_calls.ToolFormatError as exc:
        raise InvalidRecord(f"{where}: {exc}") from None


def _message_content(message: dict, where: str) -> str:
    """A message's content: text, or OpenAI's list of text parts, joined as one text."""
    content = message.get("content")
    if not isinstance(content, list):
        return _required_text(message, "content", where)
    texts = []
    for i, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text"):
            raise InvalidRecord(
                f'{where}: content[{i}] must be a text part {{"type": "text", "text": ...}}, '
                f"found {kind_of(part)}"
            )
        _required_text(part, "text", f"{where}.content[{i}]")
        texts.append(part["text"])
    return "\n".join(texts)


def _from_sharegpt(items: Any) -> list[_Turn]:
    turns = []
    for i, item in enumerate(_list_of_objects(items, "conversations")):
        where = f"conversations[{i}]"
        # Some sharegpt exports use the OpenAI key names inside `conversations`.
        # Null is absent here too: a columnar file's turns carry both pairs of keys.
        speaker_key, text_key = (
            ("role", "content")
            if item.get("from") is None and item.get("role") is not None
            else ("from", "value")
        )
        speaker = _required_text(item, speaker_key, where)
        role = sharegpt_role(speaker)
        if role is None:
            raise InvalidRecord(
                f"{where}: unknown speaker {speaker!r} in '{speaker_key}': use human, gpt or system "
                "(and function_call, observation for tool calls)"
            )
        text = _required_text(item, text_key, where)
        extra = _answer_extras(item, where) if role == "assistant" else {}
        if speaker.lower() == "function_call":
            calls = _parsed(tool_calls.parse_call_text, text, where)
            turns.append(_Turn("assistant", "", where, {"tool_calls": calls, **extra}))
        else:
            turns.append(_Turn(role, text, where, extra))
    return turns


def _from_conversation(items: Any) -> list[_Turn]:
    """ms-swift's `conversation`: one {"human": ..., "assistant": ...} object per exchange, the
    first optionally with the "system" prompt."""
    turns = []
    for i, item in enumerate(_list_of_objects(items, "conversation")):
        where = f"conversation[{i}]"
        if item.get("system") is not None:  # anywhere but first, _check_turns says it may not be there
            turns.append(_Turn("system", _required_text(item, "system", where), f"{where}.system"))
        turns += [
            _Turn("user", _required_text(item, "human", where), f"{where}.human"),
            _Turn("assistant", _required_text(item, "assistant", where), f"{where}.assistant"),
        ]
    return turns


# The names ms-swift reads an answer under when a record's own name for it is not there
# ({"prompt": ..., "response": ...}, {"query": ..., "answer": ...}), in its order.
ANSWER_NAMES = ("response", "answer", "output", "solution", "completion")
# ... and a question's, where the format's own (alpaca's instruction, query) is not there.
QUESTION_NAMES = ("input", "query", "question", "problem")


def _answer_key(record: dict, own: str) -> str:
    """The field holding a single-turn record's answer: its format's own name, else the first of
    ANSWER_NAMES it has; InvalidRecord naming them all when it has none."""
    if record.get(own) is not None:
        return own
    found = next((name for name in ANSWER_NAMES if record.get(name) is not None), None)
    if found is None:
        others = ", ".join(f"'{name}'" for name in ANSWER_NAMES if name != own)
        raise InvalidRecord(f"missing field '{own}'{_misspelt(record, own) or f' (or {others})'}")
    return found


def _from_prompt_completion(record: dict) -> list[_Turn]:
    """A prompt and its completion, each a text or (TRL's conversational form) a list of messages."""
    prompt = record.get("prompt")
    if not isinstance(prompt, list):
        answer = _answer_key(record, "completion")
        return [
            _Turn("user", _required_text(record, "prompt"), "prompt"),
            _Turn("assistant", _required_text(record, answer), answer),
        ]
    turns = _from_messages(prompt, "prompt")
    answer = _answer_key(record, "completion")
    if isinstance(record[answer], list):
        return turns + _from_messages(record[answer], answer)
    return [*turns, _Turn("assistant", _required_text(record, answer), answer)]


# Dolly's names for alpaca's fields (databricks-dolly-15k: instruction, context, response, category).
DOLLY_NAMES = {"input": "context", "output": "response"}


def _from_alpaca(record: dict) -> list[_Turn]:
    """alpaca; or Dolly, whose context follows the instruction in the user turn as alpaca's input does."""
    asked = next((name for name in QUESTION_NAMES if record.get(name) is not None), None)
    if record.get("instruction") is None and asked:  # {"input": ..., "output": ...}, as ms-swift reads it
        instruction, extra = _required_text(record, asked), ""
    else:
        instruction = _required_text(record, "instruction")
        extra = _optional_text(record, "input") or _optional_text(record, DOLLY_NAMES["input"])
    query = f"{instruction}\n{extra}" if extra.strip() else instruction
    # Dolly's response, or another name ms-swift reads, only where there is no output (null is
    # none: a columnar file has both); a Dolly record (its context) misses its response by name.
    dolly = "context" in record and record.get("output") is None
    answer = _answer_key(record, DOLLY_NAMES["output"] if dolly else "output")
    return [
        *_history(record),
        _Turn("user", query, "instruction"),
        _Turn("assistant", _required_text(record, answer), answer),
    ]


def _from_query_response(record: dict) -> list[_Turn]:
    asked = next((name for name in ("query", *QUESTION_NAMES) if record.get(name) is not None), "query")
    answered = _answer_key(record, "response")
    query, response = _required_text(record, asked), _required_text(record, answered)
    return [*_history(record), _Turn("user", query, asked), _Turn("assistant", response, answered)]


def _from_question_answer(record: dict) -> list[_Turn]:
    """GSM8K's question + answer, MATH's problem + solution (the names ms-swift reads too). With
    both an answer and a solution (MATH-500), the solution: the worked steps, not the result alone."""
    asked = "question" if record.get("question") is not None else "problem"
    answered = "solution" if record.get("solution") is not None else _answer_key(record, "answer")
    question, answer = _required_text(record, asked), _required_text(record, answered)
    return [*_history(record), _Turn("user", question, asked), _Turn("assistant", answer, answered)]


class RecordFormat(NamedTuple):
    keys: tuple[str, ...]  # a record with any of these fields (not null) is in this format
    shape: str  # what a record of it holds, for the message about a record in no format
    read: Callable[[dict], list[_Turn]]


# Tried in this order: the first format with one of its fields in the record reads it. A
# question / problem is last, so that a stray "question" field never takes over a record that
# has its format's own fields (alpaca's instruction, query).
FORMATS = (
    RecordFormat(("messages",), "'messages' (OpenAI)", lambda r: _from_messages(r["messages"])),
    RecordFormat(
        ("conversations",), "'conversations' (sharegpt)", lambda r: _from_sharegpt(r["conversations"])
    ),
    RecordFormat(
        ("conversation",), "'conversation' (ms-swift)", lambda r: _from_conversation(r["conversation"])
    ),
    RecordFormat(("prompt", "completion"), "'prompt' + 'completion'", _from_prompt_completion),
    RecordFormat(
        ("instruction", "output"),
        "'instruction' + 'output' (alpaca; Dolly's 'context', 'response')",
        _from_alpaca,
    ),
    RecordFormat(("query", "response"), "'query' + 'response'", _from_query_response),
    RecordFormat(
        ("question", "problem"),
        "'question' or 'problem' + 'answer' or 'solution' (GSM8K, MATH)",
        _from_question_answer,
    ),
)
# Every field that marks a record's format.
FORMAT_KEYS = frozenset(key for f in FORMATS for key in f.keys)


def _history(record: dict) -> list[_Turn]:
    history = record.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise InvalidRecord(f"'history' must be a list of [question, answer] pairs, found {kind_of(history)}")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise InvalidRecord(
                f"history[{i}] must be a [question, answer] pair of texts, found {kind_of(pair)}"
            )
        turns += [_Turn("user", pair[0], f"history[{i}][0]"), _Turn("assistant", pair[1], f"history[{i}][1]")]
    return turns


def _check_turns(turns: list[_Turn]) -> None:
    """System first if at all, then user / assistant alternating, ending with a non-empty answer.

    An assistant's tool call is answered by one or more tool results, then the assistant again."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if not body:
        raise InvalidRecord("no conversation: give at least a user turn and the assistant's answer")
    expected: tuple[str, ...] = ("user",)
    for turn in body:
        role, where = turn.role, turn.where
        if role == "system":
            raise InvalidRecord(f"{where}: a system message may only come first")
        if role not in expected:
            if "tool" in expected or role == "tool":
                raise InvalidRecord(
                    f"{where} is from the {role} but the {' or the '.join(expected)} should speak here: "
                    "a tool call is followed by its results (observation / tool turns), and a tool "
                    "result by the assistant"
                )
            raise InvalidRecord(
                f"{where} is from the {role} but the {expected[0]} should speak here: turns must "
                "alternate user, assistant (merge the two turns, or add the missing one)"
            )
        calls = turn.extra.get("tool_calls")
        if not calls and not turn.content.strip():
            what = {"assistant": "answer", "tool": "tool's result"}.get(role, "question")
            raise InvalidRecord(f"{where} is empty: write the {what}, or delete the record")
        if role == "assistant":
            expected = ("tool",) if calls else ("user",)
        else:
            expected = ("tool", "assistant") if role == "tool" else ("assistant",)
    if not any(turn.role == "assistant" and turn.extra.get("loss") is not False for turn in body):
        raise InvalidRecord(
            'every answer is marked not to be trained ("loss": false or "weight": 0): mark one '
            "to train, or delete the record"
        )
    if body[-1].role != "assistant":
        raise InvalidRecord(
            f"the last turn ({body[-1].where}) is the {body[-1].role}'s: end with the assistant's answer"
        )


def _list_of_objects(items: Any, key: str) -> list[dict]:
    if not isinstance(items, list):
        raise InvalidRecord(f"'{key}' must be a list of turns, found {kind_of(items)}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidRecord(f"{key}[{i}] must be an object, found {kind_of(item)}")
    return items


def _required_text(obj: dict, key: str, where: str = "") -> str:
    prefix = f"{where}: " if where else ""
    if key not in obj or obj[key] is None:
        raise InvalidRecord(f"{prefix}missing field '{key}'{_misspelt(obj, key)}")
    if not isinstance(obj[key], str):
        raise InvalidRecord(f"{prefix}'{key}' must be text, found {kind_of(obj[key])}")
    return obj[key]


def _misspelt(obj: dict, key: str) -> str:
    """' (the record has 'respnse': ...)' when a field looks like a misspelling of the missing
    `key`: unknown fields are ignored (as ms-swift does), but such a one is almost always why."""
    close = difflib.get_close_matches(key, [str(k) for k in obj if k != key], n=1, cutoff=0.75)
    return f" (the record has '{close[0]}': a misspelling of '{key}'?)" if close else ""


def _optional_text(obj: dict, key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRecord(f"'{key}' must be text, found {kind_of(value)}")
    return value


def kind_of(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"a number ({value})"
    return names.get(type(value), type(value).__name__)
