"""The engine's jobs: what runs in a worker thread for train, generate, export and load, and how
a failure reads to a person.

Each job body emits its events as it goes and returns its final event; the server (server.py)
schedules them one at a time and owns everything asyncio. Heavy modules (torch, transformers,
engine/train/recipe.py, engine/infer/generate.py) are imported inside the bodies, never at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import protocol as P
from ..core.config import ConfigError
from ..core.data import resolve_dataset_spec
from ..core.errors import Cancelled, UserError
from ..core.files import access_failure
from ..core.memory_model import Profile
from ..core.model_files import workspace_model
from ..core.plans import allocator_cap
from ..core.targets import export_name
from ..core.workspace import Workspace, list_checkpoints

Emit = Callable[[P.Event], None]


@dataclass(eq=False)
class Job:
    kind: str  # "train", "generate", "export", "load"
    request_id: str
    owner: str  # the label of the client that started it
    started: float = field(default_factory=time.time)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    config: Any = None  # the TrainConfig or GenerationConfig it runs with
    last_step: int = 0
    _stop_mode: str = ""
    _stop_signal: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def request_stop(self, mode: str) -> None:
        """Stop a training job; safe before the worker has created its StopSignal."""
        with self._lock:
            if self._stop_mode != "abort":
                self._stop_mode = mode
            if self._stop_signal is not None:
                self._stop_signal.request(mode)
        self.cancel.set()

    def attach_stop(self, stop_signal: Any) -> None:
        with self._lock:
            self._stop_signal = stop_signal
            if self._stop_mode:
                stop_signal.request(self._stop_mode)


# A job body runs in a worker thread, emits its events as it goes, and returns its final event
# (TrainFinished, GenerateDone, ...). The server sends that one only once the job is marked
# done, so a client that reacts to GenerateDone with the next Generate never finds it "busy".
JobFunction = Callable[[Job, P.Request, Emit], "P.Event | None"]


class Jobs:
    """The job bodies, with what they share between jobs: the workspace paths resolve against,
    and the generation session (one loaded base model, reused across chats). Only the worker
    thread of the one running job touches the session."""

    def __init__(self, workspace: Workspace):
        self.ws = workspace
        self._session: Any = None

    def train(self, job: Job, request: P.Request, emit: Emit) -> P.Event:
        from ..train.preflight import preflight
        from ..train.recipe import StopSignal, run_training, stopped_before_training
        from ..train.resume import resume_config

        requested = job.config
        if job.config.resume_from_checkpoint:  # the run's recorded settings, with the request's applied
            # the form's output_dir and run_name are for new runs: the run goes on in its folder
            job.config = resume_config(self.resolve_train_paths(request.config), typed=False)
            place = {"output_dir": job.config.output_dir, "run_name": job.config.run_name}
            requested = dataclasses.replace(requested, **place)  # what the ranks' command line says
        nproc, chosen = self.processes(requested)
        if nproc > 1 or chosen not in ([], [0]):
            # Several ranks (or a GPU this process does not train on): torchrun's, in a child.
            from .ranks_job import run_ranks

            self.drop_session()  # the ranks need the GPU memory a chat model holds
            return run_ranks(job, requested, nproc, chosen, self.ws.root, emit)
        started = time.perf_counter()
        try:
            # A bad dataset or flag fails in seconds, before any weights load.
            preflight(job.config, cancel=job.cancel)
        except Cancelled:
            emit(P.Log(message="stopped while reading the data: nothing was trained or written"))
            return stopped_before_training(started)
        self.drop_session()  # training needs the GPU memory a chat model holds

        stop = StopSignal()
        job.attach_stop(stop)

        def emit_until_finished(event: P.Event) -> None:
            if not isinstance(event, P.TrainFinished):  # returned below, and sent as the final event
                emit(event)

        finished = run_training(job.config, emit_until_finished, stop)
        if finished.status == "completed" and finished.adapter_dir and not job.cancel.is_set():
            self._probe_verdict(finished, job, emit)
        return finished

    @staticmethod
    def processes(cfg: Any) -> tuple[int, list[int]]:
        """How many training processes a run asks for, and on which GPUs (CUDA's numbers in this
        process; [] = the default: the first GPU, or nproc_per_node of them, or the CPU)."""
        from ..core.launch import gpus_chosen_here

        chosen = gpus_chosen_here(cfg.gpus)
        return (len(chosen) if chosen else cfg.nproc_per_node), chosen

    def _probe_verdict(self, finished: P.TrainFinished, job: Job, emit: Emit) -> None:
        """Whether the run changed the answers, for the Train pane; sent before TrainFinished, so
        the job (and the GPU) is still ours while the probes run. The adapter is saved already, so
        a failure here is a note, never a failed run."""
        from ..infer.probe_check import verdict_event

        free_memory()  # the trained model is gone; the probe loads the base afresh
        emit(P.Progress(stage="probe", message="asking the base and the adapter 3 probes"))
        try:
            emit(verdict_event(finished, job.config.model))
        except UserError as exc:
            emit(P.Log(level="warning", message=f"no verdict: {exc.message} ({exc.hint})"))
        except Exception as exc:  # noqa: BLE001 - the run itself succeeded
            emit(P.Log(level="warning", message=f"no verdict: the probe check failed: {_safe_str(exc)}"))

    def generate(self, job: Job, request: P.Generate, emit: Emit) -> P.Event:
        from ..core.targets import adapters_base, resolve_target

        resolved = {t: t if t == "base" else self.ws.resolve(t) for t in request.targets}
        targets = list(resolved.values())
        chat: Any = request.messages
        if request.conversations:
            chat = {resolved[t]: request.conversations[t] for t in request.targets}
        model = self.resolve_model(request.model)
        if not model:
            # Adapters name their base (refused here if they name two); base alone keeps the loaded one.
            model = adapters_base([resolve_target(t) for t in targets if t != "base"]) or (
                self._session.model_spec if self._session else "demo"
            )
        try:
            session, loaded = self.session_for(model, "auto", emit, cancel=job.cancel)
        except Cancelled:  # stopped while the model loaded: nothing was generated
            return P.GenerateDone(stats={}, cancelled=True)
        if loaded is not None:
            emit(loaded)
        # Chunks and stats go out under the names the client used, not the resolved paths.
        names = {path: name for name, path in resolved.items()}
        stats = session.generate(
            chat,
            targets,
            job.config,
            system=request.system,
            on_chunk=lambda target, text: emit(P.TokenChunk(target=names.get(target, target), text=text)),
            cancel=job.cancel,
        )
        stats = {names.get(target, target): value for target, value in stats.items()}
        return P.GenerateDone(stats=stats, cancelled=job.cancel.is_set())

    def export(self, job: Job, request: P.Export, emit: Emit) -> P.Event:
        from ..infer.export import export_model

        adapter = self.ws.resolve(request.adapter)
        if request.output_dir:
            output = self.ws.resolve(request.output_dir)
        else:
            output = str(self.ws.exports_dir / export_name(Path(adapter)))
        self.drop_session()  # the export loads its own copy of the base model
        started = time.perf_counter()
        path = export_model(
            adapter,
            output,
            merge=request.merge,
            on_progress=lambda text: emit(P.Progress(stage="export", message=text)),
        )
        return P.ExportDone(output_dir=str(path), seconds=round(time.perf_counter() - started, 2))

    def load(self, job: Job, request: P.LoadModel, emit: Emit) -> P.Event | None:
        model = self.resolve_model(request.model) or "demo"
        _, loaded = self.session_for(model, request.torch_dtype, emit, force=True)
        return loaded

    def session_for(
        self, model: str, torch_dtype: str, emit: Emit, force: bool = False, cancel: Any = None
    ) -> tuple[Any, P.ModelLoaded | None]:
        """The generation session for `model`, loading it (and dropping another) if needed; the
        ModelLoaded event when it had to load. Cancelled once `cancel` is set during the load."""
        if not force and self._session is not None and self._session.model_spec == model:
            return self._session, None
        self.drop_session()
        from ..infer.generate import GenerationSession

        emit(P.Progress(stage="load", message=f"loading model {model}"))
        started = time.perf_counter()
        session = GenerationSession(model, torch_dtype=torch_dtype, cancel=cancel)
        self._session = session
        return session, model_loaded_event(session, model, time.perf_counter() - started)

    def drop_session(self) -> None:
        if self._session is not None:
            self._session = None
            free_memory()

    def resolve_train_paths(self, config: dict[str, Any]) -> dict[str, Any]:
        """Paths in a form are relative to the workspace, whatever the engine's cwd."""
        resolved = dict(config)
        resolved["output_dir"] = self.ws.resolve(str(config.get("output_dir") or "runs"))
        for key in ("dataset", "val_dataset"):
            value = config.get(key)
            if isinstance(value, list):
                root = self.ws.root
                resolved[key] = [resolve_dataset_spec(v, root) if isinstance(v, str) else v for v in value]
        for key in ("model", "resume_from_checkpoint"):
            value = config.get(key)
            if isinstance(value, str) and value:
                resolved[key] = self.resolve_model(value) if key == "model" else self.ws.resolve(value)
        return resolved

    def resolve_model(self, model: str) -> str:
        """A model typed relative to the workspace, if such a path exists; ids and 'demo' stay."""
        return workspace_model(model, self.ws.root)


