"""Ollama's side of a chat template, in Python: a renderer for the part of Go's text/template
that the Modelfile TEMPLATEs TuneBench writes use, and the prompt Ollama builds from a chat.

Export checks with it that the Modelfile renders a conversation as training did, without Go or
Ollama on the machine. The subset: text, `{{ }}` actions with `{{-`/`-}}` trimming, comments,
`if`/`else if`/`else`/`end`, `range` (with `$i, $x :=`), variables (`$x := ...`, `$`, `$.Field`),
fields (`.Role`), string and number literals, parentheses, and the functions eq, ne, lt, le, gt,
ge, and, or, not, len, slice and index. Anything else is a GoTemplateError that names it, never a
silently different rendering.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class GoTemplateError(ValueError):
    """The template uses syntax outside the subset, or fails as Go's would."""


# ------------------------------------------------------------------ parsing

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r"""\s*(?:
    (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<number>-?\d+)
    | (?P<declare>:=)
    | (?P<punct>[(),|=])
    | (?P<variable>\$[A-Za-z_0-9]*(?:\.[A-Za-z_]\w*)*)
    | (?P<field>(?:\.[A-Za-z_]\w*)+|\.)
    | (?P<word>[A-Za-z_]\w*)
    )""",
    re.X,
)


@dataclass
class _Node:
    kind: str  # text, print, assign, if, range
    text: str = ""
    expr: Any = None
    names: list[str] = field(default_factory=list)
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


