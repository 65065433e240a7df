"""The engine process: a Unix-socket server that runs one GPU job at a time and streams its events.

One asyncio loop owns the socket, the clients and the engine state; each job (train, generate,
export, load: their bodies are in jobs.py) runs in a worker thread and hands its events back with
call_soon_threadsafe, so status, memory and estimate requests are answered while a job runs. A
job's exception becomes an EngineError with a hint and the engine stays up. Every event goes to
every client, and the first client to say Hello controls the workspace (clients.py); the current
run's events are kept for clients that attach later (run_history.py).

Start-up stays cheap (the TUI waits on it): torch, transformers and the job modules are imported
inside the job bodies, never here. The engine never imports textual or rich.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from ..core import protocol as P
from ..core.config import ConfigError, GenerationConfig, TrainConfig
from ..core.errors import UserError
from ..core.estimate import card_bytes_here, estimate_training_memory, read_model_info
from ..core.files import atomic_write_bytes
from ..core.memory_sampler import sample_memory
from ..core.workspace import ENGINE_IDLE_EXIT_S, Workspace
from .clients import CONTROL_REQUESTS, Client, ClientRegistry
from .jobs import (
    Job,
    JobFunction,
    Jobs,
    RunProgress,
    build_config,
    check_messages,
    describe_failure,
    free_memory,
    reset_peak_memory,
)
from .run_history import RunHistory

__all__ = ["EngineServer", "EngineAlreadyRunning", "serve"]

MEMORY_INTERVAL_S = 0.4  # the gauge promises at least two samples a second
MAX_LINE = 16 * 1024 * 1024  # a Generate with a long chat is large; a line past this is refused
SHUTDOWN_JOB_WAIT_S = 60.0  # how long close() waits for an aborted job before leaving it
LOCK_WAIT_S = 2.0  # how long a new engine waits for a dying one to let go of the workspace
JOB_WORDS = {
    "train": "a training run",
    "generate": "a generation",
    "export": "an export",
    "load": "a model load",
}


class EngineAlreadyRunning(RuntimeError):
    """Another engine holds this workspace's lock."""