# ==================================================================== failures


def describe_failure(
    exc: BaseException,
    job: str,
    config: Any = None,
    log_file: str | Path = "",
    *,
    progress: RunProgress | None = None,
) -> tuple[P.EngineError, str]:
    """An exception as an EngineError a person can act on, plus the text for the engine log:
    the traceback of an unexpected error, the allocator's report of an out-of-memory, and ""
    for errors a person caused (bad data, bad settings), which need neither. `progress` says
    how far a training run got, so an out-of-memory can say which kind it was."""
    if isinstance(exc, UserError):
        return P.EngineError(code=exc.code, message=_with_problems(exc), hint=exc.hint), ""
    if isinstance(exc, ConfigError):
        return P.EngineError(code="config", message=str(exc), hint="fix the settings named above"), ""
    failure = access_failure(exc) if isinstance(exc, OSError) else None
    if failure is not None:  # a full disk, a file size limit, a folder that cannot be written or entered
        return P.EngineError(code=failure.code, message=failure.message, hint=failure.hint), ""
    memory = _out_of_memory(exc)
    if memory:
        return _oom_error(exc, job, config, progress or RunProgress(), memory), _safe_str(exc)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    detail = _safe_str(exc).strip()
    first = detail.splitlines()[0] if detail else ""
    where = f" (the full traceback is in {log_file})" if log_file else ""
    error = P.EngineError(
        code="internal",
        message=f"{job} failed: {type(exc).__name__}{': ' + first if first else ''}",
        hint=f"the engine is still running and nothing you made was lost{where}; "
        "if it happens again, please report it with that traceback",
    )
    return error, text


