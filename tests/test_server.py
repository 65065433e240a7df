"""The engine process: socket, control policy, jobs and their failures, reattach, detached start.

Most tests run the real server in a thread of this process (fast, and monkeypatch can inject
faults into jobs); the detach tests start it as its own process, exactly as the TUI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest
from threaded_engine import ThreadedEngine
from tiny import write_identity_dataset
from tunebench.engine.core import protocol as P
from tunebench.engine.core.config import TrainConfig, to_command
from tunebench.engine.core.errors import UserError
from tunebench.engine.core.workspace import Workspace, read_metrics
from tunebench.engine.process.client import (
    EngineConnection,
    EngineGone,
    EngineUnavailable,
    connect_or_start,
    engine_process,
    ensure_engine,
    probe_socket,
    remove_stale_socket,
    start_engine,
    status_text,
)
from tunebench.engine.process.ranks_job import train_command
from tunebench.engine.process.server import EngineAlreadyRunning, EngineServer

QUESTIONS = ["Who are you?", "What is your name?", "Who made you?", "你是谁？"]


# ====================================================================== fixtures


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models train fastest on one thread, and a loaded CI box cannot then slow them down
    by oversubscribing the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def workspace(tmp_path) -> Path:
    ws = tmp_path / "ws"
    write_identity_dataset(
        ws / "datasets" / "identity.jsonl", 8, QUESTIONS, "I am {{NAME}}, made by {{AUTHOR}}."
    )
    return ws


@pytest.fixture
def engine(workspace):
    running = ThreadedEngine(workspace)
    yield running
    running.stop()


def connect(ws: Path, client: str = "test", **hello) -> EngineConnection:
    conn = EngineConnection.open(ws)
    conn.hello(client, **hello)
    return conn


def train_config(model: Path, **over) -> dict:
    settings = {
        "model": str(model),
        "dataset": ["datasets/identity.jsonl"],  # relative: the engine resolves it in the workspace
        "model_name": ["robot"],
        "model_author": ["us"],
        "per_device_train_batch_size": 2,
        "learning_rate": 5e-3,
        "max_length": 64,
        "logging_steps": 1,
        "save_steps": 1000,
        "gradient_checkpointing": False,
        "max_steps": 100_000,  # runs until the test stops it
    }
    settings.update(over)
    return settings


def events_until(conn: EngineConnection, done, timeout: float = 60.0) -> list[P.Event]:
    """Every event (memory samples aside) up to and including the first one `done` accepts."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        event = conn.recv(max(deadline - time.monotonic(), 0.01))
        if event.type != "MemorySample":
            seen.append(event)
        if done(event):
            return seen


def job_ended(event: P.Event) -> bool:
    return event.type == "JobStatus" and event.state != "started"


def wait_steps(conn: EngineConnection, count: int) -> list[P.TrainStep]:
    steps: list[P.TrainStep] = []

    def enough(event: P.Event) -> bool:
        if event.type == "TrainStep":
            steps.append(event)
        assert event.type != "EngineError", event
        return len(steps) >= count

    events_until(conn, enough)
    return steps


# ====================================================================== socket and protocol


def test_socket_is_private_and_hello_gets_a_snapshot(engine, workspace):
    ws = Workspace(workspace)
    info = ws.socket_path.stat()
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(ws.state_dir.stat().st_mode) == 0o700
    assert ws.read_pid() == os.getpid()
    with EngineConnection.open(workspace) as conn:
        first = conn.snapshot
        assert first.id == "" and first.engine_pid == os.getpid() and first.workspace == str(ws.root)
        assert first.job == "" and not first.controller
        answer = conn.hello("tui")
        assert answer.type == "Snapshot" and answer.id and answer.controller
        assert answer.controller_client.startswith("tui")


PEER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("denied")
else:
    print("read", len(sock.recv(65536)))
"""


def _python_for_another_user(as_user: dict) -> str:
    """An interpreter the other user may run (this venv's may sit under root's home)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            subprocess.run([candidate, "-c", "pass"], check=True, capture_output=True, timeout=30, **as_user)
        except (OSError, subprocess.CalledProcessError):
            continue
        return candidate
    pytest.skip("no Python that another user may run")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to act as another user"
)
def test_another_user_cannot_connect_even_through_an_opened_folder(tmp_path):
    import shutil
    import tempfile

    # Under /tmp with an open path, so that only the workspace's own modes keep the user out.
    root = Path(tempfile.mkdtemp(prefix="tb-peer-"))
    os.chmod(root, 0o755)
    workspace = root / "ws"
    running = ThreadedEngine(workspace)
    ws = Workspace(workspace)
    as_nobody = {"user": 65534, "group": 65534, "extra_groups": []}
    python = _python_for_another_user(as_nobody)

    def other_user_tries() -> str:
        out = subprocess.run(
            [python, "-c", PEER, str(ws.socket_path)],
            capture_output=True,
            text=True,
            timeout=30,
            **as_nobody,
        )
        return out.stdout.strip() or out.stderr

    try:
        assert other_user_tries() == "denied"  # the 0700 folder and the 0600 socket
        os.chmod(ws.state_dir, 0o755)
        os.chmod(ws.socket_path, 0o666)
        # Someone opened both up: the engine itself checks who connects and hangs up, unanswered.
        assert other_user_tries() == "read 0"
        with EngineConnection.open(workspace) as conn:  # the owner is still served
            assert conn.snapshot.engine_pid == os.getpid()
    finally:
        running.stop()
        shutil.rmtree(root)


def test_bad_lines_get_errors_and_the_engine_goes_on(engine, workspace):
    with connect(workspace) as conn:
        bad = [
            b"this is not json\n",
            b'{"type": "Nope", "id": "u1"}\n',
            b'{"type": "TrainStep", "id": "e1"}\n',  # an event where a request belongs
            b'{"type": "StopTraining", "id": "m1", "mode": 3}\n',
            b'{"type": "StopTraining", "id": "m2", "mode": "later"}\n',
            b'{"type": "Generate", "id": "g1", "messages": []}\n',
            b'{"type": "StartTraining", "id": "c1", "config": {"lora_rank": 0, "bogus": 1}}\n',
            b"[1, 2]\n",
        ]
        for line in bad:
            conn.send_raw(line)
        errors = [conn.wait_for("EngineError", timeout=10) for _ in bad]
        codes = [e.code for e in errors]
        assert codes == ["bad_request"] * 6 + ["config", "bad_request"]
        assert [e.id for e in errors][:3] == ["", "u1", "e1"]  # the id is echoed when readable
        assert "lora_rank" in errors[6].message and "bogus" in errors[6].message
        conn.send_raw(b"x" * (17 * 1024 * 1024) + b"\n")  # past the line limit
        assert "longer than" in conn.wait_for("EngineError", timeout=20).message
        assert conn.request(P.GetStatus(), "Snapshot").type == "Snapshot"


def test_the_tail_of_an_oversize_line_is_discarded_not_read_as_a_message(workspace, monkeypatch):
    from tunebench.engine.process import server

    monkeypatch.setattr(server, "MAX_LINE", 64 * 1024)  # read when the engine starts
    running = ThreadedEngine(workspace)
    try:
        with connect(workspace) as conn:
            # Past the limit, the old reader dropped what it held and read the rest as a new line.
            conn.send_raw(b'{"type": "GetStatus", "id": "big", "pad": "' + b"x" * 100_000)
            time.sleep(0.5)  # the engine has read past its limit before the line's end arrives
            conn.send_raw(b"x" * 100_000 + b'"}\n')
            conn.send_raw(P.encode(P.GetStatus(id="after")))
            seen = events_until(conn, lambda e: e.type == "Snapshot" and e.id == "after", timeout=20)
        errors = [e for e in seen if e.type == "EngineError"]
        assert len(errors) == 1 and "longer than 65536 bytes" in errors[0].message, errors
        assert not [e for e in seen if e.type == "Snapshot" and e.id == "big"]
    finally:
        running.stop()


