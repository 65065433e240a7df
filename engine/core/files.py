"""Durable file writing: what a person made (a dataset, a run, their settings) is never lost or
left half-written by a crash, a full disk or a power loss.

A file is written to a temporary name beside it, fsynced, then renamed over the old one, so a
reader (or the next start after a crash) finds the old version or the new one, never part of
one. The rename itself is on disk only once its folder is fsynced as well (`sync_dir`).

Standard library only: the TUI, the CLI and the engine all import this.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import UserError


def atomic_write_bytes(
    path: str | Path,
    data: bytes | Iterable[bytes],
    *,
    keep_backup: bool = False,
    sync_dir: bool = False,
    before_replace: Callable[[], None] | None = None,
) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`.

    data: the bytes, or pieces of them written in turn (a large file need not be joined in
    memory first). keep_backup: the version being replaced stays as `<name>.bak` (it stays at
    `path` until the rename, so no moment is without one). sync_dir: fsync the folder after the
    rename, so the new version survives a power loss rather than only a crash of this process.
    before_replace: called once the new version is on disk, just before the rename (to record
    what is about to land). The file keeps its permission bits; a new one gets those of the
    umask. On any failure the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            for piece in (data,) if isinstance(data, bytes) else data:
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else new_file_mode())
        if keep_backup and path.exists():
            _backup(path, path.with_name(path.name + ".bak"))
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a write through the file object names no file otherwise
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


def follow_umask(folder: str | Path) -> None:
    """Give the files in `folder` the mode of a new file under the umask (new_file_mode): a
    library may write its own (safetensors' save_file makes 0600, which other users of a shared
    box could not load), where every other file of a run follows the umask."""
    mode = new_file_mode()
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


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


# ======================================================== failed writes


class DiskWriteError(UserError):
    """A write refused by the disk, the file size limit or the permissions: the person's to fix."""

    code = "disk"


_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file would pass this process's file size limit",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}
# safetensors (Rust) reports "I/O error: File too large (os error 27)"
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")
# torch.save's stream writer drops the OS error and says only "[enforce fail at inline_container.cc...]"
_TORCH_WRITE_FAILED = "inline_container.cc"


