"""One line at the top: the engine's state, who controls the workspace, the job, memory in brief,
and the deployment the workbench started (its address, served names and live requests)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static
from tunebench.engine.core import protocol as P

from ..gpu.memory_gauge import GIB, gib


class StatusBar(Static):
    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.engine = "starting"  # starting, connected, lost
        self.detail = ""
        self.read_only = ""  # who controls the workspace, when it is not this TUI
        self.job = ""
        self.memory = ""
        self.deploy = ""  # the workbench's deployment: address, served names, live requests

    def set_engine(self, state: str, detail: str = "") -> None:
        self.engine, self.detail = state, detail
        if state != "connected":
            self.memory = ""  # a lost or restarting engine's last sample no longer says anything
        self._draw()

    def set_snapshot(self, snapshot: P.Snapshot) -> None:
        self.job = snapshot.job
        controlled_elsewhere = not snapshot.controller and snapshot.controller_client
        self.read_only = snapshot.controller_client if controlled_elsewhere else ""
        self._draw()

    def set_job(self, job: str) -> None:
        self.job = job
        self._draw()

    def set_read_only(self, holder: str) -> None:
        self.read_only = holder
        self._draw()

    def set_memory(self, sample: P.MemorySample) -> None:
        if sample.gpus:
            used = sum(g.get("used", 0) for g in sample.gpus)
            total = sum(g.get("total", 0) for g in sample.gpus) or 1
            self.memory = f"GPU {used / GIB:.1f}/{total / GIB:.0f} GiB"
        else:
            self.memory = f"engine RAM {gib(sample.rss)}"
        self._draw()

    def set_deploy(self, text: str) -> None:
        self.deploy = text
        self._draw()

    def _draw(self) -> None:
        text = Text()
        style = {"connected": "bold green", "starting": "bold yellow", "lost": "bold red"}[self.engine]
        mark = {"connected": "●", "starting": "◌", "lost": "✗"}[self.engine]
        text.append(f"{mark} engine {self.engine}", style=style)
        if self.detail:
            text.append(f" {self.detail}", style="dim")
        if self.job:
            text.append(f"  ·  {self.job} running", style="bold")
        if self.read_only:
            text.append(f"  ·  read-only: {self.read_only} controls this workspace", style="bold yellow")
        # the deployment's address before the memory line: at 80 columns the end is cut off,
        # and the address is shown nowhere else
        if self.deploy:
            text.append(f"  ·  {self.deploy}", style="bold cyan")
        if self.memory:
            text.append(f"  ·  {self.memory}", style="dim")
        self.update(text)
