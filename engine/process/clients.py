"""The engine's attached clients: each one's outgoing queue, and which one controls the workspace.

The first client to say Hello (without observe) controls the workspace; later ones watch
read-only until it leaves, when the longest-attached one that asked for control takes over and is
told so. Every event goes to every client through its own queue, drained by its own writer task,
so one slow reader never holds up the others; one that stops reading altogether is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..core import protocol as P

# Bytes queued for one client; one this far behind has stopped reading and is dropped (it
# reattaches and gets a fresh Snapshot). One line alone is always queued: a Snapshot of a long
# run is tens of MiB.
MAX_CLIENT_BACKLOG_BYTES = 64 * 2**20
# Requests that change what the engine does; read-only clients may not send them.
CONTROL_REQUESTS = frozenset(
    ["StartTraining", "StopTraining", "Generate", "CancelGenerate", "Export", "LoadModel", "Shutdown"]
)


@dataclass(eq=False)
class Client:
    number: int
    writer: asyncio.StreamWriter
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    name: str = ""
    pid: int = 0
    observe: bool = False
    task: asyncio.Task[None] | None = None
    closed: bool = False
    queued_bytes: int = 0  # in `queue`, not yet handed to the socket

    @property
    def label(self) -> str:
        name = self.name or "a client"
        return f"{name} (pid {self.pid})" if self.pid else f"{name} #{self.number}"

    async def write_forever(self) -> None:
        """Send the queued lines until a None says to stop, or the peer goes away."""
        try:
            while True:
                line = await self.queue.get()
                if line is None:
                    break
                self.queued_bytes -= len(line)
                self.writer.write(line)
                await self.writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.closed = True
            self.writer.close()


class ClientRegistry:
    """The attached clients in the order they came, and the one in control (or None)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log
        self._clients: list[Client] = []
        self._numbers = 0
        self.controller: Client | None = None

    def __len__(self) -> int:
        return len(self._clients)

    def __iter__(self) -> Iterator[Client]:
        return iter(list(self._clients))

    def add(self, writer: asyncio.StreamWriter, pid: int) -> Client:
        """A client that just connected, with its writer task started."""
        self._numbers += 1
        client = Client(self._numbers, writer, pid=pid)
        self._clients.append(client)
        client.task = asyncio.create_task(client.write_forever())
        return client

    def remove(self, client: Client) -> None:
        """A client left: its writer stops, and if it was in control, control passes on."""
        if client not in self._clients:
            return
        self._clients.remove(client)
        client.closed = True
        client.queue.put_nowait(None)
        if self.controller is client:
            self.controller = None
            # The longest-attached session that asked for control gets it, and is told so: a
            # read-only TUI left behind becomes the one that controls, without asking.
            heir = next((other for other in self._clients if not other.observe), None)
            if heir is None:
                self._log(f"{client.label} disconnected; no session controls the workspace")
            else:
                self.set_controller(heir, f"{client.label} disconnected")

    async def close_all(self, timeout: float) -> None:
        """Flush what each client has queued (waiting at most `timeout`), then close them all."""
        for client in self:
            client.queue.put_nowait(None)
        writers = [c.task for c in self._clients if c.task is not None]
        if writers:
            await asyncio.wait(writers, timeout=timeout)
        for client in self:
            client.writer.close()

    # ---------------------------------------------------------------- sending

    def send(self, client: Client, event: P.Event) -> None:
        self._enqueue(client, P.encode(event))

    def broadcast(self, event: P.Event) -> None:
        line = P.encode(event)
        for client in self:
            self._enqueue(client, line)

    def _enqueue(self, client: Client, line: bytes) -> None:
        if client.closed:
            return
        if client.queued_bytes + len(line) > MAX_CLIENT_BACKLOG_BYTES and client.queued_bytes:
            self._drop(client)
            return
        client.queue.put_nowait(line)
        client.queued_bytes += len(line)

    def _drop(self, client: Client) -> None:
        """A client that stopped reading would grow the engine's memory without bound: close it,
        and free what was queued for it at once."""
        self._log(
            f"dropping {client.label}: it stopped reading ({client.queued_bytes / 2**20:.1f} MiB unsent)"
        )
        client.closed = True
        while not client.queue.empty():
            client.queue.get_nowait()
        client.queued_bytes = 0
        client.queue.put_nowait(None)
        client.writer.transport.abort()

    # ---------------------------------------------------------------- control

    def hello(self, client: Client, msg: P.Hello) -> None:
        """Who the client is, and whether it asks for control, observes, or takes control."""
        client.name = msg.client or client.name
        client.pid = msg.pid or client.pid
        client.observe = msg.observe
        if msg.observe:
            if self.controller is client:
                self.controller = None  # it steps down; the next job request takes the slot
        elif self.controller is None or self.controller is client:
            self.controller = client
            self._log(f"{client.label} controls the workspace")
        elif msg.take_control:
            self.set_controller(client, f"{client.label} took control")

    def may_control(self, client: Client) -> bool:
        """Whether `client` may send a control request; one that asks while nobody controls gets it."""
        if self.controller is client:
            return True
        if self.controller is None and not client.observe:
            self.set_controller(client, "no other session was controlling this workspace")
            return True
        return False

    def set_controller(self, client: Client | None, why: str) -> None:
        """Hand control to `client`, telling it and the one that had it."""
        old = self.controller
        self.controller = client
        if client is not None:
            self._log(f"{client.label} controls the workspace ({why})")
            self.send(client, P.ControlChanged(controller=True, controller_client=client.label, message=why))
        if old is not None and old is not client and not old.closed:
            self.send(
                old,
                P.ControlChanged(
                    controller=False,
                    controller_client=client.label if client else "",
                    message=f"{client.label if client else 'another session'} took control of this "
                    "workspace; this session is read-only now",
                ),
            )

    def read_only_error(self, request_id: str) -> P.EngineError:
        """The answer to a control request from a client that may not control."""
        if self.controller is None:  # an observer, with nobody in control
            message = "this session attached as an observer, which is read-only"
            hint = "connect without observe (or say Hello again without it) to control the workspace"
        else:
            message = f"{self.controller.label} controls this workspace; this session is read-only"
            hint = (
                "it still shows the same live state. To control from here, close the other session, "
                "or take control (in the TUI: ctrl+p, Engine: take control; the other one turns read-only)"
            )
        return P.EngineError(id=request_id, code="read_only", message=message, hint=hint)
