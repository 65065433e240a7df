"""The `tunebench train ...` command equivalent to the form, shown live and copyable."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class CommandLine(Static):
    """Shows the command for the last valid form; says how many fields still need fixing."""

    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.command = ""

    def show(self, command: str, errors: dict[str, str]) -> None:
        self.command = command
        text = Text()
        if errors:
            names = ", ".join(sorted(errors))
            text.append(f"fix {len(errors)} field(s) first: {names}\n", style="bold red")
        text.append("$ ", style="dim")
        text.append(command, style="dim" if errors else "")
        self.update(text)
