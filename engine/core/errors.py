"""Errors a person can cause: each says what happened and what to do about it.

The CLI prints them without a traceback; the engine server turns them into EngineError events.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_SHOWN_PROBLEMS = 10


class UserError(Exception):
    """Something the user can fix: a bad path, bad data, a setting the machine cannot honour."""

    code = "user"

    def __init__(self, message: str, hint: str = "", code: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code:
            self.code = code

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ModelError(UserError):
    code = "model"


class DataUserError(UserError):
    code = "data"


class DataError(DataUserError, ValueError):
    """The whole load of a dataset failed (no file, unreadable file, no valid sample); `problems`
    (engine/core/data.py's RecordProblems) say where, the first few of them shown."""

    def __init__(self, message: str, problems: Sequence[Any] = (), hint: str = ""):
        self.problems = list(problems)
        super().__init__(message, hint)

    def __str__(self) -> str:
        lines = [self.message]
        lines += [f"  {p}" for p in self.problems[:_SHOWN_PROBLEMS]]
        if len(self.problems) > _SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - _SHOWN_PROBLEMS} more")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


class Cancelled(Exception):
    """The person stopped the work (an abort, Ctrl-C, `tunebench stop`) before it finished: not a
    failure. Raised between samples while data is read and tokenised, and between layers in a step."""


def raise_if_cancelled(cancel: Any) -> None:
    """Raise Cancelled once `cancel` (a threading.Event, or None for work that cannot be stopped)
    is set: called between samples by loops that can run for minutes."""
    if cancel is not None and cancel.is_set():
        raise Cancelled()