def test_a_client_that_never_reads_is_dropped_before_it_grows_the_engine(workspace, monkeypatch):
    from tunebench.engine.process import clients

    monkeypatch.setattr(clients, "MAX_CLIENT_BACKLOG_BYTES", 256 * 1024)
    running = ThreadedEngine(workspace)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(str(Workspace(workspace).socket_path))
        # Thousands of status requests, each answered with a Snapshot, and not one answer read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # dropped while it writes
            sock.sendall(P.encode(P.Hello(client="sink")) + P.encode(P.GetStatus(history=False)) * 20_000)
        log = Workspace(workspace).log_file
        deadline = time.monotonic() + 60
        while "dropping sink" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "the client that never reads was not dropped"
            time.sleep(0.1)
        assert "stopped reading" in log.read_text()
        sock.close()
        with connect(workspace) as conn:  # and the engine serves the next client as before
            assert conn.request(P.GetStatus(), "Snapshot").type == "Snapshot"
    finally:
        running.stop()


def test_memory_is_sampled_and_sent_unasked(engine, workspace):
    with connect(workspace) as conn:
        samples = [conn.wait_for("MemorySample", timeout=5) for _ in range(4)]
        assert all(s.rss > 0 for s in samples)
        assert samples[0].gpus or samples[0].gpu_note


def test_memory_estimate_is_answered(engine, workspace, tiny_model_dir):
    with connect(workspace) as conn:
        answer = conn.request(P.EstimateMemory(config=train_config(tiny_model_dir)), "MemoryEstimate")
        assert answer.type == "MemoryEstimate" and answer.total_gib > 0
        missing = conn.request(P.EstimateMemory(config={"model": "no/such-model"}), "MemoryEstimate")
        assert missing.type == "EngineError" and missing.code == "model"


