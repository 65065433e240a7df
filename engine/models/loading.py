"""Finding and loading base models: demo, local folders, cached hub ids and GGUF files, offline.

Every model ends up as a local folder with config.json, safetensors weights and a tokenizer.
GGUF files (the built-in demo included) are converted once into such a folder under the user
cache, so later loads are a plain safetensors read. Where the files are is core/model_files.py's
to say (torch-free: the TUI asks it too).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ModelError, UserError, raise_if_cancelled
from ..core.model_files import (
    DEMO_NAME,
    ResolvedModel,
    check_model_folder,
    conversion_target,
    demo_gguf_path,
    from_hub_cache,
    looks_like_hub_id,
)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    resolved: ResolvedModel
    device: Any
    dtype: Any
    seconds: float

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# ----------------------------------------------------------------- resolving


def resolve_model(spec: str) -> ResolvedModel:
    """Map what the user typed to a local model folder, converting GGUF once. No network."""
    spec = spec.strip()
    if spec == DEMO_NAME:
        return ResolvedModel(spec, _converted_gguf(demo_gguf_path(), "smollm2-135m-instruct"), "demo")
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}", "check the path")
        return ResolvedModel(spec, _converted_gguf(path.resolve()), "gguf")
    if path.exists():
        return ResolvedModel(spec, check_model_folder(path.resolve()), "folder")
    if looks_like_hub_id(spec):
        return ResolvedModel(spec, from_hub_cache(spec), "hub")
    raise ModelError(
        f"model not found: {spec!r} is not a folder, a .gguf file or a hub id",
        "give 'demo', a local Hugging Face model folder, a .gguf file or an id like Qwen/Qwen2.5-7B-Instruct",
    )


def _converted_gguf(gguf: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF file once into a safetensors folder in the cache; reuse it after."""
    target = conversion_target(gguf, name)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp folder beside the target and rename, so a crash never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, use_kernels=False
        )
    except ValueError as exc:
        if "not supported" in str(exc).lower() or "architecture" in str(exc).lower():
            raise ModelError(
                f"{gguf.name}: {exc}",
                "this GGUF architecture cannot be loaded by transformers; use the original "
                "Hugging Face folder of the model instead",
            ) from None
        raise ModelError(
            f"could not read GGUF file {gguf}: {exc}", "check that the file is complete"
        ) from None
    finally:
        hf_logging.enable_progress_bar()
    # The weights are dequantised floats now; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if tokenizer.chat_template and not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(tokenizer.chat_template)
    (out / "tunebench_source.json").write_text(json.dumps({"gguf": str(gguf)}))


# ------------------------------------------------------------------- loading


def pick_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device) -> Any:
    import torch

    if name == "auto":
        # float32 on a CPU even where it multiplies bfloat16 natively: there bfloat16 made greedy
        # answers depend on the batch (a probe of 4 questions, of 1, and plain transformers gave
        # three answers to one question), and the demo model is small enough for float32.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_tokenizer(resolved: ResolvedModel, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"could not load the tokenizer of {resolved.label} from {resolved.path}: {first}",
            "the folder needs tokenizer.json (or the tokenizer files of its model family) beside "
            "config.json; copy them from where the model came from",
        ) from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is always there.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(
    spec: str,
    *,
    torch_dtype: str = "auto",
    quantize_4bit: bool = False,
    trust_remote_code: bool = False,
    device=None,
    cancel: Any = None,
) -> LoadedModel:
    """Load a base model and its tokenizer, ready for LoRA or inference. Once `cancel` (a
    threading.Event) is set, errors.Cancelled ends the load at its next torch call."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    resolved = resolve_model(spec)
    device = device or pick_device()
    dtype = resolve_dtype(torch_dtype, device)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
        # Where the `kernels` package is installed, transformers swaps layers for kernels fetched
        # from the hub by default: code from the network on a GPU box, and an error offline.
        # Models load as they are; the training path brings its own kernels.
        "use_kernels": False,
    }
    if quantize_4bit:
        kwargs["quantization_config"] = _nf4_config(device, dtype)
        kwargs["device_map"] = {"": device.index or 0}
    tokenizer = load_tokenizer(resolved, trust_remote_code)
    hf_logging.disable_progress_bar()
    try:
        with _cancellable(cancel):
            model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
            if not quantize_4bit:
                model.to(device)
    except torch.cuda.OutOfMemoryError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"could not load {resolved.label} from {resolved.path}: {exc}",
            "check that the folder holds a complete causal language model",
        ) from None
    finally:
        hf_logging.enable_progress_bar()
    model.config.use_cache = False
    return LoadedModel(model, tokenizer, resolved, device, dtype, time.perf_counter() - started)


def _cancellable(cancel: Any):
    """A context in which every torch call of this thread checks `cancel` first: from_pretrained
    has no hook of its own, and a 7B load from a slow disk takes minutes that an abort must not
    wait for. Nothing for `cancel` None (work that cannot be stopped)."""
    import contextlib

    from torch.overrides import TorchFunctionMode

    if cancel is None:
        return contextlib.nullcontext()

    class CheckCancel(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            raise_if_cancelled(cancel)
            return func(*args, **(kwargs or {}))

    return CheckCancel()


def check_qlora_possible(device=None) -> None:
    """Raise the user's error when 4-bit QLoRA cannot run here (no CUDA, no bitsandbytes)."""
    device = device or pick_device()
    if device.type != "cuda":
        raise UserError(
            "--train_type qlora: QLoRA needs an NVIDIA GPU with CUDA, and bitsandbytes' 4-bit "
            "kernels do not run on this machine",
            "use --train_type lora here, or run on a CUDA machine",
            code="config",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "--train_type qlora: QLoRA needs the bitsandbytes package",
            "pip install bitsandbytes",
            code="config",
        )


def _nf4_config(device, compute_dtype):
    check_qlora_possible(device)
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype if compute_dtype != torch.float32 else torch.bfloat16,
    )


def linear_module_names(model) -> list[str]:
    """Names (last component) of the linear layers LoRA can target, the output head excluded."""
    import torch

    names = set()
    output = model.get_output_embeddings()
    for full_name, module in model.named_modules():
        if module is output:
            continue
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in (
            "Linear4bit",
            "Linear8bitLt",
        )
        if is_linear:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def linear_module_names_of(path: Path, trust_remote_code: bool = False) -> list[str] | None:
    """linear_module_names for the model in `path`, built on the meta device from its config:
    no weights are read, so a bad --target_modules is caught in well under a second instead of
    after a full load. None when the architecture cannot be built that way (then the check
    happens after loading)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - only a shortcut; the load reports real problems
        return None
    return linear_module_names(model)