SHOWN_PROBLEMS = 10


def _with_problems(exc: UserError) -> str:
    """The message, plus the records it is about (a DataError's "file.jsonl:12: reason" lines),
    as the CLI prints them: without them a person would not know where to look."""
    problems = list(getattr(exc, "problems", None) or [])
    lines = [exc.message, *(f"  {p}" for p in problems[:SHOWN_PROBLEMS])]
    if len(problems) > SHOWN_PROBLEMS:
        lines.append(f"  ... and {len(problems) - SHOWN_PROBLEMS} more")
    return "\n".join(lines)


@dataclass
class RunProgress:
    """How far a training run got, read off its events as the worker emits them (so it is
    exact when the run fails): its folder, the step it resumed from and the last step reached."""

    run_dir: str = ""
    start_step: int = 0
    last_step: int = 0

    def note(self, event: P.Event) -> None:
        if isinstance(event, P.TrainStarted):
            self.run_dir, self.start_step, self.last_step = event.run_dir, event.start_step, event.start_step
        elif isinstance(event, (P.TrainStep, P.CheckpointSaved)):
            self.last_step = max(self.last_step, event.step)

    @property
    def checkpoint(self) -> str:
        """The run's newest complete checkpoint, or "" when it has none."""
        found = list_checkpoints(self.run_dir) if self.run_dir else []
        return str(found[-1]) if found else ""


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the failure itself
        return ""


