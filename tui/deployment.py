"""A deployment started from the workbench: `tunebench deploy` as a child process, watched over HTTP.

The TUI never imports torch, so the server runs as its own process, started with the very command
a person would type (the palette copies it), on loopback only. Its state comes from its own
endpoints: /health once the model has loaded, /metrics for the live request count. The
deployment belongs to this TUI session: quitting the workbench stops it (the log stays in
.tunebench/deploy.log).
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunebench.engine.core.workspace import checkpoint_step

from .widgets.chat.column_choices import BASE, ColumnChoice

DEFAULT_PORT = 8000
POLL_TIMEOUT_S = 0.5
_RUNNING = re.compile(r"^tunebench_requests_running (\d+)", re.MULTILINE)
_WAITING = re.compile(r"^tunebench_requests_waiting (\d+)", re.MULTILINE)


def served_name(target: ColumnChoice) -> str:
    """The name a client asks for: the run id for a final adapter, <run id>-step-<n> for a
    checkpoint (a column label has spaces, which a served name may not)."""
    path = Path(target.path)
    if path.name == "adapter":
        return path.parent.name
    if checkpoint_step(path) is not None and path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}-{path.name}"
    return path.name


def free_port(preferred: int = DEFAULT_PORT) -> int:
    """`preferred` if nothing listens there on loopback, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1")


@dataclass(frozen=True)
class DeployPlan:
    """What a deployment serves and the command that starts it."""

    args: tuple[str, ...]  # after `tunebench deploy`
    port: int
    names: tuple[str, ...]  # served names, the base first

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> str:
        """The equivalent command, for a person to copy."""
        return "tunebench deploy " + " ".join(shlex.quote(a) for a in self.args)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "tunebench.engine.cli.main", "deploy", *self.args]


def plan_deploy(targets: list[ColumnChoice], model: str, port: int) -> DeployPlan:
    """Serve the Chat pane's columns: the base and each adapter. With adapters, their runs name the
    base model (deploy refuses a --model they were not trained on); without, the form's model."""
    adapters = [t for t in targets if t.path != BASE]
    args: list[str] = []
    if not adapters:
        args += ["--model", model]
    else:
        args += ["--adapters", *(f"{served_name(t)}={t.path}" for t in adapters)]
    args += ["--port", str(port)]
    base = model if not adapters else "base"
    return DeployPlan(tuple(args), port, (base, *(served_name(t) for t in adapters)))


@dataclass(frozen=True)
class DeployState:
    phase: str  # starting, serving, failed, stopped
    running: int = 0
    waiting: int = 0
    detail: str = ""  # the base model's served name once known, or why it failed
    names: tuple[str, ...] = ()


class DeployProcess:
    """The child process and what its endpoints say."""

    def __init__(
        self,
        plan: DeployPlan,
        log_path: Path,
        *,
        popen: Callable[..., subprocess.Popen] = subprocess.Popen,
    ) -> None:
        self.plan = plan
        self.log_path = log_path
        self._popen = popen
        self.process: subprocess.Popen | None = None
        self.names: tuple[str, ...] = plan.names

    def start(self, cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = self._popen(
                self.plan.argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (uvicorn finishes the open answers), then SIGKILL if it does not end."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def poll(self) -> DeployState:
        """The server's state now; blocking for up to a second (call it from a worker thread)."""
        if self.process is None:
            return DeployState("stopped")
        code = self.process.poll()
        if code is not None:
            return DeployState("failed" if code else "stopped", detail=self.last_log_line())
        try:
            with urllib.request.urlopen(f"{self.plan.url}/health", timeout=POLL_TIMEOUT_S) as response:
                health = json.loads(response.read())
            with urllib.request.urlopen(f"{self.plan.url}/metrics", timeout=POLL_TIMEOUT_S) as response:
                text = response.read().decode()
        except (OSError, urllib.error.URLError, ValueError):
            return DeployState("starting", detail="loading the model")
        self.names = tuple(health.get("models") or self.names)
        running = _RUNNING.search(text)
        waiting = _WAITING.search(text)
        return DeployState(
            "serving",
            int(running.group(1)) if running else 0,
            int(waiting.group(1)) if waiting else 0,
            names=self.names,
        )

    def last_log_line(self) -> str:
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        errors = [line for line in lines if line.startswith("error:")]
        return (errors or lines or [""])[-1].strip()
