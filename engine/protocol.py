"""The engine <-> client protocol: typed frozen dataclasses, one JSON object per line.

Needs only the standard library and orjson, so the TUI and the engine both import it. Every
message has a `type` tag (the class name). Requests carry an `id`; events that answer a request
echo it in their own `id` (events the engine sends unprompted have id "").
"""

from __future__ import annotations

import dataclasses
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
        return {"type": self.type, **dataclasses.asdict(self)}


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
    client: str = ""
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class GetStatus(Request):
    pass


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
    model: str = ""  # base model; "" = the loaded one, or the first adapter's run config
    system: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # a GenerationConfig as a dict


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
    job: str = ""  # "", "train", "generate", "export"
    model: str = ""
    run_id: str = ""
    run_dir: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)  # events of the current run


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
    dropped: int = 0
    problems: list[str] = field(default_factory=list)  # "file:line: reason"


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
    elapsed_s: float = 0.0


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
    seconds: float = 0.0


@dataclass(frozen=True)
class TokenChunk(Event):
    target: str = ""
    text: str = ""


@dataclass(frozen=True)
class GenerateDone(Event):
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # target -> ttft_s, tokens_per_s
    cancelled: bool = False


@dataclass(frozen=True)
class ExportDone(Event):
    output_dir: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class MemoryEstimate(Event):
    total_gib: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)  # weights, lora, optimizer, activations...


@dataclass(frozen=True)
class MemorySample(Event):
    gpus: list[dict[str, Any]] = field(default_factory=list)  # index, name, used, total, util
    allocated: int = 0  # bytes, this engine's torch allocator
    reserved: int = 0
    peak: int = 0
    rss: int = 0  # engine process resident memory, for machines without a GPU


@dataclass(frozen=True)
class EngineError(Event):
    code: str = ""  # "bad_request", "data", "config", "model", "oom", "busy", "internal"
    message: str = ""
    hint: str = ""


@dataclass(frozen=True)
class Log(Event):
    level: str = "info"
    message: str = ""


# ------------------------------------------------------------------ encoding


def encode(message: Message) -> bytes:
    """One message as one JSON line, newline included."""
    return orjson.dumps(message.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def decode(line: bytes | str) -> Message:
    """Parse one line; raises ProtocolError with a readable reason for anything malformed."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("a message must be a JSON object")
    name = data.pop("type", None)
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None or cls in (Message, Request, Event):
        raise ProtocolError(f"unknown message type {name!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    # Fields a newer peer added are ignored, so old and new versions can still talk.
    kwargs = {k: v for k, v in data.items() if k in known}
    for name_, value in kwargs.items():
        default = _default_of(known[name_])
        if default is not None and not _same_kind(default, value):
            raise ProtocolError(f"{cls.__name__}.{name_}: expected {type(default).__name__}, "
                                f"got {type(value).__name__}")
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
