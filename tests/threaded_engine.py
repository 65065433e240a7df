"""The real engine (engine/process/server.py's EngineServer) serving a workspace from a thread of the test
process: torch loads once for the whole test session, and a test can inspect the server directly."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from tunebench.engine.process.client import probe_socket
from tunebench.engine.process.server import EngineServer


class ThreadedEngine:
    def __init__(
        self, workspace: Path, memory_interval: float = 0.4, idle_exit: float = 0, start_s: float = 20
    ):
        self.server = EngineServer(workspace, memory_interval=memory_interval, idle_exit=idle_exit)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_s
        while probe_socket(workspace) != "live":
            assert self.error is None, self.error
            assert time.monotonic() < deadline, "the engine did not start"
            time.sleep(0.01)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self) -> None:
        self.server.request_shutdown("abort")
        self.thread.join(30)
        assert not self.thread.is_alive()