class EngineServer:
    """The engine's state and its socket. `await serve()` runs it until Shutdown."""

    def __init__(
        self,
        workspace: Workspace | str | Path,
        *,
        memory_interval: float = MEMORY_INTERVAL_S,
        idle_exit: float = ENGINE_IDLE_EXIT_S,
    ):
        self.ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
        self.memory_interval = memory_interval
        self.idle_exit = idle_exit  # <= 0: never
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._lock_fd: int | None = None
        self._socket_inode: int | None = None
        self._tasks: list[asyncio.Task] = []
        self.clients = ClientRegistry(self.log)
        self._job: Job | None = None
        self._closing = False
        self._stop_requested = asyncio.Event()  # serve() returns when set
        self._closed = asyncio.Event()  # close() has finished
        self._shutdown_requests = 0
        self.run = RunHistory()  # the current (or last) run, for Snapshot
        self._last_error: dict[str, Any] = {}
        self._model = ""
        self.jobs = Jobs(self.ws)

    # ================================================================ lifecycle

    async def start(self) -> None:
        """Take the workspace lock, bind the socket (0600), start the memory sampler."""
        self._loop = asyncio.get_running_loop()
        self.ws.ensure_state_dir()
        self._lock_fd = _take_lock(self.ws.lock_file)
        # The pid file before the socket: whoever can connect can also read who is serving.
        atomic_write_bytes(self.ws.pid_file, str(os.getpid()).encode())
        path = self.ws.socket_path
        with contextlib.suppress(FileNotFoundError):
            # We hold the lock, so no live engine owns this file: it is left from a dead one.
            path.unlink()
        # The umask makes the socket 0600 from its first instant (chmod after bind would leave a
        # window); umask is process-wide, so restore it at once.
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._on_connect, path=str(path), limit=MAX_LINE)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        info = path.stat()
        if stat.S_IMODE(info.st_mode) != 0o600:
            raise RuntimeError(f"{path} has mode {oct(stat.S_IMODE(info.st_mode))}, not 0600")
        self._socket_inode = info.st_ino
        self.run.load_last_run(self.ws)
        self._tasks.append(asyncio.create_task(self._sample_memory_forever()))
        if self.idle_exit > 0:
            self._tasks.append(asyncio.create_task(self._exit_when_idle()))
        self.log(f"engine {os.getpid()} listening on {path}")

    async def serve(self) -> None:
        """Start, then run until Shutdown (or close()); always cleans up its files."""
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            await self.close()

    def request_shutdown(self, mode: str = "graceful") -> None:
        """Thread-safe: stop the job (graceful saves a checkpoint) and exit when it has stopped.
        A second request aborts the job."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._begin_shutdown, mode)

    def _begin_shutdown(self, mode: str = "graceful") -> None:
        self._shutdown_requests += 1
        if self._shutdown_requests > 1:
            mode = "abort"
        if self._shutdown_requests == 1:
            self._tasks.append(asyncio.create_task(self._shutdown(mode)))
        elif self._job is not None:
            self._job.request_stop(mode)

    async def _shutdown(self, mode: str) -> None:
        job = self._job
        if job is not None:
            self.log(f"shutting down: stopping {JOB_WORDS[job.kind]} ({mode})")
            self.clients.broadcast(
                P.Log(message=f"the engine is shutting down; stopping {JOB_WORDS[job.kind]}")
            )
            job.request_stop(mode)
            await job.done.wait()
        self._stop_requested.set()

    async def close(self) -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        job = self._job
        if job is not None:  # closed without a Shutdown: do not leave a GPU job running headless
            job.request_stop("abort")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(job.done.wait(), SHUTDOWN_JOB_WAIT_S)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await self.clients.close_all(timeout=2.0)
        self._remove_own_files()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
            self.log(f"engine {os.getpid()} stopped")
        self._stop_requested.set()
        self._closed.set()

    def _remove_own_files(self) -> None:
        if self._lock_fd is None:
            return  # never owned the workspace (another engine holds it): its files are not ours
        path = self.ws.socket_path
        with contextlib.suppress(OSError):
            if self._socket_inode is not None and path.stat().st_ino == self._socket_inode:
                path.unlink()
        if self.ws.read_pid() == os.getpid():
            self.ws.pid_file.unlink(missing_ok=True)

    def log(self, message: str) -> None:
        """One line in the engine log (stdout and stderr of a started engine go there too)."""
        stamp = datetime.now().isoformat(sep=" ", timespec="seconds")
        with contextlib.suppress(OSError), open(self.ws.log_file, "a") as fh:
            fh.write(f"{stamp} {message}\n")

    # ================================================================ clients

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_pid, peer_uid = _peer_credentials(writer)
        if peer_uid is not None and peer_uid not in (os.getuid(), 0):
            writer.close()  # the 0700 folder should already keep other users out
            return
        client = self.clients.add(writer, pid=peer_pid or 0)
        self.clients.send(client, self._snapshot(client))
        try:
            while not self._closing:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:  # the peer closed; a last unended line
                    line = exc.partial
                except asyncio.LimitOverrunError:
                    self.clients.send(client, _bad_request("", f"a line longer than {MAX_LINE} bytes"))
                    if not await _skip_rest_of_line(reader):
                        break
                    continue
                except ConnectionError:
                    break
                if not line:
                    break
                await self._handle_line(client, line)
        finally:
            self.clients.remove(client)

    # ================================================================ requests

    async def _handle_line(self, client: Client, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = P.decode(line)
        except P.ProtocolError as exc:
            self.clients.send(client, _bad_request(_raw_id(line), str(exc)))
            return
        if not isinstance(message, P.Request):
            self.clients.send(
                client, _bad_request(message.id, f"{message.type} is an event; send requests only")
            )
            return
        if message.type in CONTROL_REQUESTS and not self.clients.may_control(client):
            self.clients.send(client, self.clients.read_only_error(message.id))
            return
        handler = getattr(self, f"_on_{message.type}", None)
        if handler is None:
            self.clients.send(
                client, _bad_request(message.id, f"{message.type} is not handled by this engine")
            )
            return
        try:
            result = handler(client, message)
            if asyncio.iscoroutine(result):
                await result
        except Exception as exc:  # noqa: BLE001 - a bad request must never take the engine down
            self.clients.send(client, dataclasses.replace(self._describe(exc, message.type), id=message.id))

    # ---------------------------------------------------------------- requests that answer at once

    def _on_Hello(self, client: Client, msg: P.Hello) -> None:
        self.clients.hello(client, msg)
        self.clients.send(client, self._snapshot(client, msg.id))

    def _on_GetStatus(self, client: Client, msg: P.GetStatus) -> None:
        self.clients.send(client, self._snapshot(client, msg.id, history=msg.history))

    async def _on_EstimateMemory(self, client: Client, msg: P.EstimateMemory) -> None:
        try:
            cfg = build_config(TrainConfig, self.jobs.resolve_train_paths(msg.config))
        except ConfigError as exc:
            self.clients.send(client, _config_error(msg.id, exc))
            return
        info = await asyncio.to_thread(read_model_info, cfg.model, self.ws.root)
        if info is None:
            self.clients.send(
                client,
                P.EngineError(
                    id=msg.id,
                    code="model",
                    message=f"cannot estimate memory: no config.json found for model {cfg.model!r}",
                    hint="give a local model folder, 'demo', or a hub id that is in the local cache",
                ),
            )
            return
        from ..train.preflight import longest_sample_tokens

        # the data's longest sample sets the peak on the CPU, and the forward sizes a GPU plan takes
        card = card_bytes_here()
        longest = await asyncio.to_thread(longest_sample_tokens, cfg)
        estimate = estimate_training_memory(cfg, info, card, longest=longest)
        self.clients.send(client, dataclasses.replace(estimate, id=msg.id))

    def _on_StopTraining(self, client: Client, msg: P.StopTraining) -> None:
        if msg.mode not in ("graceful", "abort"):
            self.clients.send(
                client, _bad_request(msg.id, f"StopTraining.mode must be graceful or abort, not {msg.mode!r}")
            )
            return
        job = self._job
        if job is None or job.kind != "train":
            self.clients.send(
                client, P.EngineError(id=msg.id, code="idle", message="no training run is in progress")
            )
            return
        job.request_stop(msg.mode)
        text = (
            "stopping after this step and saving a checkpoint"
            if msg.mode == "graceful"
            else "aborting now (no checkpoint is saved)"
        )
        self.clients.broadcast(P.Log(id=msg.id, message=text))

    def _on_CancelGenerate(self, client: Client, msg: P.CancelGenerate) -> None:
        job = self._job
        if job is None or job.kind != "generate":
            self.clients.send(
                client, P.EngineError(id=msg.id, code="idle", message="no generation is in progress")
            )
            return
        job.cancel.set()
        self.clients.send(client, P.Log(id=msg.id, message="cancelling the generation"))

    def _on_Shutdown(self, client: Client, msg: P.Shutdown) -> None:
        self.clients.broadcast(P.Log(id=msg.id, message=f"engine shutting down (asked by {client.label})"))
        self._begin_shutdown("graceful")

    # ---------------------------------------------------------------- jobs

    def _on_StartTraining(self, client: Client, msg: P.StartTraining) -> None:
        try:
            cfg = build_config(TrainConfig, self.jobs.resolve_train_paths(msg.config))
            self.jobs.processes(cfg)  # GPUs named that are not here: said before any job starts
        except ConfigError as exc:
            self.clients.send(client, _config_error(msg.id, exc))
            return
        if not cfg.dataset and not cfg.resume_from_checkpoint:  # a resume takes the run's own
            self.clients.send(
                client,
                P.EngineError(
                    id=msg.id,
                    code="config",
                    message="no training data: the dataset list is empty",
                    hint="add a dataset file, e.g. datasets/self_cognition.jsonl#50",
                ),
            )
            return
        self._start_job(client, msg, "train", self.jobs.train, config=cfg)

    def _on_Generate(self, client: Client, msg: P.Generate) -> None:
        try:
            gen_cfg = build_config(GenerationConfig, msg.config)
        except ConfigError as exc:
            self.clients.send(client, _config_error(msg.id, exc))
            return
        if msg.conversations:
            missing = [t for t in msg.targets if t not in msg.conversations]
            problem = f"conversations has no chat for {', '.join(missing)}" if missing else ""
            for target, chat in msg.conversations.items():
                problem = problem or check_messages(chat, f"conversations[{target!r}]")
        else:
            problem = check_messages(msg.messages)
        if not msg.targets:
            problem = "targets is empty: name base or an adapter"
        if problem:
            self.clients.send(client, _bad_request(msg.id, problem))
            return
        self._start_job(client, msg, "generate", self.jobs.generate, config=gen_cfg)

    def _on_Export(self, client: Client, msg: P.Export) -> None:
        if not msg.adapter:
            self.clients.send(
                client, _bad_request(msg.id, "Export.adapter is empty: name an adapter or run folder")
            )
            return
        self._start_job(client, msg, "export", self.jobs.export)

    def _on_LoadModel(self, client: Client, msg: P.LoadModel) -> None:
        self._start_job(client, msg, "load", self.jobs.load)

    def _start_job(
        self, client: Client, request: P.Request, kind: str, fn: JobFunction, config: Any = None
    ) -> None:
        running = self._job
        if running is not None:
            self.clients.send(client, self._busy_error(request.id, running))
            return
        if self._closing or self._shutdown_requests:
            self.clients.send(
                client, P.EngineError(id=request.id, code="busy", message="the engine is shutting down")
            )
            return
        job = Job(kind, request.id, owner=client.label, config=config)
        self._job = job
        if kind == "train":
            self.run.begin()
            self._last_error = {}
        self.log(f"{kind} job started by {client.label}")
        self.clients.broadcast(P.JobStatus(id=request.id, job=kind, state="started"))
        threading.Thread(
            target=self._job_thread, args=(job, fn, request), name=f"tunebench-{kind}", daemon=True
        ).start()

    def _busy_error(self, request_id: str, running: Job) -> P.EngineError:
        what = JOB_WORDS[running.kind]
        if running.kind == "train":
            detail = f" (run {self.run.run_id or 'starting'}, step {running.last_step})"
            hint = "wait for it to finish, or stop it first (a graceful stop saves a checkpoint)"
        elif running.kind == "generate":
            detail, hint = "", "wait for the answer to finish, or cancel it"
        else:
            detail, hint = "", "wait for it to finish"
        return P.EngineError(
            id=request_id,
            code="busy",
            message=f"the engine is busy with {what}{detail}; it runs one GPU job at a time",
            hint=hint,
        )

    def _job_thread(self, job: Job, fn: JobFunction, request: P.Request) -> None:
        progress = RunProgress()

        def emit(event: P.Event) -> None:
            progress.note(event)  # here, in the worker: exact when the job fails right after
            self._from_thread(self._on_job_event, job, event)

        error, final = None, None
        try:
            reset_peak_memory()
            final = fn(job, request, emit)
        except BaseException as exc:  # noqa: BLE001 - even a SystemExit deep in a library must
            # end as a reported failure, or the engine would stay "busy" forever
            error = self._describe(exc, job.kind, job.config, progress)
        finally:
            try:
                if error is not None or job.kind != "generate":
                    # A failed job's traceback (gone with `exc` now) held its frames and their
                    # tensors, and a finished run's model sits in reference cycles: collect them
                    # so the next job finds the GPU free. A chat keeps its model, so a generation
                    # skips this (it costs ~0.1 s).
                    free_memory()
            finally:
                self._from_thread(self._on_job_done, job, error, final)

    def _describe(
        self, exc: BaseException, job: str, config: Any = None, progress: RunProgress | None = None
    ) -> P.EngineError:
        try:
            error, trace = describe_failure(exc, job, config, self.ws.log_file, progress=progress)
        except Exception as failure:  # noqa: BLE001 - describing a failure must not fail the engine
            error = P.EngineError(
                code="internal",
                message=f"{job} failed: {type(exc).__name__}",
                hint=f"the engine is still running; details are in {self.ws.log_file}",
            )
            trace = f"(describing {type(exc).__name__} failed too: {failure!r})"
        if trace:
            self.log(f"{job} failed: [{error.code}] {error.message}\n{trace}")
        return error

    def _from_thread(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the engine is exiting
            loop.call_soon_threadsafe(fn, *args)

    def _on_job_event(self, job: Job, event: P.Event) -> None:
        if not event.id:
            event = dataclasses.replace(event, id=job.request_id)
        resync = False
        if job.kind == "train":
            if isinstance(event, P.TrainStarted):
                with contextlib.suppress(OSError):
                    self.ws.record_last_run(event.run_dir)
            elif isinstance(event, P.TrainStep):
                job.last_step = event.step
            resync = self.run.record(event)
        if isinstance(event, P.ModelLoaded):
            self._model = event.model
        self.clients.broadcast(event)
        if resync:
            # A resumed run: clients get the steps before the checkpoint from disk, in a Snapshot.
            for client in self.clients:
                self.clients.send(client, self._snapshot(client))

    def _on_job_done(self, job: Job, error: P.EngineError | None, final: P.Event | None = None) -> None:
        self._job = None  # first: whoever reacts to the final event finds the engine idle
        if final is not None:
            self._on_job_event(job, final)
        if error is not None:
            error = dataclasses.replace(error, id=job.request_id)
            self._last_error = error.to_dict()
            self.log(f"{job.kind} job failed: [{error.code}] {error.message}")
            if job.kind == "train":
                self.run.record(error)
            self.clients.broadcast(error)
            if job.kind == "train" and self.run.unfinished:
                finished = self.run.close_failed(
                    job.request_id, job.last_step, round(time.time() - job.started, 1)
                )
                if finished is not None:
                    self.clients.broadcast(finished)
        else:
            self.log(f"{job.kind} job done")
        self.clients.broadcast(
            P.JobStatus(
                id=job.request_id,
                job=job.kind,
                state="failed" if error else "done",
                message=error.message if error else "",
            )
        )
        job.done.set()

    # ================================================================ state

    def _snapshot(self, client: Client, request_id: str = "", history: bool = True) -> P.Snapshot:
        job = self._job
        controller = self.clients.controller
        return P.Snapshot(
            id=request_id,
            engine_pid=os.getpid(),
            job=job.kind if job else "",
            model=self._model,
            run_id=self.run.run_id,
            run_dir=self.run.run_dir,
            history=list(self.run.records) if history else [],
            workspace=str(self.ws.root),
            job_id=job.request_id if job else "",
            job_started=job.started if job else 0.0,
            run_status=self.run.status,
            controller=controller is client,
            controller_client=controller.label if controller else "",
            clients=len(self.clients),
            last_error=dict(self._last_error),
        )

    async def _exit_when_idle(self) -> None:
        idle_since = time.monotonic()
        while True:
            await asyncio.sleep(min(5.0, self.idle_exit / 4))
            if self.clients or self._job is not None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.idle_exit:
                self.log(f"no client and no job for {self.idle_exit:.0f}s: exiting to free memory")
                self._begin_shutdown("graceful")
                return

    async def _sample_memory_forever(self) -> None:
        failed = False
        while True:
            if self.clients:
                try:
                    sample = await asyncio.to_thread(sample_memory)
                except Exception as exc:  # noqa: BLE001 - the gauge is not worth the engine
                    if not failed:
                        self.log(f"memory sampling failed: {exc!r}")
                    failed = True
                else:
                    self.clients.broadcast(sample)
            await asyncio.sleep(self.memory_interval)


# ==================================================================== helpers


def _bad_request(request_id: str, reason: str) -> P.EngineError:
    return P.EngineError(
        id=request_id,
        code="bad_request",
        message=f"the engine could not use a message: {reason}",
        hint="this is a client bug or a version mismatch; the engine ignored the message and goes on",
    )


def _config_error(request_id: str, exc: ConfigError) -> P.EngineError:
    return P.EngineError(id=request_id, code="config", message=str(exc), hint="fix the settings named above")


async def _skip_rest_of_line(reader: asyncio.StreamReader) -> bool:
    """Discard an oversize line up to and including its newline, so its tail is not read as a
    message of its own; False if the peer closed first."""
    while True:
        try:
            await reader.readuntil(b"\n")
            return True
        except asyncio.LimitOverrunError as exc:  # no newline within the limit yet: drop what came
            await reader.readexactly(exc.consumed)
        except (asyncio.IncompleteReadError, ConnectionError):
            return False


def _raw_id(line: bytes) -> str:
    """The id of a message that failed to decode, if it has a readable one, so the error can echo it."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return ""
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else ""


