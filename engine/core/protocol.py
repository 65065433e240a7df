"""The engine <-> client protocol: typed frozen dataclasses, one JSON object per line.

Needs only the standard library and orjson, so the TUI and the engine both import it. Every
message has a `type` tag (the class name). Requests carry an `id`; events that answer a request
echo it in their own `id` (events the engine sends unprompted have id ""). Events a job emits
(TrainStep, TokenChunk, ...) carry the id of the request that started the job.

Conversation, in order:
  connect       the engine sends a Snapshot (id "") with the whole state; a client that only
                watches (`tunebench status`) may stop here
  Hello         answered by a Snapshot echoing the id, with `controller` set: the first client
                to say Hello controls the workspace, later ones are read-only (their job requests
                get EngineError "read_only") until the controller disconnects;
                Hello(take_control=True) takes the slot over, Hello(observe=True) never takes it
  jobs          StartTraining / Generate / Export / LoadModel run one at a time; a second one
                gets EngineError "busy"; JobStatus marks each job's start and end
  always        MemorySample at least twice a second; GetStatus and EstimateMemory are
                answered while a job runs

Every Snapshot replaces the client's whole picture of the engine (history included). Lines
can be long (a Snapshot carries a run's history): read them with a large limit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

PROTOCOL_VERSION = 1

_REGISTRY: dict[str, type[Message]] = {}


class ProtocolError(ValueError):
    """A line that is not a valid message; the engine answers it with an EngineError."""


@dataclass(frozen=True)
class Message:
    kind: ClassVar[str] = "message"  # "request" or "event"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    @property
    def type(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: fields hold only JSON-ready values, and dataclasses.asdict would
        # deep-copy a Snapshot's whole run history (most of a second for 30,000 steps).
        return {"type": self.type, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


@dataclass(frozen=True)
class Request(Message):
    kind: ClassVar[str] = "request"
    id: str = ""


@dataclass(frozen=True)
class Event(Message):
    kind: ClassVar[str] = "event"
    id: str = ""


# ------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Hello(Request):
    client: str = ""  # who is asking, shown to other clients: "tui", "cli", "test"
    protocol: int = PROTOCOL_VERSION
    observe: bool = False  # watch only: never take the controller slot
    take_control: bool = False  # take the slot from the current controller (it turns read-only)
    pid: int = 0  # the client's process id, shown to other clients


@dataclass(frozen=True)
class GetStatus(Request):
    history: bool = True  # False: a Snapshot without the run history (cheap polling)


@dataclass(frozen=True)
class LoadModel(Request):
    model: str = "demo"
    torch_dtype: str = "auto"


@dataclass(frozen=True)
class StartTraining(Request):
    config: dict[str, Any] = field(default_factory=dict)  # a TrainConfig as a dict


@dataclass(frozen=True)
class StopTraining(Request):
    mode: str = "graceful"  # "graceful" saves a checkpoint; "abort" stops at once


@dataclass(frozen=True)
class Generate(Request):
    messages: list[dict[str, str]] = field(default_factory=list)  # chat so far, user turn last
    targets: list[str] = field(default_factory=lambda: ["base"])  # "base" or adapter/checkpoint dirs
    model: str = ""  # base model; "" = the adapters' runs name it (two bases: refused), else the loaded one
    system: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # a GenerationConfig as a dict
    # Side-by-side multi-turn chat: each target's own history (its own earlier answers), user
    # turn last; when given it replaces `messages`.
    conversations: dict[str, list[dict[str, str]]] = field(default_factory=dict)


@dataclass(frozen=True)
class CancelGenerate(Request):
    pass


@dataclass(frozen=True)
class Export(Request):
    adapter: str = ""
    output_dir: str = ""
    merge: bool = True


@dataclass(frozen=True)
class EstimateMemory(Request):
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Shutdown(Request):
    pass


# -------------------------------------------------------------------- events


@dataclass(frozen=True)
class Snapshot(Event):
    """Whole engine state, sent on connect: lets a reattaching client redraw everything."""

    engine_pid: int = 0
    job: str = ""  # "", "train", "generate", "export", "load"
    model: str = ""
    run_id: str = ""
    run_dir: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)  # events of the current run
    protocol: int = PROTOCOL_VERSION
    workspace: str = ""
    job_id: str = ""  # id of the request that started the running job
    job_started: float = 0.0  # unix time
    run_status: str = ""  # "", "running", "completed", "stopped", "aborted", "failed", "interrupted"
    controller: bool = False  # True: this client controls the workspace (may start jobs)
    controller_client: str = ""  # who controls it now ("" = nobody: the next job request takes it)
    clients: int = 0  # connected clients, this one included
    last_error: dict[str, Any] = field(default_factory=dict)  # the last job's EngineError, if any


@dataclass(frozen=True)
class ModelLoaded(Event):
    model: str = ""
    path: str = ""
    parameters: int = 0
    seconds: float = 0.0
    device: str = ""
    dtype: str = ""


@dataclass(frozen=True)
class Progress(Event):
    stage: str = ""  # "load", "tokenize", "save", ...
    done: int = 0
    total: int = 0
    message: str = ""


@dataclass(frozen=True)
class DataReport(Event):
    samples: int = 0
    eval_samples: int = 0
    tokens: int = 0
    truncated: int = 0
    dropped: int = 0  # samples left out when tokenised (no answer left within max_length, ...)
    problems: list[str] = field(default_factory=list)  # "file:line: reason"
    skipped: int = 0  # records that could not be read as samples (reasons in problems)

    def left_out(self) -> str:
        """The counts of what does not train as it was written, as the CLI and the TUI say them."""
        return f"{self.skipped} skipped, {self.truncated} truncated, {self.dropped} dropped"


@dataclass(frozen=True)
class TrainStarted(Event):
    run_id: str = ""
    run_dir: str = ""
    total_steps: int = 0
    start_step: int = 0
    trainable_parameters: int = 0
    command: str = ""


@dataclass(frozen=True)
class TrainStep(Event):
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float = 0.0
    lr: float = 0.0
    grad_norm: float = 0.0
    tokens_per_s: float = 0.0
    eta_s: float = 0.0
    elapsed_s: float = 0.0  # of the whole run: a resumed run adds its earlier attempts' up to the checkpoint


@dataclass(frozen=True)
class EvalResult(Event):
    step: int = 0
    eval_loss: float = 0.0


@dataclass(frozen=True)
class CheckpointSaved(Event):
    step: int = 0
    path: str = ""


@dataclass(frozen=True)
class TrainFinished(Event):
    run_id: str = ""
    status: str = ""  # "completed", "stopped", "aborted", "failed"
    adapter_dir: str = ""
    final_loss: float = 0.0
    steps: int = 0
    seconds: float = 0.0  # as TrainStep.elapsed_s: a resumed run's earlier attempts included
    # Where this attempt's time went, in seconds: "load" (the model), "to_first_step" (from the
    # model loaded to the first step's end: data, LoRA, optimizer, the first step), "first_step",
    # "compile" (torch.compile over the whole run, evals' included; the first step's is in the
    # Log line after it), "steps" (after the first, evals and checkpoints included), "save" (the
    # final adapter). Only the stages the attempt reached.
    stage_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ProbeVerdict(Event):
    """After a completed run: did the adapter's answers to the first probes move from the base's
    (core.verdict words the message, with advice from the final loss)."""

    run_id: str = ""
    changed: int = 0  # probes answered differently from the base
    total: int = 0
    message: str = ""
    # [{question, base, adapter}], for clients that show the answers side by side
    answers: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class TokenChunk(Event):
    target: str = ""
    text: str = ""


@dataclass(frozen=True)
class GenerateDone(Event):
    # target -> {ttft_s, tokens, tokens_per_s, text}: the whole answer, for clients that did not
    # assemble the chunks
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    cancelled: bool = False


@dataclass(frozen=True)
class ExportDone(Event):
    output_dir: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class MemoryEstimate(Event):
    total_gib: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)  # weights, lora, optimizer, activations...
    model: str = ""
    parameters: int = 0  # base model parameters
    trainable: int = 0  # LoRA parameters
    notes: list[str] = field(default_factory=list)  # assumptions worth showing next to the number
    memory: str = "gpu"  # which memory the numbers are for: "gpu", or "host" (RAM: no GPU here)
    available_gib: float = 0.0  # host: the RAM free when estimated
    advice: list[str] = field(default_factory=list)  # when it does not fit: settings that would
    plan: str = ""  # gpu: the plan chosen (engine/core/plans.py), as the run prints it before step 1
    refused: str = ""  # gpu: why training would be refused (no plan fits the budget), else ""
    sharding: str = ""  # several GPUs without --deepspeed: the stage the run takes by itself, and why


@dataclass(frozen=True)
class MemorySample(Event):
    # one per GPU the engine may use: index (CUDA's number after CUDA_VISIBLE_DEVICES, the one the
    # gpus setting takes), name, used and total bytes, util (percent, -1: not reported), and
    # nvml_index (the physical number; absent from older engines)
    gpus: list[dict[str, Any]] = field(default_factory=list)
    allocated: int = 0  # bytes, this engine's torch allocator
    reserved: int = 0
    peak: int = 0
    rss: int = 0  # engine process resident memory, for machines without a GPU
    ram_total: int = 0  # bytes of system memory, so a RAM gauge has a scale
    ram_available: int = 0
    gpu_note: str = ""  # why gpus is empty ("no NVIDIA GPU found (NVML: ...)"), else ""


@dataclass(frozen=True)
class EngineError(Event):
    # "bad_request", "busy", "read_only", "idle", "data", "config", "model", "user", "oom",
    # "internal"
    code: str = ""
    message: str = ""
    hint: str = ""


@dataclass(frozen=True)
class JobStatus(Event):
    """A job started or ended: lets every client (read-only ones too) lock and unlock controls."""

    job: str = ""  # "train", "generate", "export", "load"
    state: str = ""  # "started", "done", "failed"
    message: str = ""


@dataclass(frozen=True)
class ControlChanged(Event):
    """Sent to a client whose controller role changed (taken over, granted, or the slot freed)."""

    controller: bool = False
    controller_client: str = ""
    message: str = ""


@dataclass(frozen=True)
class Log(Event):
    level: str = "info"
    message: str = ""


# ------------------------------------------------------------------ encoding


def _fallback(value: Any) -> Any:
    # Paths and other odd values a job may put into a dict travel as text rather than failing.
    return str(value)


def encode(message: Message) -> bytes:
    """One message as one JSON line, newline included. NaN and infinity travel as null."""
    return orjson.dumps(message.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY, default=_fallback) + b"\n"


def decode(line: bytes | str) -> Message:
    """Parse one line; raises ProtocolError with a readable reason for anything malformed."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    return from_dict(data)


def from_dict(data: Any) -> Message:
    """A message from its dict form (as in Snapshot.history); raises ProtocolError."""
    if not isinstance(data, dict):
        raise ProtocolError("a message must be a JSON object")
    data = dict(data)
    name = data.pop("type", None)
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None or cls in (Message, Request, Event):
        raise ProtocolError(f"unknown message type {name!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    # Fields a newer peer added are ignored, so old and new versions can still talk.
    kwargs = {k: v for k, v in data.items() if k in known}
    for name_, value in kwargs.items():
        default = _default_of(known[name_])
        if isinstance(default, float) and value is None:
            # JSON has no NaN: orjson writes a NaN loss (no step done yet) as null.
            kwargs[name_] = math.nan
            continue
        if default is not None and not _same_kind(default, value):
            raise ProtocolError(
                f"{cls.__name__}.{name_}: expected {type(default).__name__}, got {type(value).__name__}"
            )
    return cls(**kwargs)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def message_types() -> dict[str, type[Message]]:
    return dict(_REGISTRY)
