"""Reaching the engine from outside: start it detached, find a live one, talk to it, print status.

Standard library, orjson and psutil only (never torch or textual): the CLI, scripts and tests use
it, and the TUI may call `ensure_engine()` / `start_engine()` before opening its own asyncio
client. Everything on the wire is protocol.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core import protocol as P
from ..core.files import atomic_write_bytes
from ..core.workspace import RunInfo, Workspace, list_checkpoints

START_TIMEOUT_S = 20.0  # a cold interpreter on a busy box; the engine itself answers in ~0.2 s
LOG_ROTATE_BYTES = 10 * 1024 * 1024
READ_LIMIT = 256 * 1024 * 1024  # a Snapshot carries a run's whole history on one line
# `tunebench stop`: a graceful stop waits for the step in progress (a minute on a busy CPU), then
# SIGTERM (the engine takes a second shutdown request as an abort), then SIGKILL. Every file the
# engine writes is written atomically, so even the kill loses nothing but the unsaved steps.
STOP_GRACEFUL_S = 90.0
STOP_TERM_S = 10.0

_children: dict[int, subprocess.Popen] = {}


class EngineUnavailable(RuntimeError):
    """No engine answers on the workspace's socket, and none could be started; says why."""


class EngineGone(ConnectionError):
    """The engine closed the connection (it exited, or was killed)."""


def _workspace(workspace: Workspace | str | Path) -> Workspace:
    return workspace if isinstance(workspace, Workspace) else Workspace(Path(workspace))


# ================================================================ the engine process


def probe_socket(workspace: Workspace | str | Path, timeout: float = 1.0) -> str:
    """ "live" (something accepts connections), "stale" (a socket file nobody listens on: its
    engine died) or "missing"."""
    path = _workspace(workspace).socket_path
    if not path.exists():
        return "missing"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return "stale"
        except TimeoutError:
            return "live"  # a full backlog: an engine is there, just busy accepting
        except OSError:
            return "stale"
    return "live"


def engine_process(workspace: Workspace | str | Path) -> int | None:
    """The pid in the workspace's pid file if that process is alive and is a TuneBench engine
    (not a zombie, not a recycled pid of another program), else None."""
    import psutil

    pid = _workspace(workspace).read_pid()
    if pid is None:
        return None
    if pid == os.getpid():
        return pid  # an engine serving inside this very process (tests)
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if not any("tunebench" in part for part in proc.cmdline()):
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return pid


def remove_stale_socket(workspace: Workspace | str | Path) -> bool:
    """Delete the socket and pid file a dead engine left behind; True if it did."""
    ws = _workspace(workspace)
    if probe_socket(ws) != "stale" or engine_process(ws) is not None:
        return False
    ws.socket_path.unlink(missing_ok=True)
    ws.pid_file.unlink(missing_ok=True)
    return True


def start_engine(workspace: Workspace | str | Path, *, env: dict[str, str] | None = None) -> int:
    """Launch `tunebench engine` for the workspace, detached, and return its pid.

    A fresh interpreter (not a fork: a forked TUI would carry its threads and terminal state)
    in its own session, so closing the terminal or dropping SSH sends it no SIGHUP; stdin is
    /dev/null and its output goes to the engine log. It does not wait for the engine to listen:
    `ensure_engine` does.
    """
    ws = _workspace(workspace)
    ws.root.mkdir(parents=True, exist_ok=True)
    ws.ensure_state_dir()
    _rotate_log(ws.log_file)
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")  # the log shows what happened up to a crash
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(ws.log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tunebench.engine.cli.main", "engine", "--workspace", str(ws.root)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ws.root,
            env=child_env,
            start_new_session=True,
            close_fds=True,
        )
    # Its pid now, not once its interpreter is up: another `ensure_engine` in that gap must see
    # an engine starting rather than start a second one. The engine rewrites it once it holds
    # the workspace lock.
    atomic_write_bytes(ws.pid_file, str(proc.pid).encode())
    # Reap it when it exits, so a dead engine does not linger as a zombie that looks alive to
    # a pid check while this process (the TUI) runs on.
    _children[proc.pid] = proc
    threading.Thread(target=proc.wait, name=f"reap-engine-{proc.pid}", daemon=True).start()
    return proc.pid