def test_the_engine_side_imports_nothing_heavy():
    code = (
        "import sys\n"
        "import tunebench.engine.process.server, tunebench.engine.process.client\n"
        "import tunebench.engine.process.jobs, tunebench.engine.core.estimate\n"
        "import tunebench.engine.core.memory_sampler\n"
        "import tunebench.engine.core.workspace, tunebench.engine.cli.main, tunebench.engine.cli.engine\n"
        "print([m for m in ('torch', 'transformers', 'peft', 'textual', 'rich') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ====================================================================== control policy


def test_second_client_is_read_only_until_the_controller_leaves(engine, workspace, tiny_model_dir):
    first = connect(workspace, "tui-1")
    second = EngineConnection.open(workspace)
    hello = second.hello("tui-2")
    assert not hello.controller and hello.controller_client.startswith("tui-1")
    for request in (P.StartTraining(config=train_config(tiny_model_dir)), P.Shutdown(), P.StopTraining()):
        refused = second.request(request)
        assert refused.code == "read_only" and refused.message.startswith("tui-1 (pid")
        assert "controls this workspace; this session is read-only" in refused.message
    # It still sees everything: a job the controller starts reaches both.
    run_id = first.send(P.LoadModel(model="no/such-model"))
    for conn in (first, second):
        assert conn.wait_for("JobStatus", id=run_id, timeout=10).state == "started"
        assert conn.wait_for("EngineError", id=run_id, timeout=30).code == "model"
    first.close()
    # The controller left: the session that was waiting is told that it controls now.
    promoted = second.wait_for("ControlChanged", timeout=10)
    assert promoted.controller and promoted.controller_client.startswith("tui-2")
    assert "tui-1" in promoted.message and "disconnected" in promoted.message
    job = second.send(P.LoadModel(model="no/such-model"))
    assert second.wait_for("EngineError", id=job, timeout=30).code == "model"
    # A third session can take over explicitly; the old controller is told.
    third = connect(workspace, "tui-3", take_control=True)
    demoted = second.wait_for("ControlChanged", timeout=10)
    assert not demoted.controller and demoted.controller_client.startswith("tui-3")
    assert third.request(P.GetStatus(history=False), "Snapshot").controller
    observer = connect(workspace, "status", observe=True)
    assert observer.request(P.LoadModel(model="x/y")).code == "read_only"
    for conn in (second, third, observer):
        conn.close()


# ====================================================================== jobs on the real recipe


def test_training_streams_to_every_client_and_refuses_a_second_job(engine, workspace, tiny_model_dir):
    controller = connect(workspace, "tui")
    watcher = connect(workspace, "watcher")
    request_id = controller.send(P.StartTraining(config=train_config(tiny_model_dir)))
    # Sent in one write, so it arrives while the first job is certainly running.
    controller.send_raw(
        P.encode(P.StartTraining(id="again", config=train_config(tiny_model_dir)))
        + P.encode(P.Generate(id="chat", messages=[{"role": "user", "content": "hi"}]))
        + P.encode(P.Export(id="exp", adapter="runs/x/adapter"))
    )
    for request in ("again", "chat", "exp"):
        busy = controller.wait_for("EngineError", id=request, timeout=10)
        assert busy.code == "busy" and "one GPU job at a time" in busy.message and busy.hint
    steps = wait_steps(watcher, 3)
    assert [s.step for s in steps] == [1, 2, 3] and all(s.id == request_id for s in steps)
    # The loop answers while the job thread trains.
    status = controller.request(P.GetStatus(), "Snapshot")
    assert status.job == "train" and status.job_id == request_id and status.run_status == "running"
    assert controller.request(P.EstimateMemory(config=train_config(tiny_model_dir)), "MemoryEstimate")
    controller.send(P.StopTraining(mode="graceful"))
    finished = events_until(watcher, job_ended)
    kinds = [e.type for e in finished]
    assert "CheckpointSaved" in kinds and kinds[-1] == "JobStatus" and finished[-1].state == "done"
    (done,) = [e for e in finished if e.type == "TrainFinished"]
    assert done.status == "stopped" and Path(done.adapter_dir, "adapter_config.json").is_file()
    assert Path(done.adapter_dir).is_relative_to(workspace / "runs")
    controller.close()
    watcher.close()


def test_reattach_gets_the_whole_history_then_live_steps(engine, workspace, tiny_model_dir):
    first = connect(workspace, "tui")
    first.send(P.StartTraining(config=train_config(tiny_model_dir)))
    seen = wait_steps(first, 3)
    first.close()  # the terminal closed: the run goes on
    time.sleep(0.2)
    again = EngineConnection.open(workspace)
    snapshot = again.hello("tui")
    assert snapshot.controller and snapshot.job == "train" and snapshot.run_status == "running"
    history = [P.from_dict(record) for record in snapshot.history]
    steps = [e.step for e in history if e.type == "TrainStep"]
    assert steps[:3] == [s.step for s in seen] and steps == list(range(1, len(steps) + 1))
    assert history[0].type in ("ModelLoaded", "Log", "DataReport", "TrainStarted")
    assert any(e.type == "TrainStarted" and e.run_dir == snapshot.run_dir for e in history)
    live = wait_steps(again, 1)[0]
    assert live.step > steps[-1]
    assert "step" in status_text(workspace) and snapshot.run_id in status_text(workspace)
    again.send(P.StopTraining(mode="abort"))
    finished = events_until(again, job_ended)
    assert [e.status for e in finished if e.type == "TrainFinished"] == ["aborted"]
    again.close()


# ----------------------------------------------------- runs on several processes (torchrun)


@pytest.fixture
def ranks_only(monkeypatch):
    """A run on several processes is torchrun's, in a child: the engine must not train (or load a
    model) itself; gloo ranks on the CPU (a GPU box too), one torch thread each on a 2-core CI box."""
    import tunebench.engine.train.recipe as recipe

    def refuse(*_args, **_kw):
        raise AssertionError("the engine trained in its own process")

    monkeypatch.setattr(recipe, "run_training", refuse)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def rank_processes() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "LOCAL_RANK" in child.environ():
                found.append(child)
    return found


def test_the_child_runs_the_clis_command_with_the_runs_flags():
    from tunebench.engine.cli.flags import flag_values
    from tunebench.engine.cli.train import build_train_parser

    cfg = TrainConfig(
        model="demo", dataset=["d.jsonl"], gpus="0,1", nproc_per_node=2, lora_rank=4, system="-be brief"
    )
    command = train_command(cfg, 2)
    assert command[1:6] == ["-m", "tunebench.engine.cli.main", "train", "--json", "--probe_after"]
    assert "--gpus" not in " ".join(command) and "--nproc_per_node=2" in command
    # the CLI reads back the same settings, the system prompt that starts with "-" included
    values = flag_values(build_train_parser().parse_args(command[4:]))
    again = TrainConfig(**{k: v for k, v in values.items() if v is not None})
    assert again == dataclasses.replace(cfg, gpus="")
    assert to_command(cfg).endswith(
        "--nproc_per_node 2 --gpus 0,1 --lora_rank 4 --dataset d.jsonl --system '-be brief'"
    )


def test_gpus_that_are_not_here_are_refused_before_the_job_starts(
    engine, workspace, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a GPU box too: none visible
    with connect(workspace) as conn:
        error = conn.request(P.StartTraining(config=train_config(tiny_model_dir, gpus="0,1")), "EngineError")
        assert error.code == "config"
        assert "--gpus: '0,1', but this machine shows no NVIDIA GPU: leave gpus empty" in error.message
        assert conn.request(P.GetStatus(), "Snapshot").job == ""


def test_a_run_on_two_processes_streams_its_global_steps_like_one(
    engine, workspace, tiny_model_dir, ranks_only
):
    with connect(workspace) as conn:
        request_id = conn.send(
            P.StartTraining(config=train_config(tiny_model_dir, nproc_per_node=2, max_steps=4, save_steps=2))
        )
        events = events_until(conn, job_ended, timeout=240)
    assert not [e for e in events if e.type == "EngineError"], events
    assert all(e.id == request_id for e in events)
    (started,) = [e for e in events if e.type == "TrainStarted"]
    steps = [e for e in events if e.type == "TrainStep"]
    # 8 samples, 2 a rank a step: the global step counts both ranks' samples
    assert [s.step for s in steps] == [1, 2, 3, 4] and started.total_steps == 4
    assert all(s.tokens_per_s > 0 for s in steps[1:])
    assert [e.step for e in events if e.type == "CheckpointSaved"] == [2, 4]  # every 2 steps and the last
    kinds = [e.type for e in events]
    assert kinds.index("ProbeVerdict") < kinds.index("TrainFinished") and kinds[-1] == "JobStatus"
    (done,) = [e for e in events if e.type == "TrainFinished"]
    assert done.status == "completed" and done.steps == 4
    assert Path(done.adapter_dir, "adapter_model.safetensors").is_file()
    run = Path(started.run_dir)
    assert run.is_relative_to(workspace / "runs")
    assert orjson.loads((run / "config.json").read_bytes())["processes"] == 2
    # rank 0 alone wrote the metrics, each step once, as the events said
    assert [r["step"] for r in read_metrics(run) if r.get("type") == "TrainStep"] == [1, 2, 3, 4]
    assert not rank_processes()


def test_ranks_survive_a_detach_and_stop_abort_and_a_crash_reach_them_all(
    engine, workspace, tiny_model_dir, ranks_only
):
    first = connect(workspace, "tui")
    first.send(P.StartTraining(config=train_config(tiny_model_dir, nproc_per_node=2, save_steps=1000)))
    wait_steps(first, 1)
    first.close()  # the terminal closed: the ranks train on
    again = EngineConnection.open(workspace)
    snapshot = again.hello("tui")
    assert snapshot.job == "train" and snapshot.run_status == "running" and len(rank_processes()) == 2
    history = [P.from_dict(record) for record in snapshot.history]
    steps = [e.step for e in history if e.type == "TrainStep"]
    assert steps == list(range(1, len(steps) + 1))
    assert wait_steps(again, 1)[0].step > steps[-1]
    again.send(P.StopTraining(mode="graceful"))  # every rank stops after the same step, rank 0 saves
    events = events_until(again, job_ended, timeout=60)
    again.close()
    (done,) = [e for e in events if e.type == "TrainFinished"]
    (saved,) = [e for e in events if e.type == "CheckpointSaved"]
    assert done.status == "stopped" and saved.step == done.steps
    assert Path(done.adapter_dir, "adapter_model.safetensors").is_file()
    assert not rank_processes()

    with connect(workspace) as conn:
        conn.send(P.StartTraining(config=train_config(tiny_model_dir, nproc_per_node=2)))
        wait_steps(conn, 1)
        ranks = rank_processes()
        assert len(ranks) == 2
        conn.send(P.StopTraining(mode="abort"))
        events = events_until(conn, job_ended, timeout=20)  # the ranks end between two layers
        assert [e.status for e in events if e.type == "TrainFinished"] == ["aborted"]
        assert not [e for e in events if e.type == "EngineError"]
        _gone, alive = psutil.wait_procs(ranks, timeout=5)
        assert not alive

        # one rank dies: the job ends with the launcher's message naming it
        conn.send(P.StartTraining(config=train_config(tiny_model_dir, nproc_per_node=2)))
        wait_steps(conn, 1)
        (rank1,) = [p for p in rank_processes() if p.environ()["RANK"] == "1"]
        rank1.kill()
        events = events_until(conn, job_ended, timeout=60)
    (error,) = [e for e in events if e.type == "EngineError"]
    assert "rank 1 of 2 was killed by SIGKILL; the other 1 rank(s) were ended" in error.message
    assert error.hint and "Traceback" not in error.message
    assert [e.status for e in events if e.type == "TrainFinished"] == ["failed"]  # as in one process
    assert not rank_processes()


STUBBORN_RANK = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(600)
"""
RANK_LAUNCHER = """
import os, subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True,
                        env={**os.environ, "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
print(rank.pid, flush=True)
time.sleep(600)
"""


def test_ranks_that_ignore_an_abort_are_killed_after_the_grace(monkeypatch):
    import tunebench.engine.process.ranks_job as ranks_job

    monkeypatch.setattr(ranks_job, "ABORT_GRACE_S", 0.2)
    launcher = subprocess.Popen(
        [sys.executable, "-c", RANK_LAUNCHER, STUBBORN_RANK], stdout=subprocess.PIPE, text=True
    )
    try:
        rank = psutil.Process(int(launcher.stdout.readline()))
        assert launcher.stdout.readline() == "ready\n"  # its signal handlers are in place
        stopper = ranks_job.RankStopper(launcher)
        assert [r.pid for r in stopper.ranks()] == [rank.pid]
        stopper.request("abort")
        assert launcher.wait(timeout=30) == -signal.SIGKILL
        _gone, alive = psutil.wait_procs([rank], timeout=10)
        assert not alive
    finally:
        launcher.kill()
        launcher.communicate()


def test_restarted_engine_serves_the_last_run_from_disk(workspace, tiny_model_dir):
    running = ThreadedEngine(workspace)
    with connect(workspace) as conn:
        conn.send(P.StartTraining(config=train_config(tiny_model_dir, max_steps=4, save_steps=2)))
        finished = events_until(conn, job_ended)
        assert finished[-1].state == "done", finished
    running.stop()
    text = status_text(workspace)
    assert "not running" in text and "(completed)" in text and "4/4" in text and "step-2" in text
    running = ThreadedEngine(workspace)
    try:
        with EngineConnection.open(workspace) as conn:
            snap = conn.snapshot
            assert snap.run_status == "completed" and snap.job == ""
            steps = [r["step"] for r in snap.history if r["type"] == "TrainStep"]
            assert steps == [1, 2, 3, 4]
    finally:
        running.stop()


def test_reattach_to_a_long_run_gets_the_whole_history_in_one_snapshot(workspace):
    """A day-long run logs tens of thousands of steps; a reattaching client gets all of them in one
    Snapshot, and `tunebench status` draws the whole curve in one line."""
    run = workspace / "runs" / "long"
    run.mkdir(parents=True)
    steps = 30_000
    records = [
        P.TrainStep(step=s, total_steps=50_000, loss=3.0 / (1 + s / 1000), lr=1e-4, tokens_per_s=900.0)
        for s in range(1, steps + 1)
    ]
    records += [P.EvalResult(step=s, eval_loss=2.0) for s in range(500, steps + 1, 500)]
    (run / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(r.to_dict()) + b"\n" for r in records))
    running = ThreadedEngine(workspace)
    try:
        with EngineConnection.open(workspace) as conn:
            snapshot = conn.hello("tui")
        logged = [r["step"] for r in snapshot.history if r["type"] == "TrainStep"]
        assert logged == list(range(1, steps + 1)) and snapshot.run_status == "interrupted"
        # NaN in a history record still travels as null, and the bytes decode to the same Snapshot
        odd = P.Snapshot(history=[*snapshot.history[-3:], {"type": "Log", "x": float("nan")}], last_error={})
        assert P.decode(P.encode(odd)).history[-1] == {"type": "Log", "x": None}
        assert P.decode(P.encode(snapshot)) == snapshot
        text = status_text(workspace)
        assert f"{steps}/50000" in text
        # ... with the whole loss curve, falling, in one line
        (curve,) = [line for line in text.splitlines() if line.startswith("loss ")]
        sparks = curve.split()[1]
        levels = ["▁▂▃▄▅▆▇█".index(c) for c in sparks]
        assert (
            len(sparks) == 40
            and levels[0] == 7
            and levels[-1] == 0
            and levels == sorted(levels, reverse=True)
        )
        first, last = 3.0 / (1 + 1 / 1000), 3.0 / (1 + steps / 1000)
        assert curve.endswith(f"{first:.4f} -> {last:.4f}, steps 1-{steps}")
    finally:
        running.stop()


def test_shutdown_stops_training_gracefully_first(workspace, tiny_model_dir):
    running = ThreadedEngine(workspace)
    conn = connect(workspace)
    conn.send(P.StartTraining(config=train_config(tiny_model_dir)))
    wait_steps(conn, 2)
    conn.send(P.Shutdown())
    finished = events_until(conn, lambda e: e.type == "TrainFinished")
    assert finished[-1].status == "stopped"  # a checkpoint and the adapter were saved
    assert any(e.type == "CheckpointSaved" for e in finished)
    with pytest.raises(EngineGone):
        while True:
            conn.recv(10)
    conn.close()
    running.thread.join(10)
    assert not running.thread.is_alive() and probe_socket(workspace) == "missing"


# ====================================================================== failures stay contained


def test_a_bad_dataset_is_reported_plainly(engine, workspace, tiny_model_dir, monkeypatch):
    from tunebench.engine.models import loading as models

    def no_load(*args, **kwargs):
        raise AssertionError("the data is checked before any weights load")

    monkeypatch.setattr(models, "load_model", no_load)
    with connect(workspace) as conn:
        conn.send(P.StartTraining(config=train_config(tiny_model_dir, dataset=["datasets/missing.jsonl"])))
        events = events_until(conn, job_ended)
        (error,) = [e for e in events if e.type == "EngineError"]
        assert error.code == "data" and "missing.jsonl" in error.message and error.hint
        assert "Traceback" not in error.message + error.hint
        assert events[-1].state == "failed"
        assert conn.request(P.GetStatus(), "Snapshot").last_error["code"] == "data"


def test_abort_while_the_data_is_tokenised_ends_the_job_and_the_engine_takes_the_next(
    engine, workspace, tiny_model_dir, monkeypatch
):
    """Reading and tokenising a large dataset takes minutes; an abort must not wait for it, and the
    engine must not answer "busy" afterwards."""
    import threading

    from tunebench.engine.core import encoding

    write_identity_dataset(workspace / "datasets" / "big.jsonl", 400, QUESTIONS, "I am {{NAME}}.")
    real, entered = encoding.encode_messages, threading.Event()

    def slow_encode(*args, **kwargs):
        entered.set()
        time.sleep(0.5)  # 400 samples: 200 s, unless the abort stops the loop
        return real(*args, **kwargs)

    monkeypatch.setattr(encoding, "encode_messages", slow_encode)
    with connect(workspace) as conn:
        request_id = conn.send(
            P.StartTraining(config=train_config(tiny_model_dir, dataset=["datasets/big.jsonl"]))
        )
        assert entered.wait(60)
        conn.send(P.StopTraining(mode="abort"))
        events = events_until(conn, job_ended, timeout=30)  # a hang guard: 200 s without the fix
        finished = [e for e in events if e.type == "TrainFinished"]
        assert [f.status for f in finished] == ["aborted"] and events[-1].id == request_id
        assert not [e for e in events if e.type == "EngineError"]

        monkeypatch.setattr(encoding, "encode_messages", real)
        conn.send(P.StartTraining(config=train_config(tiny_model_dir, max_steps=1)))
        events = events_until(conn, job_ended)
        assert [e.status for e in events if e.type == "TrainFinished"] == ["completed"]


def test_abort_lands_inside_the_model_load(engine, workspace, tiny_model_dir, monkeypatch):
    """A 7B load from a slow disk takes minutes and from_pretrained has no hook: the abort is taken
    at the load's next torch call, not after the last weight. Each weight read is made slow here."""
    import threading

    from transformers import core_model_loading

    real, entered, reads = core_model_loading._materialize_copy, threading.Event(), []

    def slow_read(*args, **kwargs):
        reads.append(1)
        entered.set()
        time.sleep(1)  # the tiny model has about 20 weights: 20 s, unless the abort cuts the load
        return real(*args, **kwargs)

    monkeypatch.setattr(core_model_loading, "_materialize_copy", slow_read)
    with connect(workspace) as conn:
        conn.send(P.StartTraining(config=train_config(tiny_model_dir)))
        assert entered.wait(60)
        conn.send(P.StopTraining(mode="abort"))
        events = events_until(conn, job_ended, timeout=60)
    assert [e.status for e in events if e.type == "TrainFinished"] == ["aborted"]
    assert not [e for e in events if e.type in ("EngineError", "TrainStep")]
    assert len(reads) < 10  # of about 20: the rest never read (transformers reads up to 4 at a time)


def test_abort_lands_inside_a_long_step(engine, workspace, tiny_model_dir, monkeypatch):
    """One step of a large batch on a CPU takes minutes: the abort is taken between layers, not
    after the step. The tiny model has two layers; a slow MLP makes the step's forward long."""
    import threading

    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU path's check between layers: compiled CUDA layers take no hooks")

    from transformers.models.llama import modeling_llama

    real, entered, calls = modeling_llama.LlamaMLP.forward, threading.Event(), []

    def slow_mlp(self, x):
        calls.append(1)
        entered.set()
        time.sleep(3)  # time for the abort to arrive while this layer runs
        return real(self, x)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", slow_mlp)
    with connect(workspace) as conn:
        conn.send(P.StartTraining(config=train_config(tiny_model_dir, per_device_train_batch_size=1)))
        assert entered.wait(120)
        conn.send(P.StopTraining(mode="abort"))
        events = events_until(conn, job_ended, timeout=120)
    assert [e.status for e in events if e.type == "TrainFinished"] == ["aborted"]
    assert not [e for e in events if e.type in ("EngineError", "TrainStep")]
    assert len(calls) == 1  # the second layer never ran: the step was cut short


def test_internal_error_is_logged_and_the_engine_still_trains(engine, workspace, tiny_model_dir, monkeypatch):
    import tunebench.engine.train.recipe as train

    real = train.run_training

    def broken(cfg, emit, stop):
        raise KeyError("a bug in the recipe")

    monkeypatch.setattr(train, "run_training", broken)
    with connect(workspace) as conn:
        conn.send(P.StartTraining(config=train_config(tiny_model_dir)))
        (error,) = [e for e in events_until(conn, job_ended) if e.type == "EngineError"]
        assert error.code == "internal" and "KeyError" in error.message
        assert "engine.log" in error.hint and "still running" in error.hint
        log = (workspace / ".tunebench" / "engine.log").read_text()
        assert "Traceback" in log and "a bug in the recipe" in log
        monkeypatch.setattr(train, "run_training", real)
        conn.send(P.StartTraining(config=train_config(tiny_model_dir, max_steps=2)))
        events = events_until(conn, job_ended)
        assert events[-1].state == "done"
        assert [e.status for e in events if e.type == "TrainFinished"] == ["completed"]


def test_a_completed_run_says_whether_the_adapter_answers_differently(engine, workspace, tiny_model_dir):
    (workspace / "probes.txt").write_text("Who are you?\nWho made you?\nWhat can you do?\nA fourth?\n")
    with connect(workspace) as conn:
        conn.send(P.StartTraining(config=train_config(tiny_model_dir, max_steps=2)))
        events = events_until(conn, job_ended)
        kinds = [e.type for e in events]
        # Sent while the job still holds the GPU, just before the run's final event.
        assert kinds.index("ProbeVerdict") < kinds.index("TrainFinished"), kinds
        (verdict,) = [e for e in events if e.type == "ProbeVerdict"]
        (finished,) = [e for e in events if e.type == "TrainFinished"]
        assert verdict.run_id == finished.run_id and verdict.total == 3
        questions = ["Who are you?", "Who made you?", "What can you do?"]
        assert [a["question"] for a in verdict.answers] == questions
        assert verdict.message.startswith("the adapter ") and "after 2 steps" in verdict.message
        # A client that attaches later sees it too.
        history = conn.request(P.GetStatus(), "Snapshot").history
        assert any(r["type"] == "ProbeVerdict" for r in history)


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise ValueError("even its message is broken")


def _fault_cases():
    import torch

    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return [
        ("train", "tunebench.engine.train.recipe.run_training", SystemExit(2), "internal", "SystemExit"),
        (
            "train",
            "tunebench.engine.train.recipe.run_training",
            UnprintableError(),
            "internal",
            "UnprintableError",
        ),
        ("generate", "tunebench.engine.infer.generate.GenerationSession", oom, "oom", "max_new_tokens"),
        (
            "export",
            "tunebench.engine.infer.export.export_model",
            KeyboardInterrupt(),
            "internal",
            "KeyboardInterrupt",
        ),
        (
            "load",
            "tunebench.engine.infer.generate.GenerationSession",
            RecursionError("too deep"),
            "internal",
            "too deep",
        ),
    ]


@pytest.mark.parametrize(
    "case", range(5), ids=["train-exit", "train-unprintable", "generate-oom", "export-ctrl-c", "load"]
)
def test_a_failure_in_any_job_leaves_the_engine_serving(case, engine, workspace, tiny_model_dir, monkeypatch):
    kind, target, exc, code, words = _fault_cases()[case]

    def fails(*args, **kwargs):
        raise exc

    monkeypatch.setattr(target, fails)
    request = {
        "train": P.StartTraining(config=train_config(tiny_model_dir)),
        "generate": P.Generate(messages=[{"role": "user", "content": "hi"}], model=str(tiny_model_dir)),
        "export": P.Export(adapter="runs/some-run/adapter"),
        "load": P.LoadModel(model=str(tiny_model_dir)),
    }[kind]
    with connect(workspace) as conn:
        request_id = conn.send(request)
        events = events_until(conn, job_ended, timeout=60)
        (error,) = [e for e in events if e.type == "EngineError"]
        assert error.id == request_id and error.code == code, error
        assert words in error.message + error.hint and "Traceback" not in error.message + error.hint
        assert events[-1].state == "failed" and events[-1].job == kind
        snap = conn.request(P.GetStatus(), "Snapshot")
        assert snap.job == "" and snap.last_error["code"] == code
        # The job slot is free again: the next job runs (and fails fast on a model that is not there).
        monkeypatch.undo()
        nxt = conn.send(P.LoadModel(model="no/such-model"))
        assert conn.wait_for("EngineError", id=nxt, timeout=30).code == "model"
    if code == "internal":
        assert "Traceback" in (workspace / ".tunebench" / "engine.log").read_text()


def test_out_of_memory_names_the_fix_and_closes_the_run(engine, workspace, tiny_model_dir, monkeypatch):
    import torch
    import tunebench.engine.train.recipe as train

    def runs_out_of_memory(cfg, emit, stop):
        run_dir = Path(cfg.output_dir) / "oom-run"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_bytes(orjson.dumps(P.TrainStep(step=1, loss=2.0).to_dict()) + b"\n")
        emit(P.TrainStarted(run_id="oom-run", run_dir=str(run_dir), total_steps=10))
        emit(P.TrainStep(step=1, total_steps=10, loss=2.0))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train, "run_training", runs_out_of_memory)
    with connect(workspace) as conn:
        conn.send(P.StartTraining(config=train_config(tiny_model_dir, max_length=512)))
        events = events_until(conn, job_ended)
        (error,) = [e for e in events if e.type == "EngineError"]
        assert error.code == "oom" and "ran out of GPU memory (it asked for 20.00 GiB more)" in error.message
        assert "after step 1" in error.message
        for advice in (
            "per_device_train_batch_size (now 2) to 1",
            "gradient_accumulation_steps (now 1) to 2",
            "max_length (now 512)",
            "QLoRA",
            "turn on gradient_checkpointing (recompute activations",
            "No checkpoint had been saved yet",
        ):
            assert advice in error.hint
        (finished,) = [e for e in events if e.type == "TrainFinished"]
        assert finished.status == "failed" and finished.steps == 1
        records = read_metrics(workspace / "runs" / "oom-run")
        assert records[-1]["type"] == "TrainFinished" and records[-1]["status"] == "failed"
        snap = conn.request(P.GetStatus(), "Snapshot")
        assert snap.job == "" and snap.run_status == "failed" and snap.last_error["code"] == "oom"
    assert "(failed)" in status_text(workspace) and "[oom]" in status_text(workspace)


def test_out_of_memory_mid_run_keeps_its_checkpoints_and_the_run_resumes(
    engine, workspace, tiny_model_dir, monkeypatch
):
    """The real recipe, with the allocator failing in the forward of step 5 (as a long batch would
    on a full card): the run stops with advice, its checkpoints stay, and the same engine resumes it."""
    import torch
    import tunebench.engine.train.recipe as recipe
    from tunebench.engine.core.workspace import list_checkpoints

    real_select_path = recipe.select_path
    forwards = []

    def path_failing_at_step_5(cfg, device, *plan_inputs):
        # The loss of whichever path this device runs (the CUDA fast path on a GPU), so the
        # failure comes from where a real one would.
        path = real_select_path(cfg, device, *plan_inputs)
        loss_sum = path.loss_sum

        def fails_at_step_5(model, batch):
            forwards.append(batch.tokens)
            if len(forwards) == 5:  # one forward per step
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 ...")
            return loss_sum(model, batch)

        path.loss_sum = fails_at_step_5
        return path

    monkeypatch.setattr(recipe, "select_path", path_failing_at_step_5)
    settings = train_config(
        tiny_model_dir, max_steps=8, save_steps=2, run_name="oom", gradient_checkpointing=True, max_length=96
    )
    with connect(workspace) as conn:
        conn.send(P.StartTraining(config=settings))
        events = events_until(conn, job_ended)
        (error,) = [e for e in events if e.type == "EngineError"]
        assert error.code == "oom" and "(it asked for 3.50 GiB more) after step 4" in error.message
        assert "4 step(s) fitted, then a micro-batch of longer samples did not" in error.message
        for advice in (
            "per_device_train_batch_size (now 2) to 1",
            "max_length (now 96)",
            "use QLoRA (train_type qlora)",
            "profile lean (it recomputes every layer",
            "resume from step-4",
        ):
            assert advice in error.hint, error.hint
        assert "turn on gradient_checkpointing" not in error.hint  # it is on already
        (finished,) = [e for e in events if e.type == "TrainFinished"]
        assert finished.status == "failed" and finished.steps == 4
        run_dir = workspace / "runs" / "oom"
        assert [p.name for p in list_checkpoints(run_dir)] == ["step-2", "step-4"]
        # Still usable: the same engine resumes the run from its last checkpoint to the end.
        monkeypatch.setattr(recipe, "select_path", real_select_path)
        conn.send(P.StartTraining(config={**settings, "resume_from_checkpoint": "runs/oom"}))
        events = events_until(conn, job_ended)
        assert events[-1].state == "done", [e for e in events if e.type == "EngineError"]
        assert [e.step for e in events if e.type == "TrainStep"] == [5, 6, 7, 8]
        assert [e.status for e in events if e.type == "TrainFinished"] == ["completed"]
        assert conn.request(P.GetStatus(), "Snapshot").run_status == "completed"


def test_out_of_memory_advice_follows_how_far_the_run_got(tmp_path):
    import torch
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.process.jobs import RunProgress, describe_failure

    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.95 GiB. GPU 0 has ...")
    qlora = TrainConfig(
        dataset=["d.jsonl"], train_type="qlora", per_device_train_batch_size=4, gradient_accumulation_steps=4
    )
    loading, log = describe_failure(oom, "train", qlora, progress=RunProgress())
    assert loading.message == (
        "training ran out of GPU memory (it asked for 1.95 GiB more) while loading the model, "
        "before its first step"
    )
    assert (
        "smaller model" in loading.hint and "max_length" not in loading.hint and "QLoRA" not in loading.hint
    )
    assert "GPU 0 has" in log  # the allocator's whole report goes to the engine log
    run = tmp_path / "run"
    (run / "checkpoints" / "step-10").mkdir(parents=True)
    (run / "checkpoints" / "step-10" / "trainer_state.pt").write_bytes(b"state")
    (run / "checkpoints" / ".tmp-step-20").mkdir()  # half written: not one to resume from
    resumed = RunProgress(run_dir=str(run), start_step=10, last_step=10)
    first, _ = describe_failure(oom, "train", qlora, progress=resumed)
    assert "in its first step: activations for 4 sample(s) of up to 2048 tokens" in first.message
    for advice in (
        "(now 4) to 2 and raise gradient_accumulation_steps (now 4) to 8",
        "profile lean",
        "resume from step-10",
    ):
        assert advice in first.hint
    assert "QLoRA" not in first.hint  # it is QLoRA already
    # under --max_memory the process was capped: a smaller budget gives a smaller plan
    capped = dataclasses.replace(qlora, max_memory=10.5)
    over, _ = describe_failure(oom, "train", capped, progress=resumed)
    assert over.hint.startswith("set max_memory lower than 10.5 GiB, so that a smaller plan is chosen")
    assert "capped at 11.5 GiB" in over.hint  # 10% over the budget
    plain = TrainConfig(dataset=["d.jsonl"], per_device_train_batch_size=1, gradient_checkpointing=False)
    host, _ = describe_failure(
        MemoryError(), "train", plain, progress=RunProgress(run_dir=str(run), last_step=3)
    )
    assert host.message.startswith("training ran out of the machine's RAM after step 3: 3 step(s) fitted")
    assert "turn on gradient_checkpointing" in host.hint and "resume from step-10" in host.hint
    assert "per_device_train_batch_size" not in host.hint  # 1 already: nothing to lower
    assert "QLoRA" not in host.hint  # a GPU remedy, no help for RAM


# ====================================================================== generation


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.train.recipe import run_training

    data = tmp_path_factory.mktemp("adapter-data") / "identity.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": "I am robot."},
                    ]
                }
            )
            for q in QUESTIONS
        )
        + "\n"
    )
    out = tmp_path_factory.mktemp("adapter-runs")
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        dataset=[str(data)],
        max_steps=2,
        max_length=64,
        gradient_checkpointing=False,
        output_dir=str(out),
        run_name="adapter",
    )
    return Path(run_training(cfg, lambda event: None).adapter_dir)


