"""The TUI's side of the engine socket: connect to (or start) the engine, read events, send requests.

A reader task turns every protocol event into a Textual message posted to the app; requests go
out through an asyncio.Queue that a writer task drains, so no pane ever awaits the socket. The
engine is a separate, detached process (DESIGN.md): closing the TUI leaves a training run going.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from textual.message import Message
from textual.message_pump import MessagePump
from tunebench.engine.core import protocol as P
from tunebench.engine.core.workspace import Workspace
from tunebench.engine.process.client import READ_LIMIT, ensure_engine

CLIENT_NAME = "tui"
# A killed engine closes its socket at once (EOF); the pid check catches an engine that hangs
# with its socket still open, so the TUI says the engine is gone within a second either way.
LIVENESS_INTERVAL_S = 0.5
START_TIMEOUT_S = 30.0
Starter = Callable[[Path, float], object]


class EngineClient:
    """One connection to the engine; posts the messages below to `target` (the app)."""

    @dataclass
    class Connected(Message):
        """The engine answered with its Snapshot; `history` replays the current run's events."""

        snapshot: P.Snapshot
        history: list[P.Event] = field(default_factory=list)

    @dataclass
    class EventReceived(Message):
        event: P.Event

    @dataclass
    class MemorySampled(Message):
        """A memory sample; only the newest one waiting in the queue is drawn."""

        sample: P.MemorySample

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, EngineClient.MemorySampled)

    @dataclass
    class ProgressTicked(Message):
        """A progress tick; only the newest one waiting in the queue is drawn."""

        progress: P.Progress

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, EngineClient.ProgressTicked)

    @dataclass
    class Disconnected(Message):
        """The engine went away (killed, crashed, or shut down) or could not be reached."""

        reason: str

    def __init__(
        self,
        target: MessagePump,
        workspace: Path,
        *,
        starter: Starter = ensure_engine,
        connect_timeout: float = START_TIMEOUT_S,
    ) -> None:
        self.target = target
        self.workspace = workspace
        self.starter = starter
        self.connect_timeout = connect_timeout
        self.engine_pid = 0
        self._ids = itertools.count(1)
        self._outbox: asyncio.Queue[P.Request] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._writer: asyncio.StreamWriter | None = None
        self._closing = False
        self._lost = False

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._lost

    # ------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Reach the workspace's engine, starting a detached one if none is alive.

        Raises the starter's error (EngineUnavailable, with the end of the engine log) or OSError.
        """
        self._closing = False
        self._lost = False
        # ensure_engine blocks while a fresh interpreter starts: keep it off the event loop.
        await asyncio.to_thread(self.starter, self.workspace, self.connect_timeout)
        path = Workspace(self.workspace).socket_path
        # A Snapshot carries a whole run's history on one line: read with a large limit.
        reader, writer = await asyncio.open_unix_connection(str(path), limit=READ_LIMIT)
        self._writer = writer
        self._outbox = asyncio.Queue()
        self._outbox.put_nowait(P.Hello(id=self._next_id(), client=CLIENT_NAME, pid=os.getpid()))
        self._tasks = [
            asyncio.create_task(self._read_loop(reader), name="engine-reader"),
            asyncio.create_task(self._write_loop(writer), name="engine-writer"),
            asyncio.create_task(self._watch_pid(), name="engine-liveness"),
        ]

    def take_control(self) -> str:
        """Ask to control the workspace from this TUI (another session turns read-only)."""
        return self.send(P.Hello(client=CLIENT_NAME, pid=os.getpid(), take_control=True))

    async def close(self) -> None:
        """Drop the connection; the engine (and any job in it) keeps running."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None

    # ------------------------------------------------------------- requests

    def send(self, request: P.Request) -> str:
        """Queue a request; returns its id, which the answering events echo."""
        if not request.id:
            request = dataclasses.replace(request, id=self._next_id())
        self._outbox.put_nowait(request)
        return request.id

    def _next_id(self) -> str:
        return f"tui-{next(self._ids)}"

    # ---------------------------------------------------------------- tasks

    async def _write_loop(self, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await self._outbox.get()
            try:
                writer.write(P.encode(request))
                await writer.drain()
            except (ConnectionError, RuntimeError):
                self._lose("the engine closed the connection")
                return

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, ValueError):  # ValueError: a line over the stream limit
                line = b""
            if not line:
                self._lose("the engine closed the connection")
                return
            try:
                event = P.decode(line)
            except P.ProtocolError as exc:
                # A newer engine may send something this TUI does not know: say so, keep reading.
                event = P.Log(level="warning", message=f"unreadable message from the engine: {exc}")
            self._dispatch(event)

    def _dispatch(self, event: P.Message) -> None:
        post = self.target.post_message
        if isinstance(event, P.Snapshot):
            self.engine_pid = event.engine_pid
            post(self.Connected(event, decode_events(event.history)))
        elif isinstance(event, P.MemorySample):
            post(self.MemorySampled(event))
        elif isinstance(event, P.Progress):
            post(self.ProgressTicked(event))
        elif isinstance(event, P.Event):
            post(self.EventReceived(event))

    async def _watch_pid(self) -> None:
        # EOF on the socket is the usual signal; a pid that vanished catches the rest within 2 s.
        while True:
            await asyncio.sleep(LIVENESS_INTERVAL_S)
            if self.engine_pid and not pid_alive(self.engine_pid):
                self._lose(f"the engine process ({self.engine_pid}) is gone")
                return

    def _lose(self, reason: str) -> None:
        if self._closing or self._lost:
            return
        self._lost = True
        self.target.post_message(self.Disconnected(reason))
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()


def decode_events(items: Iterable[dict | bytes]) -> list[P.Event]:
    """A Snapshot's history (dicts) or a metrics.jsonl (lines) as typed events.

    Entries this TUI cannot read, such as a line cut short by a kill mid-write, are skipped.
    """
    events: list[P.Event] = []
    for item in items:
        try:
            message = P.decode(item) if isinstance(item, bytes) else P.from_dict(item)
        except (P.ProtocolError, TypeError):
            continue
        if isinstance(message, P.Event):
            events.append(message)
    return events


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def error_text(error: P.EngineError) -> str:
    """An engine error as a person reads it: what happened, then (if known) what to do."""
    message, hint = error.message.strip(), error.hint.strip()
    return f"{message}\nwhat to do: {hint}" if hint else message