def ensure_engine(workspace: Workspace | str | Path, timeout: float = START_TIMEOUT_S) -> int:
    """Return the pid of the engine serving the workspace, starting one if none is alive.

    A socket file nobody listens on (its engine was killed) is removed first; an engine that is
    still starting (its pid file names a live engine process) is waited for, not doubled.
    Raises EngineUnavailable, with the end of the engine log, when no engine comes up.
    """
    ws = _workspace(workspace)
    deadline = time.monotonic() + timeout
    started = None
    while time.monotonic() < deadline:
        if probe_socket(ws, timeout=0.5) == "live":
            return ws.read_pid() or started or 0
        if started is None and engine_process(ws) is None:
            remove_stale_socket(ws)
            started = start_engine(ws)
        elif started is not None and _exited(started):
            code = _children[started].returncode if started in _children else None
            # 3: another engine won the race for this workspace's lock; wait for its socket.
            if code != 3:
                raise EngineUnavailable(
                    f"the engine exited while starting (status {code}); "
                    f"the end of {ws.log_file}:\n{_log_tail(ws.log_file)}"
                )
        time.sleep(0.05)
    raise EngineUnavailable(
        f"no engine answered on {ws.socket_path} within {timeout:.0f}s; "
        f"the end of {ws.log_file}:\n{_log_tail(ws.log_file)}"
    )


def connect_or_start(workspace: Workspace | str | Path, timeout: float = START_TIMEOUT_S) -> EngineConnection:
    """A connection to the workspace's engine (reusing a live one, else starting one). Its first
    Snapshot is in `.snapshot`; call `.hello()` to become the controlling client."""
    ws = _workspace(workspace)
    ensure_engine(ws, timeout)
    return EngineConnection.open(ws, timeout=min(timeout, 10.0))


