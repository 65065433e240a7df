"""Durable file writing: what a person made (a dataset, a run, their settings) is never lost or
left half-written by a crash, a full disk or a power loss.

A file is written to a temporary name beside it, fsynced, then renamed over the old one, so a
reader (or the next start after a crash) finds the old version or the new one, never part of
one. The rename itself is on disk only once its folder is fsynced as well (`sync_dir`).

Standard library only: the TUI, the CLI and the engine all import this.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(
    path: str | Path, data: bytes, *, keep_backup: bool = False, sync_dir: bool = False
) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`.

    keep_backup: the version being replaced stays as `<name>.bak` (it stays at `path` until the
    rename, so no moment is without one). sync_dir: fsync the folder after the rename, so the
    new version survives a power loss rather than only a crash of this process. The file keeps
    its permission bits; a new one gets those of the umask. On any failure the temporary file is
    removed and `path` is untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else new_file_mode())
        if keep_backup and path.exists():
            _backup(path, path.with_name(path.name + ".bak"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def _backup(path: Path, backup: Path) -> None:
    """Point `backup` at the current version; the original stays in place the whole time."""
    staging = backup.with_name(f".{backup.name}.tmp")
    staging.unlink(missing_ok=True)
    try:
        os.link(path, staging)  # instant, and the old contents survive the replace that follows
    except OSError:  # file systems without hard links
        shutil.copy2(path, staging)
    os.replace(staging, backup)


def fsync_dir(folder: str | Path, *, ignore_errors: bool = True) -> None:
    """fsync a folder: a rename in it, or a new file's name, is durable only once this is done.

    With ignore_errors (the default), a folder that cannot be opened or synced (some file
    systems refuse) is skipped; without, the OSError is raised.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        if ignore_errors:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not ignore_errors:
            raise
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """The mode a new file gets under this process's umask (mkstemp's 0600 is only for the
    temporary name): 0644 under the usual 022, 0600 for someone who set 077 on a shared box."""
    return 0o666 & ~_current_umask()


def _current_umask() -> int:
    # Read, not set-and-restore: os.umask() is process-wide and would race other threads.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
