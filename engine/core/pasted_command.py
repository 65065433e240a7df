"""A shell command as people paste it from an article, read into its words without a shell.

ms-swift's examples are shell scripts: a `# 22GB` comment above the command, lines continued with
a backslash (often with spaces after it, copied from a web page), `nproc_per_node=2` on a line of
its own, `NPROC_PER_NODE=$nproc_per_node` in front of `swift sft`,
`--gradient_accumulation_steps $(expr 16 / $nproc_per_node)`, and `nohup ... > train.log 2>&1 &`
around it. Those are read as bash reads them; other shell syntax is refused with what to write
instead, and so is a second command.
"""

from __future__ import annotations

import operator
import re
import shlex
from typing import NamedTuple

from .errors import UserError

ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=")
# `$name`, `${name}`, `$(expr a op b)` and other substitutions, not where a backslash escapes them
VARIABLE = re.compile(r"(?<!\\)\$(?:\{(\w+)\}|([A-Za-z_]\w*))")
EXPR = re.compile(r"(?<!\\)\$\(\s*expr\s+(\S+)\s+(\S+)\s+(\S+)\s*\)")
SUBSTITUTION = re.compile(r"(?<!\\)\$\([^)]*\)?|(?<!\\)`[^`]*`?")
EXPR_OPERATORS = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.floordiv,
    "%": operator.mod,
}
# What only says where the output goes (`> train.log 2>&1 &`, `| tee train.log`, `nohup`): the
# workbench keeps the run's log itself.
OUTPUT_TAIL = re.compile(
    r"(\s*(\d?>>?|&>)\s*[^\s&|;<>]+|\s*\d?>&\d|\s*\|\s*tee(\s+-a)?\s+[^\s&|;<>]+|\s*&)+\s*$"
)
OPERATOR_CHARS = set("();<>|&")
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)


class PastedCommand(NamedTuple):
    environment: dict[str, str]  # `NPROC_PER_NODE=2` in front of the command
    words: list[str]  # the command's own, from `swift` on
    notes: list[str]  # what was left out, and why


def read_command(text: str) -> PastedCommand:
    """The one command in `text`, with `$name` and `$(expr a / b)` worked out from the lines before
    it. UserError for what a shell would be needed for, and for a second command."""
    variables: dict[str, str] = {}
    exported: dict[str, str] = {}  # `export NPROC_PER_NODE=2`: the command's environment too
    command: list[str] | None = None
    shell_only: list[str] = []  # nohup, and the redirections after the command
    for line, statement in _statements(text):
        if command is not None:
            raise UserError(
                f"line {line} starts a second command ({' '.join(statement.split()[:3])} ...)",
                "paste one command; run the others in a shell",
            )
        statement, tail = _without_output_tail(statement)
        words = _words(_expand(statement, variables, line), line)
        export = words[:1] == ["export"]
        if all(ASSIGNMENT.match(word) or (export and word.isidentifier()) for word in words[export:]):
            # `nproc_per_node=2` on its own line; `export NAME=2`, or `export NAME` of one set before
            assigned = {}
            for word in words[export:]:
                name, has_value, value = word.partition("=")
                assigned[name] = value if has_value else variables.get(name, "")
            variables.update(assigned)
            exported.update(assigned if export else {})
            continue
        command = words
        shell_only = [tail] if tail else []
    words = command or []
    environment = dict(exported)
    while words and ASSIGNMENT.match(words[0]):
        name, value = words.pop(0).split("=", 1)
        environment[name] = value
    if words[:1] == ["nohup"]:  # `NPROC_PER_NODE=2 nohup swift sft ...` as well as `nohup swift sft ...`
        shell_only.insert(0, words.pop(0))
    notes = []
    if shell_only:
        said = " and ".join(f"`{part}`" for part in shell_only)
        notes.append(f"{said}: where the output goes; the workbench keeps the run's log")
    return PastedCommand(environment, words, notes)


def shown_variable(name: str, value: str) -> str:
    """`NAME=value` for a note, the value hidden when the name says it is a secret (HF_TOKEN)."""
    return f"{name}=..." if SECRET_NAME.search(name) else f"{name}={value}"


def _without_output_tail(statement: str) -> tuple[str, str]:
    """The statement without `> train.log 2>&1 &` (or `| tee log`) at its end, and that tail; a
    `>` inside a quoted value (--system "x > y") is the value's."""
    for start in (i for i, ch in enumerate(statement) if ch in " \t>&|" or ch.isdigit()):
        tail = OUTPUT_TAIL.match(statement, start)
        if tail is None or any(quote in tail.group(0) for quote in "'\""):
            continue
        try:
            shlex.split(statement[:start])
        except ValueError:  # it starts inside a quoted value
            continue
        return statement[:start], tail.group(0).strip()
    return statement, ""