def _exited(pid: int) -> bool:
    proc = _children.get(pid)
    if proc is not None and proc.returncode is not None:
        return True
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _rotate_log(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_bytes()[-8192:].decode("utf-8", "replace")
    except OSError:
        return "(no engine log)"
    return "\n".join(text.splitlines()[-lines:])


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


def _with_id(request: P.Request) -> P.Request:
    return request if request.id else dataclasses.replace(request, id=new_request_id())


def _matches(event: P.Event, types: tuple[str, ...], request_id: str | None) -> bool:
    if request_id is not None and event.id != request_id:
        return False
    return not types or event.type in types


# ================================================================ clients


class _EventLog:
    """What both clients keep: every event read, and the latest Snapshot."""

    def __init__(self) -> None:
        self.received: list[P.Event] = []
        self.snapshot: P.Snapshot | None = None

    def _accept(self, line: bytes) -> P.Event:
        event = P.decode(line)
        assert isinstance(event, P.Event)
        self.received.append(event)
        if isinstance(event, P.Snapshot):
            self.snapshot = event
        return event


class EngineConnection(_EventLog):
    """A blocking client: send requests, read events. Every event read is kept in `received`."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self._sock = sock
        self._buffer = bytearray()

    @classmethod
    def open(cls, workspace: Workspace | str | Path, timeout: float = 5.0) -> EngineConnection:
        """Connect to a running engine and read its first Snapshot; EngineUnavailable if none."""
        path = _workspace(workspace).socket_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise EngineUnavailable(f"no engine is listening on {path} ({exc.strerror or exc})") from None
        conn = cls(sock)
        try:
            snapshot = conn.wait_for("Snapshot", timeout=timeout)
        except (TimeoutError, EngineGone) as exc:
            conn.close()
            raise EngineUnavailable(f"the engine on {path} did not answer: {exc}") from None
        assert isinstance(snapshot, P.Snapshot)
        conn.snapshot = snapshot
        return conn

    def send(self, request: P.Request) -> str:
        """Send a request (an id is made up if it has none); returns its id."""
        request = _with_id(request)
        self._sock.sendall(P.encode(request))
        return request.id

    def send_raw(self, line: bytes) -> None:
        self._sock.sendall(line)

    def recv(self, timeout: float | None = 30.0) -> P.Event:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no message from the engine within {timeout}s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(1 << 20)
            except TimeoutError:
                raise TimeoutError(f"no message from the engine within {timeout}s") from None
            except OSError as exc:
                raise EngineGone(f"lost the engine: {exc}") from None
            if not chunk:
                raise EngineGone("the engine closed the connection")
            self._buffer += chunk
        end = self._buffer.index(b"\n")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return self._accept(line)

    def wait_for(self, *types: str, id: str | None = None, timeout: float = 30.0) -> P.Event:
        """Read until an event of one of `types` (any type if none) with the given id arrives."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {'/'.join(types) or 'event'} (id {id!r}) within {timeout}s")
            event = self.recv(remaining)
            if _matches(event, types, id):
                return event

    def request(self, request: P.Request, *types: str, timeout: float = 30.0) -> P.Event:
        """Send and wait for the answer: an event of `types` echoing the id, or its EngineError."""
        request_id = self.send(request)
        return self.wait_for(*types, "EngineError", id=request_id, timeout=timeout)

    def hello(self, client: str = "cli", *, observe: bool = False, take_control: bool = False) -> P.Snapshot:
        answer = self.request(
            P.Hello(client=client, observe=observe, take_control=take_control, pid=os.getpid()), "Snapshot"
        )
        assert isinstance(answer, P.Snapshot)
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> EngineConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEngineConnection(_EventLog):
    """The same client for asyncio code."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        super().__init__()
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, workspace: Workspace | str | Path, timeout: float = 5.0) -> AsyncEngineConnection:
        path = _workspace(workspace).socket_path
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path), limit=READ_LIMIT), timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise EngineUnavailable(f"no engine is listening on {path} ({exc})") from None
        conn = cls(reader, writer)
        conn.snapshot = await conn.wait_for("Snapshot", timeout=timeout)  # type: ignore[assignment]
        return conn

    async def send(self, request: P.Request) -> str:
        request = _with_id(request)
        self._writer.write(P.encode(request))
        await self._writer.drain()
        return request.id

    async def recv(self, timeout: float | None = 30.0) -> P.Event:
        try:
            line = await asyncio.wait_for(self._reader.readline(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no message from the engine within {timeout}s") from None
        if not line:
            raise EngineGone("the engine closed the connection")
        return self._accept(line)

    async def wait_for(self, *types: str, id: str | None = None, timeout: float = 30.0) -> P.Event:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {'/'.join(types) or 'event'} (id {id!r}) within {timeout}s")
            event = await self.recv(remaining)
            if _matches(event, types, id):
                return event

    async def request(self, request: P.Request, *types: str, timeout: float = 30.0) -> P.Event:
        request_id = await self.send(request)
        return await self.wait_for(*types, "EngineError", id=request_id, timeout=timeout)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()


# ================================================================ tunebench stop


def stop_engine(
    workspace: Workspace | str | Path,
    timeout: float = STOP_GRACEFUL_S,
    say: Callable[[str], None] | None = None,
    term_wait: float = STOP_TERM_S,
) -> str:
    """Shut the workspace's engine down (a training run in it stops gracefully and saves a
    checkpoint first) and wait for the process to exit; returns what happened, in words. An
    engine still there after `timeout` is sent SIGTERM, and after `term_wait` more, SIGKILL.
    `say` hears, at once, what it is waiting for when a job has to finish first."""
    ws = _workspace(workspace)
    try:
        with EngineConnection.open(ws, timeout=3.0) as conn:
            snapshot = conn.hello("stop", take_control=True)
            conn.send(P.Shutdown())
    except EngineUnavailable:
        remove_stale_socket(ws)
        return f"no engine is running in {ws.root}"
    pid = snapshot.engine_pid
    job = f"; its {snapshot.job} job was stopped (training saves a checkpoint)" if snapshot.job else ""
    if snapshot.job and say is not None:
        # A training step on a CPU or a big model can take a minute: say why nothing happens yet.
        finishing = "finishes its current step and saves a checkpoint" if snapshot.job == "train" else "ends"
        say(f"stopping the engine (pid {pid}): its {snapshot.job} job {finishing} first ...")
    if _engine_gone(ws, timeout):
        return f"engine (pid {pid}) stopped{job}"
    if pid == os.getpid():  # an engine serving inside this very process (tests): not ours to kill
        return f"asked the engine (pid {pid}) to stop{job}; it is still finishing after {timeout:.0f}s"
    late = f"the engine (pid {pid}) did not stop within {timeout:.0f}s"
    if say is not None:
        say(f"{late}; ending it (SIGTERM: its job is aborted, no checkpoint is saved) ...")
    _signal_engine(ws, pid, signal.SIGTERM)
    if _engine_gone(ws, term_wait):
        return f"{late}, so it was ended with SIGTERM: its job was aborted"
    _signal_engine(ws, pid, signal.SIGKILL)
    _engine_gone(ws, 5.0)
    remove_stale_socket(ws)
    return (
        f"{late}, nor {term_wait:.0f}s after SIGTERM, so it was killed (SIGKILL); the steps since "
        f"the last checkpoint are lost, everything saved before is kept (the engine log: {ws.log_file})"
    )


def _engine_gone(ws: Workspace, timeout: float) -> bool:
    """Wait up to `timeout` for the workspace's engine to exit; True once it has."""
    deadline = time.monotonic() + timeout
    while engine_process(ws) is not None or probe_socket(ws) == "live":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _signal_engine(ws: Workspace, pid: int, signum: int) -> None:
    """Signal the engine, if `pid` is still the workspace's engine (not a recycled pid)."""
    if engine_process(ws) == pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