def test_generate_streams_every_column_and_can_be_cancelled(engine, workspace, tiny_model_dir, tiny_adapter):
    chat = [{"role": "user", "content": "Who are you?"}]
    targets = ["base", str(tiny_adapter)]
    with connect(workspace) as conn:
        request_id = conn.send(
            P.Generate(
                messages=chat, targets=targets, model=str(tiny_model_dir), config={"max_new_tokens": 6}
            )
        )
        events = events_until(conn, job_ended, timeout=90)
        assert events[-1].state == "done", [e for e in events if e.type == "EngineError"]
        chunks = [e for e in events if e.type == "TokenChunk"]
        assert {c.target for c in chunks} == set(targets) and all(c.id == request_id for c in chunks)
        (done,) = [e for e in events if e.type == "GenerateDone"]
        assert set(done.stats) == set(targets) and not done.cancelled
        answers = {}
        for target in targets:
            answers[target] = "".join(c.text for c in chunks if c.target == target)
            assert answers[target] == done.stats[target].get("text", answers[target])
        # A second turn, side by side: each column continues its own conversation.
        follow_up = {
            target: [
                *chat,
                {"role": "assistant", "content": f"I am {i}."},
                {"role": "user", "content": "And?"},
            ]
            for i, target in enumerate(targets)
        }
        second = P.Generate(
            conversations=follow_up, targets=targets, model=str(tiny_model_dir), config={"max_new_tokens": 3}
        )
        done = conn.request(second, "GenerateDone", timeout=60)
        assert done.type == "GenerateDone" and set(done.stats) == set(targets), done
        # The answer is the job's last word: the next request right after it is not "busy".
        third = conn.request(
            P.Generate(messages=chat, targets=["base"], config={"max_new_tokens": 2}), "GenerateDone"
        )
        assert third.type == "GenerateDone", third
        # Generate and CancelGenerate in one write: the cancel lands before any token is made.
        conn.send_raw(
            P.encode(P.Generate(id="long", messages=chat, targets=["base"], model=str(tiny_model_dir)))
            + P.encode(P.CancelGenerate(id="stop"))
        )
        assert conn.wait_for("Log", id="stop", timeout=10).message
        done = conn.wait_for("GenerateDone", id="long", timeout=60)
        assert done.cancelled
        assert conn.wait_for("JobStatus", id="long", timeout=30).state == "done"
        assert conn.request(P.CancelGenerate()).code == "idle"


