"""A small engine stand-in for the TUI tests: an asyncio Unix-socket server speaking protocol.py.

It answers the way engine/process/server.py does (a Snapshot on connect and for Hello, events echoing
the request id, JobStatus around jobs, MemorySample ticks) with made-up numbers and no model,
so the pilot tests run in well under a second each.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

from tunebench.engine.core import protocol as P
from tunebench.engine.core.workspace import Workspace
from tunebench.engine.process.clients import CONTROL_REQUESTS


class FakeEngine:
    def __init__(
        self,
        workspace: Path,
        *,
        steps: int = 6,
        step_delay: float = 0.02,
        answers: dict[str, str] | None = None,
        history: list[P.Event] | None = None,
        memory_interval: float = 0.2,
        gpus: list[dict] | None = None,
        pid: int = 0,
        controlled_by: str = "",
        sharding: str = "",
        token_delay: float = 0.005,
    ) -> None:
        self.ws = Workspace(workspace)
        self.sharding = sharding  # what the estimate says a run on several GPUs takes by itself
        self.steps = steps
        self.step_delay = step_delay
        self.token_delay = token_delay  # seconds between streamed words
        self.answers = answers or {}
        self.verdict = ""  # a ProbeVerdict message sent before a completed run's TrainFinished
        self.history = [e.to_dict() for e in (history or [])]
        self.memory_interval = memory_interval
        self.gpus = gpus if gpus is not None else []
        self.requests: list[P.Request] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._cancel = asyncio.Event()
        self.job = ""
        # Snapshot tests pin the pid shown in the status bar; 1 is always alive for the TUI's check.
        self.pid = pid or os.getpid()
        # Another session in control (its label): this one is read-only, as engine/process/clients.py
        # makes every session after the first; its control requests are refused.
        self.controlled_by = controlled_by

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> FakeEngine:
        self.ws.ensure()
        self._server = await asyncio.start_unix_server(self._client, path=str(self.ws.socket_path))
        self._tasks.append(asyncio.create_task(self._memory_loop()))
        return self

    async def close(self) -> None:
        """Stop listening and drop every client, as a killed engine would."""
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        with contextlib.suppress(FileNotFoundError):
            self.ws.socket_path.unlink()

    def of_type(self, name: str) -> list[P.Request]:
        return [r for r in self.requests if r.type == name]

    # ---------------------------------------------------------------- wire

    def _snapshot(self, request_id: str = "") -> P.Snapshot:
        return P.Snapshot(
            id=request_id,
            engine_pid=self.pid,
            job=self.job,
            history=list(self.history),
            controller=not self.controlled_by,
            controller_client=self.controlled_by or "tui (test)",
            clients=len(self._writers),
        )

    def _send(self, event: P.Event) -> None:
        line = P.encode(event)
        for writer in list(self._writers):
            if not writer.is_closing():
                writer.write(line)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        writer.write(P.encode(self._snapshot()))
        writer.write(P.encode(self._memory_sample()))
        try:
            while line := await reader.readline():
                request = P.decode(line)
                self.requests.append(request)
                handler = getattr(self, f"_on_{request.type}", None)
                if self.controlled_by and request.type in CONTROL_REQUESTS:
                    message = f"{self.controlled_by} controls this workspace; this session is read-only"
                    self._send(P.EngineError(id=request.id, code="read_only", message=message))
                elif handler is not None:
                    self._tasks.append(asyncio.create_task(handler(request)))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if writer in self._writers:
                self._writers.remove(writer)

    def _memory_sample(self) -> P.MemorySample:
        return P.MemorySample(
            gpus=self.gpus,
            allocated=512 * 2**20,
            reserved=768 * 2**20,
            peak=900 * 2**20,
            rss=700 * 2**20,
            ram_total=16 * 2**30,
            ram_available=10 * 2**30,
            gpu_note="" if self.gpus else "no NVIDIA GPU found",
        )

    async def _memory_loop(self) -> None:
        while True:
            self._send(self._memory_sample())
            await asyncio.sleep(self.memory_interval)

    # ---------------------------------------------------------------- requests

    async def _on_Hello(self, request: P.Hello) -> None:
        self._send(self._snapshot(request.id))

    async def _on_EstimateMemory(self, request: P.EstimateMemory) -> None:
        # Without a GPU the real engine answers in RAM, next to what is free (1.0 GiB here: too little).
        host = {} if self.gpus else {"memory": "host", "available_gib": 1.0, "advice": ["max_length 512"]}
        self._send(
            P.MemoryEstimate(
                id=request.id,
                total_gib=1.5,
                parts={"weights": 0.3, "lora": 0.01, "activations": 1.0},
                model=request.config.get("model", ""),
                notes=["fake estimate"],
                sharding=self.sharding,
                **host,
            )
        )

    def _save_checkpoint(self, rid: str, step: int, run_dir: str) -> None:
        """A checkpoint's folder, as the engine leaves it (the Train pane lists those on disk)."""
        path = Path(run_dir) / "checkpoints" / f"step-{step}"
        path.mkdir(parents=True, exist_ok=True)
        self._send(P.CheckpointSaved(id=rid, step=step, path=str(path)))

    async def _on_StartTraining(self, request: P.StartTraining) -> None:
        if self.job:
            self._send(P.EngineError(id=request.id, code="busy", message="the engine is busy", hint="wait"))
            return
        self.job = "train"
        rid = request.id
        self._send(P.JobStatus(id=rid, job="train", state="started"))
        run_dir = str(self.ws.runs_dir / "fake-run")
        self._send(P.DataReport(id=rid, samples=10, tokens=500))
        self._send(P.TrainStarted(id=rid, run_id="fake-run", run_dir=run_dir, total_steps=self.steps))
        status = "completed"
        for step in range(1, self.steps + 1):
            await asyncio.sleep(self.step_delay)
            if self._stop.is_set():
                status = "stopped"
                self._save_checkpoint(rid, step - 1, run_dir)
                break
            self._send(
                P.TrainStep(
                    id=rid,
                    step=step,
                    total_steps=self.steps,
                    epoch=step / self.steps,
                    loss=2.0 / step,
                    lr=1e-4,
                    tokens_per_s=1234.0,
                    eta_s=float(self.steps - step),
                )
            )
            if step == self.steps // 2:
                self._send(P.EvalResult(id=rid, step=step, eval_loss=1.5 / step))
                self._save_checkpoint(rid, step, run_dir)
        if self.verdict and status == "completed":
            self._send(P.ProbeVerdict(id=rid, run_id="fake-run", changed=0, total=3, message=self.verdict))
        self._send(
            P.TrainFinished(
                id=rid, run_id="fake-run", status=status, adapter_dir=f"{run_dir}/adapter", steps=step
            )
        )
        self.job = ""
        self._stop.clear()
        self._send(P.JobStatus(id=rid, job="train", state="done"))

    async def _on_StopTraining(self, request: P.StopTraining) -> None:
        self._stop.set()
        self._send(P.Log(id=request.id, message="stopping after this step"))

    async def _on_Generate(self, request: P.Generate) -> None:
        if self.job:  # one job at a time, as the real engine
            message = f"the engine is busy with a {self.job} run"
            self._send(P.EngineError(id=request.id, code="busy", message=message, hint="wait for it"))
            return
        self.job = "generate"
        self._send(P.JobStatus(id=request.id, job="generate", state="started"))
        prompt = request.messages[-1]["content"]
        stats = {}
        cancelled = False
        for target in request.targets:
            answer = self.answers.get(target, f"{target} answers {prompt}")
            finish = "stop"  # as the engine says per column: stop, length or cancelled
            for word in answer.split(" "):
                if self._cancel.is_set():
                    cancelled, finish = True, "cancelled"
                    break
                self._send(P.TokenChunk(id=request.id, target=target, text=word + " "))
                await asyncio.sleep(self.token_delay)
            stats[target] = {"ttft_s": 0.01, "tokens_per_s": 100.0, "finish_reason": finish}
        self._cancel.clear()
        self.job = ""
        self._send(P.GenerateDone(id=request.id, stats=stats, cancelled=cancelled))
        self._send(P.JobStatus(id=request.id, job="generate", state="done"))

    async def _on_CancelGenerate(self, request: P.CancelGenerate) -> None:
        if self.job == "generate":
            self._cancel.set()


class FakeEngineThread:
    """A FakeEngine on its own event loop in a thread, so it serves an app whatever loop the app
    runs in (snap_compare runs the app with app.run, in a loop of its own)."""

    def __init__(self, workspace: Path, **options) -> None:
        self.loop = asyncio.new_event_loop()
        self.engine = FakeEngine(workspace, **options)
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-engine", daemon=True)

    def __enter__(self) -> FakeEngine:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.engine.start(), self.loop).result(5)
        return self.engine

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def kill(self) -> None:
        """Close every connection and the socket at once, as `kill -9` of the engine would."""
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.engine.close(), self.loop).result(5)
