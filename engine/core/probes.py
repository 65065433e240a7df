"""The probe set: which probes.txt a workspace uses, and its questions (torch-free, so the CLI,
the engine and the TUI read one file the same way)."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .sample_data import find_sample_data


def default_probes(workspaces: tuple[Path, ...] = ()) -> Path:
    """The probes.txt of a workspace (the run's, then the current folder), as the TUI uses it, else
    sample_data/probes.txt of the source checkout (installs are editable) or of ./sample_data."""
    samples = find_sample_data()
    candidates = [w / "probes.txt" for w in (*workspaces, Path.cwd())]
    for candidate in [*candidates, *([samples / "probes.txt"] if samples else [])]:
        if candidate.is_file():
            return candidate
    raise UserError("sample_data/probes.txt not found", "pass a file of questions with --probes FILE")


def read_probes(path: Path) -> list[str]:
    """One question per line; blank lines and lines starting with # are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(
            f"probe file not found: {path}", "pass a text file with one question per line"
        ) from None
    except IsADirectoryError:
        raise UserError(
            f"{path} is a folder, not a probe file", "pass a text file with one question per line"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read probe file {path}: {exc}", "save it as UTF-8 text") from None
    questions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not questions:
        raise UserError(f"{path} holds no questions", "write one question per line")
    return questions