def _out_of_memory(exc: BaseException) -> str:
    """Which memory ran out: "gpu", "host" (the machine's RAM), or "" when `exc` is no
    out-of-memory at all. The advice differs: a GPU is freed by closing other programs on it or by
    QLoRA, RAM by closing other programs or by smaller micro-batches."""
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    if oom_type is not None and isinstance(exc, oom_type):
        return "gpu"
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return "host"
    text = _safe_str(exc).lower()
    # torch's CPU allocator: "DefaultCPUAllocator: not enough memory: you tried to allocate N bytes"
    if "cpuallocator" in text or "not enough memory" in text:
        return "host"
    if "cuda out of memory" in text or "cublas_status_alloc_failed" in text:
        return "gpu"
    if "out of memory" in text:
        return "gpu" if _cuda_in_use(torch) else "host"
    return ""


def _cuda_in_use(torch: Any) -> bool:
    with contextlib.suppress(Exception):
        return bool(torch is not None and torch.cuda.is_initialized())
    return False


def _requested_size(exc: BaseException) -> str:
    """The allocation that failed, as the allocator's report gives it (torch's CUDA report says
    "Tried to allocate 2.00 GiB", its CPU allocator "you tried to allocate 123 bytes")."""
    text = _safe_str(exc)
    found = re.search(r"Tried to allocate ([\d.]+ ?[KMGT]?i?B)", text)
    if found:
        return found.group(1)
    found = re.search(r"tried to allocate (\d+) bytes", text)
    return f"{int(found.group(1)) / 2**30:.2f} GiB" if found else ""


def _oom_error(exc: BaseException, job: str, cfg: Any, progress: RunProgress, memory: str) -> P.EngineError:
    host = memory == "host"
    where = "the machine's RAM" if host else "GPU memory"
    others = (
        "close other programs using RAM (top lists them)"
        if host
        else "close other programs using the GPU (nvidia-smi lists them)"
    )
    half_dtype = (
        "set torch_dtype bfloat16 (a CPU loads float32 by default: twice the RAM)"
        if host and getattr(cfg, "torch_dtype", "") in ("auto", "float32")
        else ""
    )
    # torch's report is a paragraph (capacity, free, reserved...): the message keeps the size that
    # failed, and the whole report goes to the engine log.
    asked = _requested_size(exc)
    size = f" (it asked for {asked} more)" if asked else ""
    if job != "train":
        if job == "generate":
            hint = "lower max_new_tokens, compare fewer adapters at once, or wait until no training runs"
            if host:
                hint += f"; or {others}"
        else:
            hint = f"{others}, or use a smaller model"
        return P.EngineError(code="oom", message=f"{job} ran out of {where}{size}", hint=hint)

    if not progress.run_dir:  # before TrainStarted: the model itself did not fit
        steps = [others]
        if not host and getattr(cfg, "train_type", "") != "qlora":
            steps.append("use QLoRA (train_type qlora) to hold the base model in 4 bits")
        if half_dtype:
            steps.append(half_dtype)
        steps.append("or choose a smaller model")
        return P.EngineError(
            code="oom",
            message=f"training ran out of {where}{size} while loading the model, before its first step",
            hint="; ".join(steps) + ". Nothing was trained or written yet.",
        )
    batch = getattr(cfg, "per_device_train_batch_size", 1)
    accumulation = getattr(cfg, "gradient_accumulation_steps", 1)
    length = getattr(cfg, "max_length", "?")
    fitted = max(progress.last_step - progress.start_step, 0)
    # Memory peaks in the backward of the largest micro-batch: if no step fitted, the settings do
    # not fit at all; if some did, a batch of longer samples than before crossed the line.
    if fitted == 0:
        cause = (
            f"activations for {batch} sample(s) of up to {length} tokens per micro-batch, plus the "
            "model, need more than is free"
        )
    else:
        cause = (
            f"{fitted} step(s) fitted, then a micro-batch of longer samples did not "
            f"(up to {batch} x {length} tokens)"
        )
    when = f"after step {progress.last_step}" if fitted else "in its first step"
    message = f"training ran out of {where}{size} {when}: {cause}"
    steps = []
    if batch > 1:
        steps.append(
            f"lower per_device_train_batch_size (now {batch}) to {max(batch // 2, 1)} and raise "
            f"gradient_accumulation_steps (now {accumulation}) to {accumulation * 2}: the same samples "
            "per step in smaller micro-batches"
        )
    steps.append(f"lower max_length (now {length}): the longest samples set the peak")
    if not host and getattr(cfg, "train_type", "") != "qlora":
        # a resume keeps the run's train_type (its checkpoints hold LoRA on a 16-bit base)
        steps.append("or, in a new run, use QLoRA (train_type qlora) to hold the base model in 4 bits")
    if not getattr(cfg, "gradient_checkpointing", True):
        steps.append(
            "turn on gradient_checkpointing (recompute activations in backward instead of keeping them)"
        )
    elif not host and getattr(cfg, "profile", "") != Profile.LEAN:
        budget = getattr(cfg, "max_memory", 0.0)
        if budget > 0:
            # the process was capped a little above the budget: the plan took more than predicted
            steps.insert(
                0,
                f"set max_memory lower than {budget:g} GiB, so that a smaller plan is chosen (this "
                f"run was capped at {allocator_cap(budget) / 2**30:.1f} GiB and its plan needed more "
                "than predicted: the line 'plan: ...' in the log says what was predicted)",
            )
        else:
            steps.append(
                "set max_memory below the card's free memory (a smaller plan is chosen), or choose "
                "profile lean (it recomputes every layer and keeps the embedding matrix in host memory)"
            )
    if half_dtype:
        steps.append(half_dtype)
    checkpoint = progress.checkpoint
    if checkpoint:
        kept = (
            f"The run's checkpoints are kept: resume from {Path(checkpoint).name} with the new settings "
            "(Train pane r, or --resume_from_checkpoint)."
        )
    else:
        kept = "No checkpoint had been saved yet, so the run starts again from the beginning."
    return P.EngineError(code="oom", message=message, hint="; ".join(steps) + ". " + kept)