# ================================================================ tunebench status


def status_text(workspace: Workspace | str | Path) -> str:
    """What `tunebench status` prints: the live engine's state (job, step/total, loss, ETA,
    checkpoints), or, with no engine running, the last run's summary from disk. Never starts
    an engine."""
    ws = _workspace(workspace)
    try:
        with EngineConnection.open(ws, timeout=3.0) as conn:
            snapshot = conn.snapshot
    except EngineUnavailable:
        snapshot = None
    if snapshot is not None:
        return _live_status(ws, snapshot)
    lines = [f"engine      not running in {ws.root}"]
    run = ws.last_run()
    if run is None:
        lines.append("runs        none yet")
    else:
        lines += _run_lines(run, live=False)
    return "\n".join(lines)


def _live_status(ws: Workspace, snap: P.Snapshot) -> str:
    control = (
        f"controlled by {snap.controller_client}" if snap.controller_client else "no controlling session"
    )
    others = snap.clients - 1  # minus this status connection
    lines = [f"engine      running (pid {snap.engine_pid}), {others} other client(s), {control}"]
    if snap.job:
        since = _fmt_duration(time.time() - snap.job_started) if snap.job_started else "?"
        lines.append(f"job         {snap.job}, for {since}")
    else:
        lines.append("job         none (idle)")
    if snap.model:
        lines.append(f"model       {snap.model}")
    if snap.run_dir:
        run = RunInfo(run_id=snap.run_id, path=Path(snap.run_dir))
        run.apply_records(snap.history)
        run.checkpoints = list_checkpoints(snap.run_dir)
        if snap.run_status:
            run.status = snap.run_status
        lines += _run_lines(run, live=snap.job == "train")
    if snap.last_error:
        lines.append(f"error       [{snap.last_error.get('code')}] {snap.last_error.get('message')}")
        if snap.last_error.get("hint"):
            lines.append(f"{'':<12}{snap.last_error.get('hint')}")
    return "\n".join(lines)


def _run_lines(run: RunInfo, live: bool) -> list[str]:
    status = "running" if live else run.status
    lines = [f"run         {run.run_id} ({status})  {run.path}"]
    if run.total_steps:
        pct = 100 * run.steps / run.total_steps
        progress = f"step        {run.steps}/{run.total_steps} ({pct:.0f}%)"
    else:
        progress = f"step        {run.steps}"
    if run.last_loss is not None and not _is_nan(run.last_loss):
        progress += f", loss {run.last_loss:.4f}"
    if run.last_eval_loss is not None and not _is_nan(run.last_eval_loss):
        progress += f", eval loss {run.last_eval_loss:.4f}"
    if live and run.eta_s:
        progress += f", eta {_fmt_duration(run.eta_s)}"
    lines.append(progress)
    if run.tokens_per_s:
        lines[-1] += f", {run.tokens_per_s:,.0f} tok/s"
    points = [
        (step, loss) for step, loss in run.losses if isinstance(loss, (int, float)) and not _is_nan(loss)
    ]
    if len(points) >= 2:
        (first_step, first), (last_step, last) = points[0], points[-1]
        curve = sparkline([loss for _, loss in points])
        lines.append(f"loss        {curve}  {first:.4f} -> {last:.4f}, steps {first_step}-{last_step}")
    if run.checkpoints:
        names = ", ".join(p.name for p in run.checkpoints)
        lines.append(f"checkpoints {names}")
    if run.adapter_dir is not None:
        lines.append(f"adapter     {run.adapter_dir}")
    if not live and run.status in ("interrupted", "stopped", "failed") and run.checkpoints:
        command = run.command or "tunebench train ..."
        lines.append(f"resume      {command} --resume_from_checkpoint {run.path}")
    return lines


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """The whole curve in `width` characters: each one is the mean of its share of the values."""
    if not values:
        return ""
    buckets = min(width, len(values))
    means = []
    for i in range(buckets):
        chunk = values[i * len(values) // buckets : (i + 1) * len(values) // buckets]
        means.append(sum(chunk) / len(chunk))
    low, high = min(means), max(means)
    span = (high - low) or 1.0
    return "".join(SPARKS[round((m - low) / span * (len(SPARKS) - 1))] for m in means)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


__all__ = [
    "AsyncEngineConnection",
    "EngineConnection",
    "EngineGone",
    "EngineUnavailable",
    "connect_or_start",
    "engine_process",
    "ensure_engine",
    "new_request_id",
    "probe_socket",
    "remove_stale_socket",
    "start_engine",
    "status_text",
]