def _statements(text: str) -> list[tuple[int, str]]:
    """The text's commands, each with the line it starts on. A backslash at a line's end (spaces
    after it too) continues the command, a quoted value may span lines, and a `#` that starts a
    word starts a comment (not the one in `--dataset data#500`)."""
    statements: list[tuple[int, str]] = []
    current, start, line, quote, quote_line = "", 1, 1, "", 0
    text = text.replace("\r\n", "\n").replace("\r", "\n") + "\n"
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\" and quote == '"':
                ch = text[i : i + 2]
            elif ch == quote:
                quote = ""
        elif ch == "\\":
            continued = re.match(r"\\[ \t]*\n", text[i:])
            if continued:
                current, line, i = current + " ", line + 1, i + continued.end()
                continue
            ch = text[i : i + 2]
        elif ch == "#" and (not current or current[-1].isspace()):
            i = text.index("\n", i)
            continue
        elif ch == "\n":
            if current.strip():
                statements.append((start, current))
            current, line, i = "", line + 1, i + 1
            continue
        elif ch in "'\"":
            quote, quote_line = ch, line
        if not current.strip() and not ch.isspace():
            start = line
        current += ch
        line += ch.count("\n")
        i += len(ch)
    if quote:
        raise UserError(
            f"the command cannot be read: the quote opened on line {quote_line} is never closed",
            "check its quotes",
        )
    if current.strip():  # the text ended in a continuation backslash
        statements.append((start, current))
    return statements


def _expand(statement: str, variables: dict[str, str], line: int) -> str:
    """$name, ${name} and $(expr a op b) as bash gives them, from the lines before; not inside
    single quotes, nor escaped (\\$). UserError for any other substitution ($(nproc), `...`)."""

    def variable(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise UserError(
                f"line {line}: ${name} is not set in the pasted text",
                f"put its value in its place, or paste the line that sets it ({name}=...) too",
            )
        return variables[name]

    def expr(match: re.Match[str]) -> str:
        left, op, right = (VARIABLE.sub(variable, part) for part in match.groups())
        numbers = left.lstrip("-").isdigit() and right.lstrip("-").isdigit()
        if op not in EXPR_OPERATORS or not numbers or (op in "/%" and int(right) == 0):
            raise UserError(
                f"line {line}: {match.group(0)} is not whole-number arithmetic the workbench can do",
                "put the value it gives instead",
            )
        return str(EXPR_OPERATORS[op](int(left), int(right)))

    def expanded(part: str) -> str:
        part = EXPR.sub(expr, part)
        substitution = SUBSTITUTION.search(part)
        if substitution:
            raise UserError(
                f"line {line}: {substitution.group(0)} needs a shell to run it, and the workbench runs none",
                "put the value it gives instead, or run the command in a shell",
            )
        # bash drops the backslash of an escaped \\$ or \\` (shlex keeps it inside double quotes)
        return VARIABLE.sub(variable, part).replace("\\$", "$").replace("\\`", "`")

    return "".join(expanded(part) if expands else part for part, expands in _quoting(statement))


def _quoting(statement: str) -> list[tuple[str, bool]]:
    """The statement cut where single quotes open and close: (text, whether bash expands `$` in
    it); a single-quoted part (its quotes with it) is left as it is."""
    parts: list[tuple[str, bool]] = []
    start = i = 0
    double = False
    while i < len(statement):
        ch = statement[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            double = not double
        elif ch == "'" and not double:
            end = statement.find("'", i + 1)
            end = len(statement) if end < 0 else end + 1
            parts += [(statement[start:i], True), (statement[i:end], False)]
            start = i = end
            continue
        i += 1
    return [*parts, (statement[start:], True)]


def _words(statement: str, line: int) -> list[str]:
    """The statement's words as bash splits them; UserError for an operator (`|`, `;`)."""
    lexer = shlex.shlex(statement, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    try:
        words = list(lexer)
    except ValueError as exc:  # a quote a variable's value opened
        raise UserError(f"line {line}: the command cannot be read: {exc}", "check its quotes") from None
    for word in words:
        if set(word) <= OPERATOR_CHARS:
            raise UserError(
                f"line {line}: {word!r} is shell syntax, and the workbench runs no shell",
                "paste the command alone, or run it in a shell",
            )
    return words