def free_memory() -> None:
    """Give a finished job's memory back: to the GPU's allocator, and to the operating system."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
    _return_freed_heap()


def _return_freed_heap() -> None:
    """A CPU training step frees gigabytes of activations, but glibc keeps freed blocks below its
    mmap threshold (which grows to 32 MiB) in its arenas: measured, an aborted run left 90% of its
    peak in the engine's RSS after every tensor was gone. malloc_trim hands those pages back."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):  # musl and others have no malloc_trim
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def reset_peak_memory() -> None:
    """The gauge's peak is per job."""
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats()


# ==================================================================== helpers


def build_config(cls: type, data: dict[str, Any]) -> Any:
    """A TrainConfig / GenerationConfig from a request's dict; the ConfigError names every
    problem at once (unknown keys and bad values), so a form can mark all of them."""
    names = {f.name for f in dataclasses.fields(cls)}
    problems = {key: "unknown setting" for key in sorted(set(data) - names)}
    try:
        cfg = cls(**{k: v for k, v in data.items() if k in names})
    except ConfigError as exc:
        problems.update(exc.problems)
    except TypeError as exc:  # a required field missing; config dataclasses have none today
        problems["config"] = str(exc)
    if problems:
        raise ConfigError(problems)
    return cfg


def check_messages(messages: Any, name: str = "messages") -> str:
    if not isinstance(messages, list) or not messages:
        return f"{name} is empty: the chat needs a user turn"
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            return f"{name}[{i}] must be an object with text fields role and content"
    if messages[-1]["role"] != "user":
        return f"the last message of {name} must be the user's turn"
    return ""


def model_loaded_event(session: Any, model: str, seconds: float) -> P.ModelLoaded:
    loaded = getattr(session, "loaded", None)  # engine/models.LoadedModel, when the session has one
    if loaded is not None:
        return P.ModelLoaded(
            model=loaded.resolved.label,
            path=str(loaded.resolved.path),
            parameters=int(loaded.parameters),
            seconds=round(seconds, 3),
            device=str(loaded.device),
            dtype=str(loaded.dtype).replace("torch.", ""),
        )
    return P.ModelLoaded(model=model, seconds=round(seconds, 3))
