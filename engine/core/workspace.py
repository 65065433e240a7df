"""The workspace on disk: where settings, datasets, runs, exports and the engine's socket live.

    <workspace>/
      tunebench.toml            last form values, written atomically
      datasets/ runs/ exports/  what a person makes (see DESIGN.md)
      .tunebench/               the engine's own files, mode 0700
        engine.sock             Unix socket (0600); the engine listens here, never on TCP
        engine.pid              pid of the engine serving this workspace
        engine.lock             held (flock) by that engine for its whole life
        engine.log              the engine's stdout/stderr and tracebacks
        last_run                path of the run the engine last trained

Standard library, orjson and tomli_w only: the TUI, the CLI and the engine all import this.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .errors import UserError
from .files import atomic_write_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STATE_DIR = ".tunebench"
SETTINGS_FILE = "tunebench.toml"
CHECKPOINT_STATE_FILE = "trainer_state.pt"  # what marks a checkpoint complete (engine/train/checkpoints.py)
# With no client and no job for this long, the engine exits and gives back the memory its loaded
# models hold; coming back to the TUI within it reattaches to the warm engine.
ENGINE_IDLE_EXIT_S = float(os.environ.get("TUNEBENCH_ENGINE_IDLE_S", 15 * 60))
# sun_path holds 108 bytes on Linux (104 on macOS); past this a socket path cannot be bound.
MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    # ------------------------------------------------------------ layout
    @property
    def settings_file(self) -> Path:
        return self.root / SETTINGS_FILE

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "engine.pid"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "engine.lock"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "engine.log"

    @property
    def last_run_file(self) -> Path:
        return self.state_dir / "last_run"

    @property
    def socket_path(self) -> Path:
        """`.tunebench/engine.sock`, or for a workspace too deep for a socket path, a private
        per-user folder under the temp dir named by a hash of the workspace path."""
        path = self.state_dir / "engine.sock"
        if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
            return path
        digest = hashlib.sha1(os.fsencode(self.root)).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"tunebench-{os.getuid()}" / f"{digest}.sock"

    def is_workspace(self) -> bool:
        """True once TuneBench has opened this folder (its settings or state folder is there)."""
        return self.settings_file.exists() or self.state_dir.is_dir()

    def parts_to_create(self) -> list[str]:
        """What opening this folder as a workspace adds to it (ensure() and the settings file)."""
        parts = [self.datasets_dir, self.runs_dir, self.exports_dir, self.state_dir]
        named = [f"{p.name}/" for p in parts if not p.exists()]
        return named + ([self.settings_file.name] if not self.settings_file.exists() else [])

    def ensure(self) -> Workspace:
        """Create the workspace folders; the engine's state folder is private (0700)."""
        for folder in (self.root, self.datasets_dir, self.runs_dir, self.exports_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.ensure_state_dir()
        return self

    def ensure_state_dir(self) -> None:
        _private_dir(self.state_dir)
        if self.socket_path.parent != self.state_dir:
            _private_dir(self.socket_path.parent)

    def resolve(self, path: str) -> str:
        """A path typed relative to the workspace, made absolute; absolute ones are kept."""
        if not path:
            return path
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else self.root / p)

    # ------------------------------------------------------------ engine files
    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------ settings
    def read_settings(self) -> dict[str, Any]:
        """tunebench.toml as a dict; {} when there is none. A broken file is a UserError."""
        try:
            text = self.settings_file.read_bytes().decode("utf-8-sig")
        except FileNotFoundError:
            return {}
        except UnicodeDecodeError:
            raise UserError(
                f"{self.settings_file} is not UTF-8 text",
                "fix or delete it; TuneBench writes it again from the parameter form",
                code="config",
            ) from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(
                f"{self.settings_file}: {exc}",
                "fix that line, or delete the file; TuneBench writes it again from the parameter form",
                code="config",
            ) from None

    def write_settings(self, settings: dict[str, Any]) -> None:
        """Write tunebench.toml atomically (None values are dropped: TOML has no null)."""
        import tomli_w

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.settings_file, tomli_w.dumps(_drop_none(settings)).encode())

    # ------------------------------------------------------------ runs
    def run_dirs(self) -> list[Path]:
        """Every run folder in runs/ (and in the last run's folder's parent, for a custom
        output_dir), oldest activity first. A headless `tunebench train` records no last run, so
        the runs of ms-swift's `--output_dir output`, and a folder of runs named itself
        (`tunebench status output`), are found too: there only by their metrics.jsonl, since a
        model's folder holds a config.json as well."""
        parents = {self.runs_dir}
        last = self._recorded_last_run()
        if last is not None:
            parents.add(last.parent)
        found = {
            p.resolve()
            for parent in parents
            if parent.is_dir()
            for p in parent.iterdir()
            if p.is_dir() and ((p / "config.json").is_file() or (p / "metrics.jsonl").is_file())
        }
        found |= {
            p.resolve()
            for parent in (self.root, self.root / "output")
            if parent.is_dir()
            for p in parent.iterdir()
            if p.is_dir() and (p / "metrics.jsonl").is_file()
        }
        return sorted(found, key=_last_activity)

    def last_run(self) -> RunInfo | None:
        """The run the engine trained last, else the run with the newest activity."""
        last = self._recorded_last_run()
        if last is not None and last.is_dir():
            return read_run(last)
        dirs = self.run_dirs()
        return read_run(dirs[-1]) if dirs else None

    def record_last_run(self, run_dir: str | Path) -> None:
        self.ensure_state_dir()
        atomic_write_bytes(self.last_run_file, str(Path(run_dir).resolve()).encode())

    def _recorded_last_run(self) -> Path | None:
        try:
            text = self.last_run_file.read_text().strip()
        except OSError:
            return None
        return Path(text) if text else None