def test_cancel_lands_inside_the_chat_models_load(engine, workspace, tiny_model_dir, monkeypatch):
    """A chat's first question loads the model; Esc during that load ends it at once."""
    import threading

    from transformers import core_model_loading

    real, entered, reads = core_model_loading._materialize_copy, threading.Event(), []

    def slow_read(*args, **kwargs):
        reads.append(1)
        entered.set()
        time.sleep(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(core_model_loading, "_materialize_copy", slow_read)
    chat = [{"role": "user", "content": "Who are you?"}]
    with connect(workspace) as conn:
        conn.send(P.Generate(id="first", messages=chat, targets=["base"], model=str(tiny_model_dir)))
        assert entered.wait(60)
        conn.send(P.CancelGenerate(id="stop"))
        done = conn.wait_for("GenerateDone", id="first", timeout=60)
        assert done.cancelled and done.stats == {}
        assert conn.wait_for("JobStatus", id="first", timeout=30).state == "done"
        assert len(reads) < 10  # of about 20: the rest never read (transformers reads up to 4 at a time)
        monkeypatch.setattr(core_model_loading, "_materialize_copy", real)
        again = conn.request(
            P.Generate(
                messages=chat, targets=["base"], model=str(tiny_model_dir), config={"max_new_tokens": 2}
            ),
            "GenerateDone",
        )
        assert again.type == "GenerateDone" and not again.cancelled, again


def test_export_merges_an_adapter_into_exports(engine, workspace, tiny_adapter):
    with connect(workspace) as conn:
        request_id = conn.send(P.Export(adapter=str(tiny_adapter)))
        events = events_until(conn, job_ended, timeout=90)
        assert events[-1].state == "done", [e for e in events if e.type == "EngineError"]
        (done,) = [e for e in events if e.type == "ExportDone"]
        assert done.id == request_id
        assert Path(done.output_dir) == workspace / "exports" / "adapter"  # named after its run
        assert (Path(done.output_dir) / "config.json").is_file()
        assert any(e.type == "Progress" and e.stage == "export" for e in events)


# ====================================================================== the engine as its own process


def _wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


LAUNCHER = """
import sys, time
from tunebench.engine.process.client import start_engine
print(start_engine(sys.argv[1]), flush=True)
time.sleep(120)
"""


def test_detached_engine_survives_its_terminal_and_is_reused(workspace):
    # The launcher stands in for a TUI in a terminal session; the engine must outlive both.
    parent = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(workspace)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pid = int(parent.stdout.readline())
    ensure_engine(workspace, timeout=20)
    with EngineConnection.open(workspace) as conn:
        assert conn.snapshot.engine_pid == pid
    os.killpg(parent.pid, signal.SIGHUP)  # the terminal closes ...
    os.killpg(parent.pid, signal.SIGKILL)  # ... and whatever is left of the session dies
    parent.wait(10)
    parent.stdout.close()
    time.sleep(0.3)
    engine = psutil.Process(pid)
    assert engine.status() != psutil.STATUS_ZOMBIE
    assert os.getsid(pid) == pid != os.getsid(0)  # its own session, no controlling terminal
    assert engine.net_connections(kind="inet") == []  # nothing listens on TCP
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps  # start-up stays cheap: no torch until a job needs it
    conn = connect_or_start(workspace, timeout=20)  # reuses the live engine
    assert conn.snapshot.engine_pid == pid
    assert conn.hello("tui").controller
    conn.send(P.Shutdown())
    assert conn.wait_for("Log", timeout=10)
    conn.close()
    assert _wait_gone(pid)
    ws = Workspace(workspace)
    assert not ws.socket_path.exists() and not ws.pid_file.exists()


# Loaded into the engine process through PYTHONPATH: when the engine renames a finished checkpoint
# folder into place, the kill comes first, with the state file only half written, so the
# checkpoint is caught mid-write. Nothing in the engine knows about it.
TEAR_CHECKPOINT = """
import os, signal

_replace = os.replace


def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(src)) == ".tmp-step-{step}":
        state = os.path.join(src, "trainer_state.pt")
        os.truncate(state, os.path.getsize(state) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *args, **kwargs)


os.replace = replace
"""


def test_engine_killed_mid_checkpoint_resumes_with_exactly_the_losses(workspace, tiny_model_dir, tmp_path):
    from tunebench.engine.core.config import TrainConfig
    from tunebench.engine.core.workspace import list_checkpoints
    from tunebench.engine.train.recipe import run_training

    settings = train_config(tiny_model_dir, max_steps=40, save_steps=10, run_name="crash")
    baseline = {}
    uninterrupted = {**settings, "dataset": [str(workspace / "datasets" / "identity.jsonl")]}
    uninterrupted["output_dir"] = str(tmp_path / "baseline")
    run_training(
        TrainConfig(**uninterrupted), lambda e: e.type == "TrainStep" and baseline.update({e.step: e.loss})
    )
    assert sorted(baseline) == list(range(1, 41))
    # The engine as the TUI starts it, on one thread like the baseline so the sums add up alike,
    # set to die while it writes the step-20 checkpoint.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(TEAR_CHECKPOINT.format(step=20))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(hooks), *sys.path])}
    pid = start_engine(workspace, env=env)
    ensure_engine(workspace, timeout=20)
    before_kill = {}
    with connect(workspace) as conn:
        conn.send(P.StartTraining(config=settings))
        with pytest.raises(EngineGone):  # it dies with no warning and no goodbye
            while True:
                event = conn.recv(120)
                assert event.type != "EngineError", event
                assert not job_ended(event), "the run ended: the engine was meant to die mid-checkpoint"
                if event.type == "TrainStep":
                    before_kill[event.step] = event.loss
    assert _wait_gone(pid)
    run_dir = workspace / "runs" / "crash"
    torn = run_dir / "checkpoints" / ".tmp-step-20"
    assert (torn / "trainer_state.pt").is_file() and not (run_dir / "checkpoints" / "step-20").exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-10"]  # the last complete one
    assert sorted(before_kill) == list(range(1, 21))
    assert before_kill == {step: baseline[step] for step in before_kill}  # the engine trains alike
    assert "interrupted" in status_text(workspace)
    # The next engine (in this process: torch is loaded here already) finds the dead one's
    # socket, takes over, and resumes from the last complete checkpoint.
    assert probe_socket(workspace) == "stale"
    running = ThreadedEngine(workspace)
    try:
        conn = EngineConnection.open(workspace)
        assert conn.snapshot.run_status == "interrupted" and conn.snapshot.run_id == "crash"
        conn.hello("tui")
        conn.send(P.StartTraining(config={**settings, "resume_from_checkpoint": "runs/crash"}))
        resynced = conn.wait_for("Snapshot", timeout=60)  # the steps before the checkpoint, from disk
        (started,) = [r for r in resynced.history if r["type"] == "TrainStarted"]
        assert started["start_step"] == 10
        before = [r["step"] for r in resynced.history if r["type"] == "TrainStep"]
        assert before == list(range(1, 11))
        events = events_until(conn, job_ended)
        assert events[-1].state == "done", [e for e in events if e.type == "EngineError"]
        after = {e.step: e.loss for e in events if e.type == "TrainStep"}
        assert sorted(after) == list(range(11, 41))
        # The same data order, RNG state and optimizer state, and on CUDA the same kernels in every
        # process (engine/cuda/compiling.py, keep_compiled_code): exactly the same losses.
        assert after == {step: baseline[step] for step in after}
        records = read_metrics(run_dir)
        assert [r["step"] for r in records if r["type"] == "TrainStep"] == list(range(1, 41))
        # every 10 steps and the last one; the limit keeps the newest two
        assert [p.name for p in list_checkpoints(run_dir)] == ["step-30", "step-40"]
        assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the torn one was cleared
        conn.close()
    finally:
        running.stop()


def test_stale_socket_of_a_killed_engine_is_replaced(workspace):
    ws = Workspace(workspace)
    pid = start_engine(workspace)
    assert ensure_engine(workspace, timeout=20) == pid
    os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid)
    assert ws.socket_path.exists() and ws.read_pid() == pid  # what kill -9 leaves behind
    assert probe_socket(workspace) == "stale" and engine_process(workspace) is None
    with pytest.raises(EngineUnavailable):
        EngineConnection.open(workspace)
    assert "not running" in status_text(workspace)
    conn = connect_or_start(workspace, timeout=20)
    new_pid = conn.snapshot.engine_pid
    assert new_pid != pid and ws.read_pid() == new_pid
    conn.hello("test")
    conn.send(P.Shutdown())
    conn.close()
    assert _wait_gone(new_pid)


