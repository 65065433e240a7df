"""The wire protocol: every message survives a round trip, and malformed lines are refused plainly."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing

import orjson
import pytest
from tunebench.engine.core import protocol as P

BASES = {"Message", "Request", "Event"}
CONCRETE = {name: cls for name, cls in P.message_types().items() if name not in BASES}

SAMPLES = {  # a non-default value per annotation, so the round trip checks every field
    "str": "héllo\nworld",
    "int": 7,
    "float": 2.5,
    "bool": True,
    "list[dict[str, str]]": [{"role": "user", "content": "你好"}],
    "list[str]": ["base", "runs/a/adapter"],
    "list[dict[str, Any]]": [{"type": "TrainStep", "step": 3, "loss": 1.25}],
    "list[dict[str, Any]] | None": None,
    "dict[str, Any]": {"max_length": 64, "dataset": ["a.jsonl#5"]},
    "dict[str, float]": {"weights": 1.5, "lora": 0.25},
    "dict[str, dict[str, Any]]": {"base": {"ttft_s": 0.1, "tokens": 4, "text": "hi"}},
    "dict[str, list[dict[str, str]]]": {"base": [{"role": "user", "content": "hi"}]},
}


def sample_message(cls: type[P.Message]) -> P.Message:
    hints = typing.get_type_hints(cls, vars(P))
    values = {}
    for f in dataclasses.fields(cls):
        key = str(hints[f.name]).replace("typing.", "")
        key = {"<class 'str'>": "str", "<class 'int'>": "int", "<class 'float'>": "float"}.get(key, key)
        key = {"<class 'bool'>": "bool"}.get(key, key)
        assert key in SAMPLES, f"{cls.__name__}.{f.name}: add a sample for {key}"
        values[f.name] = SAMPLES[key]
    return cls(**values)


def test_the_protocol_has_the_messages_the_design_names():
    for name in (
        "Hello",
        "LoadModel",
        "StartTraining",
        "StopTraining",
        "Generate",
        "CancelGenerate",
        "Export",
        "Shutdown",
        "Snapshot",
        "ModelLoaded",
        "Progress",
        "TrainStep",
        "EvalResult",
        "CheckpointSaved",
        "TrainFinished",
        "TokenChunk",
        "GenerateDone",
        "MemorySample",
        "EngineError",
        "Log",
    ):
        assert name in CONCRETE


@pytest.mark.parametrize("name", sorted(CONCRETE))
def test_every_message_round_trips(name):
    cls = CONCRETE[name]
    for message in (cls(), sample_message(cls)):
        line = P.encode(message)
        assert line.endswith(b"\n") and line.count(b"\n") == 1  # one message, one line
        assert P.decode(line) == message
        assert P.from_dict(orjson.loads(line)) == message
    assert issubclass(cls, (P.Request, P.Event))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls().id = "x"  # type: ignore[misc]


def test_requests_and_events_are_told_apart():
    assert isinstance(P.decode(b'{"type": "Hello"}'), P.Request)
    assert isinstance(P.decode(b'{"type": "TrainStep"}'), P.Event)


def test_nan_loss_survives_the_trip():
    # A run aborted before its first step has a NaN final loss; JSON carries it as null.
    finished = P.decode(P.encode(P.TrainFinished(status="aborted", final_loss=math.nan)))
    assert finished.type == "TrainFinished" and math.isnan(finished.final_loss)


def test_numbers_and_newer_fields_are_tolerated():
    step = P.decode(b'{"type": "TrainStep", "step": 3, "loss": 2, "added_by_a_newer_engine": 1}')
    assert step == P.TrainStep(step=3, loss=2.0)


def test_snapshot_history_decodes_back_into_events():
    events = [P.TrainStarted(run_id="r", total_steps=4), P.TrainStep(step=1, loss=1.5)]
    snapshot = P.decode(P.encode(P.Snapshot(history=[e.to_dict() for e in events])))
    assert [P.from_dict(record) for record in snapshot.history] == events


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"", "not JSON"),
        (b"not json at all", "not JSON"),
        (b'{"type": "Hello"', "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b'\xef\xbb\xbf{"type": "Hello"}', "not JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b'"Hello"', "JSON object"),
        (b"null", "JSON object"),
        (b"{}", "unknown message type None"),
        (b'{"type": 5}', "unknown message type 5"),
        (b'{"type": "Nope"}', "unknown message type 'Nope'"),
        (b'{"type": "Message"}', "unknown message type"),
        (b'{"type": "Request"}', "unknown message type"),
        (b'{"type": "__init__"}', "unknown message type"),
        (b'{"type": "Hello", "id": 5}', "Hello.id: expected str"),
        (b'{"type": "Hello", "protocol": "1"}', "Hello.protocol: expected int"),
        (b'{"type": "Hello", "observe": 1}', "Hello.observe: expected bool"),
        (b'{"type": "TrainStep", "step": true}', "TrainStep.step: expected int"),
        (b'{"type": "TrainStep", "step": 1.5}', "TrainStep.step: expected int"),
        (b'{"type": "TrainStep", "loss": "low"}', "TrainStep.loss: expected float"),
        (b'{"type": "StartTraining", "config": []}', "StartTraining.config: expected dict"),
        (b'{"type": "Generate", "targets": "base"}', "Generate.targets: expected list"),
    ],
)
def test_malformed_lines_raise_protocol_error(line, reason):
    with pytest.raises(P.ProtocolError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        P.decode(line)


def test_protocol_needs_only_stdlib_and_orjson():
    code = (
        "import sys; import tunebench.engine.core.protocol; "
        "heavy = [m for m in ('torch', 'transformers', 'textual', 'rich', 'numpy') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