# ---------------------------------------------------------------- run folders


@dataclass
class RunInfo:
    """What a run folder says about itself, read without torch."""

    run_id: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)  # the resolved TrainConfig
    command: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, in order
    # "completed" / "stopped" / "aborted" / "failed" from the run's TrainFinished record, or
    # "interrupted" when there is none (the engine died, or the run is still going)
    status: str = "interrupted"
    steps: int = 0
    total_steps: int = 0
    last_loss: float | None = None
    last_eval_loss: float | None = None
    eta_s: float = 0.0
    tokens_per_s: float = 0.0
    checkpoints: list[Path] = field(default_factory=list)
    adapter_dir: Path | None = None

    @property
    def losses(self) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in self.records if r.get("type") == "TrainStep"]

    def apply_records(self, records: list[dict[str, Any]]) -> None:
        """Take step, loss and status from event records (metrics.jsonl, or a Snapshot's history)."""
        self.records = list(records)
        for record in records:
            kind = record.get("type")
            if kind == "TrainStarted":
                self.total_steps = record.get("total_steps") or self.total_steps
                self.command = record.get("command") or self.command
            elif kind == "TrainStep":
                self.steps = record.get("step", self.steps)
                self.total_steps = record.get("total_steps", self.total_steps)
                self.last_loss = record.get("loss")
                self.eta_s = record.get("eta_s") or 0.0
                self.tokens_per_s = record.get("tokens_per_s") or 0.0
            elif kind == "EvalResult":
                self.last_eval_loss = record.get("eval_loss")
            elif kind == "TrainFinished":
                self.status = record.get("status") or "completed"
                self.steps = record.get("steps", self.steps)


def read_run(run_dir: str | Path) -> RunInfo:
    run_dir = Path(run_dir)
    info = RunInfo(run_id=run_dir.name, path=run_dir)
    try:
        meta = orjson.loads((run_dir / "config.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        meta = {}
    if isinstance(meta, dict):
        info.config = meta.get("config") or {}
        info.command = meta.get("command") or ""
    info.apply_records(read_metrics(run_dir))
    info.checkpoints = list_checkpoints(run_dir)
    if info.checkpoints and not info.steps:
        info.steps = checkpoint_step(info.checkpoints[-1]) or 0
    adapter = run_dir / "adapter"
    info.adapter_dir = adapter if (adapter / "adapter_config.json").is_file() else None
    return info


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl. A line the writer had not finished when it was
    killed (the usual last line after a crash), or any other broken line, is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        data = path.read_bytes()
    except OSError:
        return []
    records = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def list_checkpoints(run_dir: str | Path, holding: Sequence[str] = (CHECKPOINT_STATE_FILE,)) -> list[Path]:
    """The run's `checkpoints/step-<n>` folders that hold every file in `holding`, oldest first.

    By default those training can resume from: a checkpoint is written under a temporary name and
    renamed, and its state file last, so half-written ones never count. With the adapter's files
    (targets.ADAPTER_FILES), those chat and export can load.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.glob("step-*")
        if checkpoint_step(p) is not None and all((p / name).is_file() for name in holding)
    ]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def checkpoint_step(path: str | Path) -> int | None:
    """The step a `step-<n>` checkpoint folder was saved at; None for any other name."""
    digits = Path(path).name.removeprefix("step-")
    return int(digits) if digits != Path(path).name and digits.isascii() and digits.isdigit() else None


def _last_activity(run_dir: Path) -> float:
    times = [run_dir.stat().st_mtime]
    for name in ("metrics.jsonl", "config.json"):
        try:
            times.append((run_dir / name).stat().st_mtime)
        except OSError:
            pass
    return max(times)


# ---------------------------------------------------------------- files


def _private_dir(path: Path) -> None:
    """A folder only this user can enter: the socket's real protection against other users."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise UserError(
            f"{path} belongs to another user",
            "run TuneBench as the user who owns the workspace, or use another workspace",
            code="config",
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value if v is not None]
    if isinstance(value, Path):
        return str(value)
    return value