def test_stale_files_with_a_recycled_pid_are_cleaned(workspace):
    ws = Workspace(workspace)
    ws.ensure_state_dir()
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(ws.socket_path))  # bound, never listening, then closed: a dead engine's file
    leftover.close()
    ws.pid_file.write_text(str(os.getppid()))  # a live process that is not an engine
    assert probe_socket(workspace) == "stale" and engine_process(workspace) is None
    assert remove_stale_socket(workspace)
    assert not ws.socket_path.exists() and not ws.pid_file.exists()


def test_one_engine_per_workspace(engine, workspace):
    with pytest.raises(EngineAlreadyRunning):
        asyncio.run(EngineServer(workspace).start())
    second = subprocess.run(
        [sys.executable, "-m", "tunebench.engine.cli.main", "engine", "--workspace", str(workspace)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 3 and "already" in second.stderr
    assert probe_socket(workspace) == "live"  # the first one still serves


# ====================================================================== workspace on disk


def test_deep_workspace_gets_a_short_private_socket(tmp_path):
    deep = tmp_path.joinpath(*["a-long-folder-name"] * 6)
    ws = Workspace(deep)
    assert len(str(ws.state_dir / "engine.sock")) > 100
    assert len(str(ws.socket_path)) <= 100 and ws.socket_path.parent != ws.state_dir
    running = ThreadedEngine(deep)
    try:
        assert stat.S_IMODE(ws.socket_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(ws.socket_path.parent.stat().st_mode) == 0o700
        with connect(deep) as conn:
            assert conn.snapshot.workspace == str(ws.root)
    finally:
        running.stop()
    assert not ws.socket_path.exists()


def test_settings_are_written_atomically_and_errors_name_the_file(tmp_path):
    ws = Workspace(tmp_path / "ws")
    assert ws.read_settings() == {}
    ws.write_settings({"train": {"model": "demo", "lora_rank": 8, "dataset": ["a.jsonl#5"], "unset": None}})
    assert ws.read_settings() == {"train": {"model": "demo", "lora_rank": 8, "dataset": ["a.jsonl#5"]}}
    ws.write_settings({"train": {"model": "other"}})
    assert ws.read_settings()["train"]["model"] == "other"
    assert [p.name for p in ws.root.iterdir()] == ["tunebench.toml"]  # no temporary files left
    ws.settings_file.write_text("[train\nmodel = 'x'\n")
    with pytest.raises(UserError, match="tunebench.toml") as info:
        ws.read_settings()
    assert "line 1" in str(info.value) and info.value.hint


def test_interrupted_run_on_disk_reads_back(tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    run = ws.runs_dir / "20250101-000000"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "checkpoints" / "step-2" / "trainer_state.pt").write_bytes(b"x")
    (run / "checkpoints" / ".tmp-step-4").mkdir()  # a checkpoint the kill interrupted
    (run / "config.json").write_text(
        json.dumps({"config": {"model": "demo"}, "command": "tunebench train --x 1"})
    )
    lines = [
        orjson.dumps(P.TrainStep(step=s, total_steps=10, loss=3.0 - s / 10).to_dict()) for s in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines) + b'\n{"type": "TrainStep", "ste')
    info = ws.last_run()
    assert info.run_id == run.name and info.status == "interrupted"
    assert info.steps == 3 and info.total_steps == 10 and info.losses[-1] == (3, 2.7)
    assert [p.name for p in info.checkpoints] == ["step-2"]
    text = status_text(ws.root)
    assert "interrupted" in text and "3/10" in text and "--resume_from_checkpoint" in text
    assert "tunebench train --x 1" in text


def test_an_engine_with_no_client_and_no_job_exits_to_free_memory(workspace):
    running = ThreadedEngine(workspace, idle_exit=1.0)
    with connect(workspace):
        time.sleep(1.5)  # a connected client keeps it alive past the idle limit
        assert running.thread.is_alive()
    running.thread.join(10)
    assert not running.thread.is_alive() and running.error is None
    assert probe_socket(workspace) != "live"
    assert not (workspace / ".tunebench" / "engine.sock").exists()


def test_tunebench_stop_shuts_down_an_engine_that_another_client_controls(workspace, capsys):
    from tunebench.engine.cli.main import main as cli_main

    running = ThreadedEngine(workspace)
    with connect(workspace, "tui"):  # the TUI holds the controller slot
        assert cli_main(["stop", str(workspace)]) == 0
    running.thread.join(10)
    assert not running.thread.is_alive() and running.error is None
    assert "stopped" in capsys.readouterr().out
    assert cli_main(["stop", str(workspace)]) == 0
    assert "no engine is running" in capsys.readouterr().out


STUCK_ENGINE = """
import sys
from tunebench.engine.process import server

# An engine whose job never ends, whatever it is asked: Shutdown and SIGTERM both do nothing.
server.EngineServer._begin_shutdown = lambda self, mode="graceful": None
sys.exit(server.serve(sys.argv[1]))
"""


def test_tunebench_stop_ends_an_engine_that_does_not_stop_and_says_so(workspace, tmp_path):
    from tunebench.engine.process.client import stop_engine

    script = tmp_path / "tunebench_stuck_engine.py"  # "tunebench" in its command line, as an engine's
    script.write_text(STUCK_ENGINE)
    proc = subprocess.Popen([sys.executable, str(script), str(workspace)], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while probe_socket(workspace) != "live":
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        said: list[str] = []
        text = stop_engine(workspace, timeout=1, term_wait=1, say=said.append)
        assert proc.wait(10) == -signal.SIGKILL
        assert "did not stop within 1s" in text and "killed (SIGKILL)" in text, text
        assert any("SIGTERM" in line for line in said), said
        assert probe_socket(workspace) == "missing" and engine_process(workspace) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_status_finds_headless_runs_in_mss_swifts_output_folder_and_a_folder_of_runs(tmp_path):
    """After `tunebench train ... --output_dir output`, `tunebench status` and `tunebench status
    output` said 'runs none yet': a headless run records no last run in the workspace. A model's
    folder beside them (config.json, no metrics.jsonl) is not taken for a run."""
    run = tmp_path / "output" / "20261205-120000"
    run.mkdir(parents=True)
    records = [P.TrainStep(step=s, total_steps=3, loss=2.0 / s, lr=1e-4) for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(r.to_dict()) + b"\n" for r in records))
    model = tmp_path / "output" / "Qwen2.5-0.5B-Instruct"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for folder in (tmp_path, tmp_path / "output"):
        text = status_text(folder)
        assert "20261205-120000" in text and "3/3" in text, text
        assert "Qwen2.5" not in text
