"""A workbench run on several processes: `tunebench train --json` under torchrun, a child of the
engine, its events relayed as the engine's own.

The engine trains one process in its worker thread (jobs.py). A run on several GPUs (or CPU
processes), or on a GPU other than the engine's first, starts the way a person starts it in a
terminal: `tunebench train` with the run's flags (core/config.to_argv), which hands them to
torchrun (engine/train/distributed.py). Rank 0 prints one JSON event per line (--json): the same
TrainStarted, TrainStep (global step, tokens/s of all ranks), Log, CheckpointSaved and
TrainFinished the in-process job emits, so the Train pane, detach and reattach work unchanged.
The engine loads no model for such a job; the ranks hold the GPUs.

Stopping goes to the ranks themselves, not to torchrun's agent (which would give them 30 seconds
and then kill them): a graceful stop is one SIGTERM per rank, which the CLI takes as Ctrl-C (the
ranks agree on the step to stop after, and rank 0 saves a checkpoint); an abort adds a SIGINT,
the CLI's second signal. Ranks still alive ABORT_GRACE_S after an abort are killed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..core import protocol as P
from ..core.config import TrainConfig, to_argv
from ..core.errors import UserError
from ..core.launch import LAUNCH_ENV, WORKER_ENV, gpu_environment

ABORT_GRACE_S = 10.0  # after an abort, what the ranks get to end by themselves
STDERR_KEPT = 30  # lines of the child's stderr kept for a failure that says nothing itself
Emit = Any  # Callable[[P.Event], None]


def train_command(cfg: TrainConfig, nproc: int) -> list[str]:
    """`tunebench train --json` for `cfg` on `nproc` processes: the flags a person would type.
    The gpus setting is resolved by the caller into CUDA_VISIBLE_DEVICES, so it is left out."""
    flags = to_argv(dataclasses.replace(cfg, gpus="", nproc_per_node=nproc), joined=True)
    probe = ["--probe_after", "true"]  # the verdict, as the in-process job gives it
    return [sys.executable, "-m", "tunebench.engine.cli.main", "train", "--json", *probe, *flags]


class RankStopper:
    """What Job.request_stop calls (it takes the place of the recipe's StopSignal): signals to the
    ranks of the child `launcher`."""

    def __init__(self, launcher: subprocess.Popen) -> None:
        self.launcher = launcher
        self.mode = ""
        self._lock = threading.Lock()

    def request(self, mode: str = "graceful") -> None:
        with self._lock:
            if self.mode == "abort" or self.mode == mode:
                return
            self.mode = mode
        if mode == "abort":
            # the last resort runs on its own: the relay blocks on the ranks' output until they end
            watchdog = threading.Timer(ABORT_GRACE_S, self.kill_all)
            watchdog.daemon = True
            watchdog.start()
        ranks = self.ranks()
        if not ranks:  # torchrun has not started them yet: its agent ends what it starts
            with contextlib.suppress(ProcessLookupError):
                self.launcher.send_signal(signal.SIGTERM)
            return
        for rank in ranks:
            with contextlib.suppress(Exception):
                rank.send_signal(signal.SIGTERM)
                if mode == "abort":
                    rank.send_signal(signal.SIGINT)  # a second, different signal: both are seen

    def ranks(self) -> list[Any]:
        """The launcher's children that torchrun started as ranks (its agent has none of its own)."""
        import psutil

        try:
            children = psutil.Process(self.launcher.pid).children()
        except psutil.Error:
            return []
        found = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if all(name in child.environ() for name in WORKER_ENV):
                    found.append(child)
        return found

    def kill_all(self) -> None:
        """The abort's last resort: each rank's process group (torchrun starts each in a session
        of its own, with whatever it spawned) and the launcher."""
        if self.launcher.poll() is not None:
            return
        for rank in self.ranks():
            with contextlib.suppress(OSError):
                os.killpg(rank.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.launcher.kill()


def run_ranks(
    job: Any, cfg: TrainConfig, nproc: int, chosen: list[int], cwd: Path, emit: Emit
) -> P.TrainFinished:
    """Train `cfg` on `nproc` processes (on the `chosen` GPUs, when the machine has GPUs), relaying
    rank 0's events through `emit`; the run's TrainFinished, or UserError with the ranks' failure."""
    started = time.perf_counter()
    # The run's own settings decide, not a launch the engine itself was started under.
    env = {k: v for k, v in os.environ.items() if k not in (*WORKER_ENV, *LAUNCH_ENV)}
    if chosen:
        env.update(gpu_environment(chosen, os.environ))
    where = f"GPU(s) {env['CUDA_VISIBLE_DEVICES']}" if chosen else "this machine"
    how = "torchrun's processes" if nproc > 1 else "a process of its own"
    emit(P.Log(message=f"training on {where} in {how}: {nproc} rank(s), rank 0 reporting"))
    launcher = subprocess.Popen(
        train_command(cfg, nproc),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C meant for the engine's terminal is not the run's
    )
    stopper = RankStopper(launcher)
    job.attach_stop(stopper)
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_KEPT)
    errors = threading.Thread(target=_keep_stderr, args=(launcher.stderr, tail), daemon=True)
    errors.start()
    finished: P.TrainFinished | None = None
    failure: P.EngineError | None = None
    assert launcher.stdout is not None
    for line in launcher.stdout:
        try:
            event = P.decode(line)
        except P.ProtocolError:
            continue  # a library printing to stdout: not an event
        if isinstance(event, P.TrainFinished):
            finished = event  # sent last by the server, after the verdict
        elif isinstance(event, P.EngineError):
            failure = event
        elif isinstance(event, P.Event):
            emit(event)
    launcher.wait()
    errors.join(timeout=5)
    if finished is not None:
        return finished
    if failure is not None and not stopper.mode:
        raise UserError(failure.message, failure.hint, code=failure.code or "internal")
    if stopper.mode:  # stopped before rank 0 said how the run ended (still loading, or killed)
        emit(P.Log(message="the training processes ended before rank 0 said how the run ended"))
        return P.TrainFinished(status="aborted", seconds=round(time.perf_counter() - started, 1))
    said = "\n".join(line for line in tail if line.strip())
    raise UserError(
        f"training on {nproc} processes ended with exit code {launcher.returncode} before it "
        f"finished" + (f"; its last words:\n{said}" if said else ""),
        "the engine log has the processes' whole output; fix what it says and start again",
        code="internal",
    )


def _keep_stderr(stream: Any, tail: collections.deque[str]) -> None:
    """The child's stderr goes on to the engine's (its log, for a started engine); the last lines
    are kept for a failure that printed no message of its own."""
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\n")
        tail.append(line)
        with contextlib.suppress(OSError, ValueError):
            print(line, file=sys.stderr, flush=True)
