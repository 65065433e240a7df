"""The run's checkpoints and final adapter; choosing one opens it in the Chat pane."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import on
from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from .run_state import RunState


class CheckpointList(OptionList):
    @dataclass
    class Chosen(Message):
        """A checkpoint or adapter folder to chat with."""

        checkpoint_list: CheckpointList
        path: str

        @property
        def control(self) -> CheckpointList:
            return self.checkpoint_list

    def show(self, run: RunState) -> None:
        # Those --save_total_limit (or a person) removed since they were saved are not offered.
        options = [
            Option(f"step {step}", id=path) for step, path in sorted(run.checkpoints) if Path(path).is_dir()
        ]
        if run.adapter_dir:
            options.append(Option(f"final adapter ({run.status})", id=run.adapter_dir))
        if [o.id for o in options] == [self.get_option_at_index(i).id for i in range(self.option_count)]:
            return  # unchanged: keep the highlight where the person left it
        self.clear_options()
        self.add_options(options)

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        path = event.option.id
        if not path:
            return
        if not Path(path).is_dir():  # removed after the list was drawn
            self.notify(f"{event.option.prompt} is no longer on disk: choose another", severity="warning")
            self.remove_option(path)
            return
        self.post_message(self.Chosen(self, path))