def _tokens(source: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    position = 0
    source = source.rstrip()
    while position < len(source):
        match = _TOKEN.match(source, position)
        if match is None or match.end() == position:
            raise GoTemplateError(f"cannot read {source[position:][:30]!r} in {{{{ {source} }}}}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        position = match.end()
    return out


class _Parser:
    def __init__(self, source: str) -> None:
        self.items: list[tuple[str, Any]] = []  # ("text", str) or ("action", tokens)
        position = 0
        trim_next = False
        for match in _ACTION.finditer(source):
            text = source[position : match.start()]
            if trim_next:
                text = text.lstrip(" \t\r\n")
            if match.group(1):
                text = text.rstrip(" \t\r\n")
            if text:
                self.items.append(("text", text))
            inner = match.group(2).strip()
            if not (inner.startswith("/*") and inner.endswith("*/")):
                self.items.append(("action", _tokens(inner)))
            trim_next = bool(match.group(3))
            position = match.end()
        text = source[position:]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if "{{" in text:
            raise GoTemplateError(f"an action is not closed: {text[text.index('{{') :][:40]!r}")
        if text:
            self.items.append(("text", text))
        self.index = 0

    def parse(self) -> list[_Node]:
        nodes, stop = self._block()
        if stop is not None:
            raise GoTemplateError(f"unexpected {{{{ {' '.join(t for _, t in stop)} }}}}")
        return nodes

    def _block(self) -> tuple[list[_Node], list[tuple[str, str]] | None]:
        """Nodes up to an `else` or `end` (returned as the stop), or to the end of the source."""
        nodes: list[_Node] = []
        while self.index < len(self.items):
            kind, value = self.items[self.index]
            self.index += 1
            if kind == "text":
                nodes.append(_Node("text", text=value))
                continue
            tokens: list[tuple[str, str]] = value
            head = tokens[0][1] if tokens and tokens[0][0] == "word" else ""
            if head in ("else", "end"):
                return nodes, tokens
            if head == "if":
                nodes.append(self._if(tokens[1:]))
            elif head == "range":
                nodes.append(self._range(tokens[1:]))
            elif head in ("with", "define", "template", "block", "break", "continue"):
                raise GoTemplateError(f"{{{{ {head} }}}} is outside the subset this renderer reads")
            elif len(tokens) > 2 and tokens[0][0] == "variable" and tokens[1][0] in ("declare", "punct"):
                if tokens[1][1] not in (":=", "="):
                    raise GoTemplateError(f"cannot read {{{{ {' '.join(t for _, t in tokens)} }}}}")
                node = _Node("assign", text=tokens[1][1], names=[tokens[0][1]], expr=_expression(tokens[2:]))
                nodes.append(node)
            else:
                nodes.append(_Node("print", expr=_expression(tokens)))
        return nodes, None

    def _if(self, condition: list[tuple[str, str]]) -> _Node:
        node = _Node("if", expr=_expression(condition))
        node.body, stop = self._block()
        if stop is None:
            raise GoTemplateError("{{ if }} has no {{ end }}")
        if stop[0][1] == "else":
            if len(stop) > 1 and stop[1][1] == "if":
                node.orelse = [self._if(stop[2:])]  # the chained if consumed the shared end
                return node
            node.orelse, stop = self._block()
            if stop is None or stop[0][1] != "end":
                raise GoTemplateError("{{ else }} has no {{ end }}")
        return node

    def _range(self, tokens: list[tuple[str, str]]) -> _Node:
        names: list[str] = []
        if any(kind == "declare" for kind, _ in tokens):
            at = next(i for i, (kind, _) in enumerate(tokens) if kind == "declare")
            names = [value for kind, value in tokens[:at] if kind == "variable"]
            tokens = tokens[at + 1 :]
        node = _Node("range", names=names, expr=_expression(tokens))
        node.body, stop = self._block()
        if stop is None:
            raise GoTemplateError("{{ range }} has no {{ end }}")
        if stop[0][1] == "else":
            node.orelse, stop = self._block()
            if stop is None:
                raise GoTemplateError("{{ range }} ... {{ else }} has no {{ end }}")
        return node


def _expression(tokens: list[tuple[str, str]]) -> Any:
    expr, rest = _command(tokens)
    if rest:
        raise GoTemplateError(f"cannot read {' '.join(t for _, t in rest)!r} (pipes are outside the subset)")
    return expr


def _command(tokens: list[tuple[str, str]]) -> tuple[Any, list[tuple[str, str]]]:
    """("call", name, args) or an operand; the tokens after it (at a ')' or the end)."""
    if not tokens:
        raise GoTemplateError("an empty action or argument")
    kind, value = tokens[0]
    if kind == "word" and value in _FUNCTIONS:
        args = []
        rest = tokens[1:]
        while rest and rest[0] != ("punct", ")"):
            arg, rest = _operand(rest)
            args.append(arg)
        return ("call", value, args), rest
    return _operand(tokens)


def _operand(tokens: list[tuple[str, str]]) -> tuple[Any, list[tuple[str, str]]]:
    kind, value = tokens[0]
    rest = tokens[1:]
    if (kind, value) == ("punct", "("):
        inner, rest = _command(rest)
        if not rest or rest[0] != ("punct", ")"):
            raise GoTemplateError("a '(' is not closed")
        return inner, rest[1:]
    if kind == "string":
        return ("literal", json.loads(value)), rest
    if kind == "raw":
        return ("literal", value[1:-1]), rest
    if kind == "number":
        return ("literal", int(value)), rest
    if kind == "word" and value in ("true", "false"):
        return ("literal", value == "true"), rest
    if kind == "variable":
        name, *path = value.split(".")
        return ("variable", name, path), rest
    if kind == "field":
        return ("field", [p for p in value.split(".") if p]), rest
    raise GoTemplateError(f"{value!r} is outside the subset this renderer reads")


# ------------------------------------------------------------------ evaluating


def _truth(value: Any) -> bool:
    """Go's: false, 0, nil and empty strings, lists and maps are false."""
    return bool(value)


def _compare(op: str, left: Any, right: Any) -> bool:
    if op == "lt":
        return left < right
    if op == "le":
        return left <= right
    if op == "gt":
        return left > right
    return left >= right


_FUNCTIONS = ("eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "len", "slice", "index")


def _lookup(value: Any, path: Sequence[str]) -> Any:
    for name in path:
        if isinstance(value, dict):
            value = value.get(name)
        else:
            raise GoTemplateError(f"cannot take .{name} of {type(value).__name__}")
    return value


class _Scope:
    def __init__(self, root: Any) -> None:
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def get(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")


def _eval(expr: Any, dot: Any, scope: _Scope) -> Any:
    kind = expr[0]
    if kind == "literal":
        return expr[1]
    if kind == "variable":
        return _lookup(scope.get(expr[1]), expr[2])
    if kind == "field":
        return _lookup(dot, expr[1])
    _, name, args = expr
    if name in ("and", "or"):  # short-circuit, returning the deciding value, as Go 1.18+
        value = None
        for arg in args:
            value = _eval(arg, dot, scope)
            if _truth(value) != (name == "and"):
                return value
        return value
    values = [_eval(arg, dot, scope) for arg in args]
    if name == "not":
        return not _truth(values[0])
    if name == "eq":
        return any(values[0] == other for other in values[1:])
    if name == "ne":
        return values[0] != values[1]
    if name in ("lt", "le", "gt", "ge"):
        return _compare(name, values[0], values[1])
    if name == "len":
        return len(values[0])
    if name == "slice":
        bounds = values[1:] + [None] * (3 - len(values))
        return values[0][bounds[0] : bounds[1]]
    # index
    value = values[0]
    for key in values[1:]:
        value = value[key]
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _run(nodes: list[_Node], dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "print":
            out.append(_text(_eval(node.expr, dot, scope)))
        elif node.kind == "assign":  # := declares in this block; = sets the variable where declared
            value = _eval(node.expr, dot, scope)
            name = node.names[0]
            target = scope.frames[-1]
            if node.text == "=":
                scope.get(name)  # undefined: GoTemplateError, as Go refuses it
                target = next(f for f in reversed(scope.frames) if name in f)
            target[name] = value
        elif node.kind == "if":
            scope.frames.append({})
            _run(node.body if _truth(_eval(node.expr, dot, scope)) else node.orelse, dot, scope, out)
            scope.frames.pop()
        else:  # range
            items = _eval(node.expr, dot, scope)
            pairs = list(items.items()) if isinstance(items, dict) else list(enumerate(items or []))
            if not pairs:
                scope.frames.append({})
                _run(node.orelse, dot, scope, out)
                scope.frames.pop()
            for key, item in pairs:
                frame: dict[str, Any] = {}
                if len(node.names) == 1:
                    frame[node.names[0]] = item
                elif len(node.names) == 2:
                    frame[node.names[0]], frame[node.names[1]] = key, item
                scope.frames.append(frame)
                _run(node.body, item, scope, out)
                scope.frames.pop()


def render(template: str, data: Any) -> str:
    """`template` executed on `data` (dicts for Go's structs and maps) as Go's text/template
    executes it, for the subset in this module's docstring."""
    nodes = _Parser(template).parse()
    out: list[str] = []
    _run(nodes, data, _Scope(data), out)
    return "".join(out)


# ------------------------------------------------------------------ Ollama


def ollama_prompt(template: str, system: str, messages: Sequence[dict[str, Any]]) -> str:
    """The prompt Ollama gives the model for `messages` under a Modelfile's TEMPLATE and SYSTEM:
    SYSTEM goes first when the chat brings no system message, consecutive messages of one role
    are joined by a blank line, and .System is every system message joined the same way (as in
    Ollama's chat handler and template.Execute)."""
    chat = [{"Role": m["role"], "Content": m.get("content") or ""} for m in messages]
    if system and (not chat or chat[0]["Role"] != "system"):
        chat.insert(0, {"Role": "system", "Content": system})
    collated: list[dict[str, Any]] = []
    for message in chat:
        if collated and collated[-1]["Role"] == message["Role"]:
            collated[-1] = {**collated[-1], "Content": collated[-1]["Content"] + "\n\n" + message["Content"]}
        else:
            collated.append(dict(message))
    systems = [m["Content"] for m in chat if m["Role"] == "system"]
    return render(template, {"System": "\n\n".join(systems), "Messages": collated, "Response": ""})