def _peer_credentials(writer: asyncio.StreamWriter) -> tuple[int | None, int | None]:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None, None
    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return None, None
    return pid, uid


def _take_lock(path: Path, wait_s: float = LOCK_WAIT_S) -> int:
    """An exclusive flock held for the engine's life: the kernel drops it when the process dies,
    however it dies, so it is the one test of "is an engine serving this workspace" that a kill -9
    cannot fool. It waits a moment first: a killed engine's last threads can still be exiting
    (holding the lock) just after its death was noticed and a new engine was started."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise EngineAlreadyRunning(
                    f"another engine is already serving {path.parent.parent}"
                ) from None
            time.sleep(0.05)


# ==================================================================== entry point


def serve(workspace: str | Path, *, chdir: bool = True) -> int:
    """Run the engine in this process until Shutdown or SIGTERM (what `tunebench engine` does).
    Returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ws = Workspace(workspace)
    if ws.root.exists() and not ws.root.is_dir():
        print(f"error: {ws.root} is a file, not a workspace folder", file=sys.stderr)
        return 2
    ws.root.mkdir(parents=True, exist_ok=True)
    if chdir:
        os.chdir(ws.root)  # anything relative a library writes lands in the workspace
    server = EngineServer(ws)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_shutdown)
        # Started detached there is no terminal to hang up, but `tunebench engine` in a terminal
        # that closes must not take a training run with it either.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        await server.serve()

    try:
        asyncio.run(main())
    except EngineAlreadyRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
