"""Who may write a dataset file: one TuneBench at a time, and nobody when the file is read-only.

Two TUIs on one workspace editing one file would each journal and autosave over the other
(issue 14). So the first to open a file holds an OS lock on `.<name>.jsonl.lock` beside it
(`flock`: the kernel drops it when the process ends, kill -9 included, so no stale lock can
outlive its holder). Any other TUI shows that file read-only, follows the holder's saves, and
takes the lock over when the holder leaves.

A file whose mode allows no writing (chmod 0444) is read-only too: an atomic save renames a new
file over it and would quietly undo the person's choice, so nothing writes it until they change it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from tunebench.tui.paths import short_path


def read_only_reason(path: Path, workspace: Path | None = None) -> str:
    """Why `path` must not be written, or "" when it may (a file not made yet may be)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return ""
    # Root may write anything, so the mode bits say what the person meant, not os.access alone.
    if mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) and os.access(path, os.W_OK):
        return ""
    shown = _shown(path, workspace)
    return (
        f"{shown} is read-only (mode {stat.S_IMODE(mode):04o}), so nothing here writes it: "
        f"`chmod u+w {path}` to edit it, or copy it under a new name and open the copy (o)"
    )


class WriterLock:
    """The OS lock that makes one process the writer of a dataset file."""

    def __init__(self, data_path: Path) -> None:
        self.path = data_path.with_name(f".{data_path.name}.lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock unless another process holds it; True when this one holds it now.

        Raises OSError when no lock file can be made there (a folder this user cannot write).
        """
        # A new file's folder may not exist yet: the first save would make it anyway.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                    return True  # a file system without locks: edit as before, unguarded
                raise
            # The holder before us removes the file as it lets go: locking that removed file
            # guards nothing, so take the one now at the path instead.
            if _same_file(fd, self.path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
            else:
                os.close(fd)
        return True

    def release(self) -> None:
        """Let go (and remove the lock file, so a clean exit leaves nothing behind)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it: see acquire()
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def holder(self) -> str:
        """Who holds it, as the lock file says ("pid 1234"), or "" when it does not say."""
        try:
            pid = self.path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return ""
        return f"pid {pid}" if pid.isdigit() else ""


def _shown(path: Path, workspace: Path | None) -> str:
    return short_path(path, workspace) if workspace else str(path)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_path = path.stat()
    except OSError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_path.st_dev, on_path.st_ino)


class WriteAccess:
    """Whether this TUI may write one dataset file now, and if not, what to tell the person."""

    def __init__(self, data_path: Path, workspace: Path | None = None) -> None:
        self.data_path, self.workspace = data_path, workspace
        self.lock = WriterLock(data_path)

    def check(self) -> str:
        """Try for the lock if it is not ours yet; "" when this TUI may write, else why not."""
        shown = _shown(self.data_path, self.workspace)
        try:
            mine = self.lock.acquire()
        except OSError as exc:
            return (
                f"{shown} is read-only here: no lock file can be made beside it "
                f"({exc.strerror or exc}); make {self.data_path.parent} writable to edit it"
            )
        if not mine:
            who = self.lock.holder()
            return (
                f"{shown} is read-only here: another TuneBench{f' ({who})' if who else ''} is editing "
                "it. This one shows its saves, and can edit once that one closes the file"
            )
        return read_only_reason(self.data_path, self.workspace)

    def release(self) -> None:
        self.lock.release()