def write_failure(exc: BaseException, path: str | Path | None) -> DiskWriteError | None:
    """`exc` as a message that names the file, why and the space left there, if it is a write
    the disk, the file size limit or the permissions refused; None for any other error."""
    code = exc.errno if isinstance(exc, OSError) else None
    text = str(exc)
    found = _OS_ERROR_CODE.search(text)
    if code is None and found:
        code = int(found.group(1))
    lost_reason = code is None and _TORCH_WRITE_FAILED in text
    if lost_reason:  # a set file size limit is the likely cause; else say what the disk has left
        code = errno.EFBIG if file_size_limit() is not None else errno.ENOSPC
    if code not in _REASONS:
        return None
    named = path if path is not None else getattr(exc, "filename", None)
    path = Path(named) if named else Path.cwd() / "?"
    # the space left explains a full disk or a quota, and only confuses a refused permission
    left = space_left(path) if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
    what = f"could not write {path}" if named else "a write failed"
    reason = (
        "the disk refused the write (full, or a quota)"
        if lost_reason and code == errno.ENOSPC
        else _REASONS[code]
    )
    message = f"{what}: {reason}" + (f" ({left})" if left else "")
    if code == errno.EFBIG:
        limit = file_size_limit()
        hint = (
            f"raise the file size limit (`ulimit -f`; now {_size(limit)})"
            if limit
            else "raise the file size limit"
        ) + ", or make the file smaller"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        hint = "free space on that disk, or write to another one (--output_dir)"
    else:
        place = path if path.is_dir() else path.parent  # a folder being filled, or a new file's folder
        hint = f"make {place} writable for you, or write somewhere else (--output_dir)"
    return DiskWriteError(message, hint + "; what was already saved is kept")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failed write of `path` (by any library: torch, safetensors, open) into a
    DiskWriteError that names it; every other error passes as it is."""
    try:
        yield
    except Exception as exc:
        failure = write_failure(exc, path)
        if failure is None:
            raise
        raise failure from exc


# ======================================================== failed reads


class UnreadablePathError(UserError):
    """A path a folder's permissions keep this process from: the person's to fix."""

    code = "permission"


_PERMISSION = (errno.EACCES, errno.EPERM)


def read_failure(
    exc: BaseException, path: str | Path | None = None, flag: str = "", action: str = "read"
) -> UnreadablePathError | None:
    """`exc` as "cannot read <path>: permission denied on <folder>" when the permissions keep this
    process from reading `path` (or the file `exc` names): its folder cannot be entered, or the
    file itself is not readable; None for any other error, a refused write included. `action`
    words what the refusal keeps from happening ("write into" for a folder runs go into)."""
    if not isinstance(exc, OSError) or exc.errno not in _PERMISSION:
        return None
    named = path if path is not None else exc.filename
    if not named:
        return None
    target = Path(os.fsdecode(named)).expanduser().absolute()
    folder = _blocking_folder(target)
    if folder is None:
        return None  # every folder on the way can be entered: a write was refused, not a read
    where = f"{flag}: " if flag else ""
    return UnreadablePathError(
        f"{where}cannot {action} {target}: permission denied on {folder}",
        f"check its permissions (`ls -ld {folder}`), or choose another path",
    )


def _blocking_folder(path: Path) -> Path | None:
    """The folder (or the file itself) whose permissions keep `path` from being read: the last
    one that can be looked at on the way down, or `path` when it is there but not readable;
    None when nothing on the way is refused."""
    reached = Path(path.anchor)
    for part in path.parts[1:]:
        step = reached / part
        try:
            step.stat()
        except PermissionError:
            return reached
        except OSError:
            return None  # missing: the read failure, if any, says so itself
        reached = step
    return None if os.access(path, os.R_OK) else path


@contextlib.contextmanager
def reading(path: str | Path | None = None, flag: str = "", action: str = "read") -> Iterator[None]:
    """Turn a PermissionError met while checking or reading `path` (a dataset, a model, a run;
    Python 3.11's Path.exists raises it for a folder that cannot be entered) into a message that
    names the path, the folder that refused and what to do; every other error passes as it is."""
    try:
        yield
    except PermissionError as exc:
        failure = read_failure(exc, path, flag, action)
        if failure is None:
            raise
        raise failure from None


WRITE_CHECK_PREFIX = ".tunebench-write-check-"


def next_free(path: Path) -> Path:
    """`path`, or path-2, path-3 ... when it exists: a default run or export folder never lands
    in one made before (two runs started in the same second, a second export of one run)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def check_writable(folder: str | Path, flag: str = "") -> None:
    """DiskWriteError when no file can be made in `folder` (or, while it does not exist, in the
    nearest folder above it, where it will be made): a file is created there and removed at once,
    so a refusal is said in a second rather than after the model has loaded. A file in the way
    (the folder itself, or one above it) is a UserError that names it."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not os.path.isdir(existing) and existing != existing.parent:
        if os.path.lexists(existing):  # a file where a folder must be: no write gets past it
            where = f"{flag}: " if flag else ""
            what = "not a folder" if existing == folder else f"so the folder {folder} cannot be made"
            raise UserError(
                f"{where}{existing} is a file, {what}",
                f"choose another {flag or 'folder'}, or move the file {existing} away",
            )
        existing = existing.parent
    try:
        fd, name = tempfile.mkstemp(prefix=WRITE_CHECK_PREFIX, dir=existing)
    except OSError as exc:
        reason = _REASONS.get(exc.errno or 0) if exc.errno != errno.EFBIG else None
        if reason is None:
            return  # not a refusal this can word: the write itself says what is wrong
        where = f"{flag}: " if flag else ""
        what = f"cannot write into {folder}" if existing == folder else f"cannot create {folder}"
        on = f" on {existing}" if existing != folder else ""
        other = f"choose another {flag}" if flag else "choose another folder"
        hint = (
            f"make {existing} writable for you (`ls -ld {existing}`), or {other}"
            if exc.errno in _PERMISSION
            else other
        )
        raise DiskWriteError(f"{where}{what}: {reason}{on}", hint) from None
    os.close(fd)
    os.unlink(name)


def access_failure(exc: BaseException) -> UserError | None:
    """A read or write the permissions, the disk or the file size limit refused, worded for the
    person (read failures are told apart from writes); None for any other error."""
    return read_failure(exc) or write_failure(exc, None)


def space_left(path: str | Path) -> str:
    """ "1.2 GiB free on /data" for the disk holding `path` (or its nearest existing folder); ""
    when it cannot be told. Never raises: it words another error."""
    folder = Path(path).absolute()
    # os.path.exists, not Path.exists: a folder that cannot be entered reads as missing, no error
    while not os.path.exists(folder) and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return ""
    return f"{_size(usage.free)} free on {folder}"


def file_size_limit() -> int | None:
    """This process's file size limit in bytes (RLIMIT_FSIZE), None when there is none."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _size(n_bytes: float) -> str:
    if n_bytes < 1024:
        return f"{n_bytes:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n_bytes /= 1024
        if n_bytes < 1024 or unit == "TiB":
            break
    return f"{n_bytes:.1f} {unit}"
