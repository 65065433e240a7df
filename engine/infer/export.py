"""Exporting a fine-tune: the adapter merged into its base as a standalone model, or the adapter alone.

A merged export is a plain Hugging Face folder (safetensors, tokenizer, the chat template the run
trained with and its system prompt as the default, a generation config that stops at the end of a
turn) that loads with
`AutoModelForCausalLM.from_pretrained` and answers exactly as base + adapter do, plus an Ollama
`Modelfile` carrying the same chat template and system prompt. With `quant_bits` it is one
`model.gguf` instead (gguf_file.py: F16, Q8_0, or Q4_K_M through llama.cpp), for llama.cpp and
Ollama. Before it finishes, the trained, the exported and the Modelfile's templates must render the
same conversations alike (template_check.py). The folder is built under a temporary name and
renamed at the end, so an interrupted or refused export never leaves half a model.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from ..core.errors import UserError
from ..core.files import check_writable, follow_umask
from ..core.targets import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Target,
    adapters_base,
    check_trained_on,
    recorded_base_model,
    resolve_target,
)
from ..core.templates import with_default_system
from .gguf_file import GGUF_TYPES, find_quantizer
from .prompts import stop_token_ids

Progress = Callable[[str], None]
INFO_FILE = "tunebench_export.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}


def export_model(
    adapter: str,
    output_dir: str,
    merge: bool = True,
    on_progress: Progress | None = None,
    *,
    model: str | None = None,
    torch_dtype: str = "auto",
    quant_bits: int = 0,
) -> Path:
    """Write the merged model (or, with merge=False, a copy of the adapter) to output_dir.

    `adapter` is a run folder, adapter folder or checkpoint folder; its run's config.json names
    the base model, the chat template and the system prompt (`model` overrides the base).
    `torch_dtype` "auto" merges in bfloat16 on a GPU box and for QLoRA adapters, else in the
    dtype the base was saved in. `quant_bits` 16, 8 or 4 writes the merged model as model.gguf
    in F16, Q8_0 or Q4_K_M (gguf_file.GGUF_TYPES); 0 as safetensors.
    """
    say = on_progress or (lambda _message: None)
    target = resolve_target(adapter)
    assert target.adapter_dir is not None
    out = Path(output_dir).expanduser().resolve()
    _check_output_dir(out)
    if quant_bits and GGUF_TYPES[quant_bits] == "Q4_K_M":
        find_quantizer()  # before the load and the merge, minutes on a 7B
    if merge:
        base = base_model_of([target], model or "")  # refused here, before any weights load
    else:  # the base need not be on this machine to copy an adapter
        base = model or recorded_base_model(target.run, target.adapter_dir) or ""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if merge:
            info = _merged_export(target, base, tmp, say, torch_dtype, quant_bits, out.name)
        else:
            info = _copy_adapter(target, base, tmp, say)
        info.update(
            adapter=str(target.adapter_dir),
            run_id=target.run.get("run_id", ""),
            command=target.run.get("command", ""),
            created=datetime.now().isoformat(timespec="seconds"),
        )
        (tmp / INFO_FILE).write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
        follow_umask(tmp)  # a server running as another user (Ollama's, vLLM's) reads them
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"exported to {out}")
    return out


def base_model_of(targets: list[Target], model: str = "") -> str:
    """The base model to load for `targets`, checked to be on this machine before any weights load:
    the one their runs recorded (core/targets.adapters_base, which refuses adapters of different
    bases). `model` (--model) overrides that, but may not name another base than one a run
    recorded and that is still here."""
    from ..models.loading import resolve_model

    adapters = [t for t in targets if not t.is_base]
    if model:
        resolved = resolve_model(model)
        named = model if Path(model).expanduser().exists() else f"{model} ({resolved.path})"
        for target in adapters:
            check_trained_on(target, resolved.path, named)
        return model
    recorded = adapters_base(adapters)
    if adapters and recorded is None:
        raise UserError(
            f"cannot tell which base model {adapters[0].adapter_dir} was trained on: "
            "no run config.json next to it",
            "pass the base model with --model",
        )
    base = recorded or "demo"
    try:
        resolve_model(base)
    except UserError as exc:
        raise UserError(
            f"the base model the run recorded is not usable here: {exc.message}",
            "if it moved, pass its new location with --model",
        ) from None
    return base


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file", "give a folder path (it is created)")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(
            f"--output_dir {out} already exists and is not empty; nothing was overwritten",
            "choose another --output_dir, or delete that folder first",
        )
    # The export is written beside it and renamed into place: said now, not after minutes of merge.
    check_writable(out.parent, "--output_dir")


# ===================================================================== merged


GGUF_FILE = "model.gguf"


def _merged_export(
    target: Target, base: str, out: Path, say: Progress, torch_dtype: str, quant_bits: int, name: str
) -> dict[str, Any]:
    """The merged model in `out` (safetensors, or model.gguf from a merged folder beside it), its
    Modelfile, and the three templates checked to render alike."""
    from .template_check import FIXED_CONVERSATIONS, Conversation, check_templates, run_conversations

    folder = out / ".merged" if quant_bits else out
    info, serving = _merge(target, base, folder, say, torch_dtype)
    if quant_bits:
        from .gguf_file import write_gguf

        info["gguf"] = write_gguf(folder, out / GGUF_FILE, quant_bits, name, say)
        info["file"] = GGUF_FILE
        exported = gguf_chat_template(out / GGUF_FILE)
        shutil.rmtree(folder)
    else:
        from transformers import AutoTokenizer

        exported = AutoTokenizer.from_pretrained(out).chat_template
    modelfile = ollama_modelfile(
        f"./{GGUF_FILE}" if quant_bits else ".", serving.template, serving.system, serving.stops
    )
    (out / "Modelfile").write_text(modelfile)
    conversations = [Conversation(c, "fixed") for c in FIXED_CONVERSATIONS]
    conversations += run_conversations(target.train_config, say)
    check_templates(
        serving.tokenizer,
        serving.trained,
        serving.run_system,
        exported or "",
        _modelfile_block(modelfile, "TEMPLATE"),
        _modelfile_block(modelfile, "SYSTEM") or "",
        conversations,
        say,
    )
    return info


def gguf_chat_template(path: Path) -> str:
    """The chat template a GGUF file carries (tokenizer.chat_template), or ""."""
    import gguf

    field = gguf.GGUFReader(str(path)).get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    return field.contents() if field is not None else ""


def _modelfile_block(modelfile: str, keyword: str) -> str | None:
    """A Modelfile's TEMPLATE or SYSTEM (as ollama_modelfile writes them), or None."""
    match = re.search(rf'^{keyword} """(.*?)"""$', modelfile, re.S | re.M)
    return match.group(1) if match else None


@dataclass
class _Serving:
    """What the Modelfile and the template check need from a merge."""

    tokenizer: Any
    trained: str  # the Jinja template the run trained with
    run_system: str
    template: str  # the exported one: trained, with the run's system prompt as its default
    system: str
    stops: list[str]


def _merge(
    target: Target, base: str, out: Path, say: Progress, torch_dtype: str
) -> tuple[dict[str, Any], _Serving]:
    import torch
    from peft import PeftModel

    from ..models.loading import load_model, resolve_model

    resolved = resolve_model(base)
    qlora = target.train_config.get("train_type") == "qlora" or target.train_config.get("quant_bits") == 4
    dtype = merge_dtype(resolved.path, qlora) if torch_dtype == "auto" else torch_dtype
    need_gib = count_parameters(resolved.path) * (2 if dtype in ("bfloat16", "float16") else 4) / 2**30
    if qlora:
        say(
            f"QLoRA adapter: it merges into the base loaded unquantised in {dtype}, which needs about "
            f"{need_gib:.1f} GiB of CPU memory (the 4-bit weights used in training cannot take the "
            "merged update exactly)"
        )
    free_gib = available_memory_gib()
    if free_gib is not None and free_gib < need_gib * 1.1:
        say(
            f"warning: only {free_gib:.1f} GiB of memory is free and the merge needs about "
            f"{need_gib:.1f} GiB: if it fails, free memory (other programs, an idle engine) and export again"
        )
    say(f"loading {resolved.label} in {dtype} on the CPU ({need_gib:.1f} GiB)")
    # The CPU, not the GPU: the merge is one small matmul per layer, and the GPU may be training.
    loaded = load_model(base, torch_dtype=dtype, device=torch.device("cpu"))
    say(f"merging {target.adapter_dir}")
    try:
        peft_model = PeftModel.from_pretrained(loaded.model, str(target.adapter_dir))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UserError(
            f"could not load the adapter {target.adapter_dir} onto {resolved.label}: "
            f"{str(exc).splitlines()[0][:300]}",
            "an adapter only merges into the base model it was trained on; pass that one with --model",
        ) from None
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaNs instead of saving them
    merged.config.use_cache = True  # load_model turns the cache off for training; inference wants it
    tokenizer = loaded.tokenizer
    # The run's system prompt becomes the template's default, so a chat without one gets what
    # `tunebench chat` gives the adapter (and what the Modelfile's SYSTEM gives Ollama).
    run_system = str(target.train_config.get("system") or "")
    trained = _training_template(tokenizer, target)
    chat_template = with_default_system(trained, run_system)
    tokenizer.chat_template = chat_template
    stops = sorted(stop_token_ids(tokenizer, merged))
    merged.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    say("saving safetensors, tokenizer, chat template and generation config")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        merged.save_pretrained(out, safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)
    if not (out / "chat_template.jinja").exists():  # older transformers keep it in tokenizer_config only
        (out / "chat_template.jinja").write_text(chat_template)
    system = run_system or default_system(tokenizer, chat_template)
    stop_words = [tokenizer.convert_ids_to_tokens(i) for i in stops]
    serving = _Serving(tokenizer, trained, run_system, chat_template, system, stop_words)
    return {
        "merged": True,
        "base_model": base,
        "base_model_path": str(resolved.path),
        "dtype": dtype,
    }, serving


def merge_dtype(model_path: Path, qlora: bool) -> str:
    """bf16 on a GPU box and for QLoRA adapters; elsewhere the dtype the base was saved in."""
    import torch

    if qlora or torch.cuda.is_available():
        return "bfloat16"
    try:
        config = orjson.loads((model_path / "config.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        config = {}
    saved = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return saved if saved in ("bfloat16", "float16", "float32") else "float32"


def available_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def count_parameters(model_path: Path) -> int:
    """Parameters in a folder's safetensors files, read from their headers (no weights loaded)."""
    total = 0
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = orjson.loads(fh.read(length))
        for name, entry in header.items():
            if name == "__metadata__" or entry.get("dtype") not in _DTYPE_BYTES:
                continue
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total


def _training_template(tokenizer: Any, target: Target) -> str:
    """The Jinja chat template the run trained with (its --template, else the tokenizer's own)."""
    from .prompts import chat_template_for

    template = chat_template_for(tokenizer, str(target.train_config.get("template") or ""))
    return template or tokenizer.chat_template


# ===================================================================== adapter only


def _copy_adapter(target: Target, base: str, out: Path, say: Progress) -> dict[str, Any]:
    assert target.adapter_dir is not None
    say(f"copying the adapter {target.adapter_dir}")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(target.adapter_dir / name, out / name)
    base_path, tokenizer = "", None
    try:
        from ..models.loading import load_tokenizer, resolve_model

        if base:
            resolved = resolve_model(base)
            base_path = str(resolved.path)
            tokenizer = load_tokenizer(resolved)
    except UserError:
        pass  # the base is not on this machine: the adapter copy is still useful
    if tokenizer is not None:
        template = _training_template(tokenizer, target)
        system = str(target.train_config.get("system") or "") or default_system(tokenizer, template)
        stops = [tokenizer.convert_ids_to_tokens(i) for i in sorted(stop_token_ids(tokenizer))]
        (out / "Modelfile").write_text(ollama_modelfile(base_path, template, system, stops, adapter="."))
    return {"merged": False, "base_model": base, "base_model_path": base_path}


# ===================================================================== Ollama


def chat_format(template: str) -> str:
    """Which chat format a Jinja template writes: "chatml", "llama3", or "" for others."""
    if "<|im_start|>" in template and "<|im_end|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template and "<|eot_id|>" in template:
        return "llama3"
    return ""


# Ollama passes system messages both as .System (all of them joined) and inside .Messages, so
# these print .System once and skip system entries in the loop; Ollama puts the Modelfile's SYSTEM
# there when a request brings none. A last assistant message is left open, as in Ollama's own
# templates, so a request can start the answer for the model (Jinja's continue_final_message).
# Run through Go's text/template with Ollama's message handling, they print exactly what the Jinja
# templates in templates.py print for system, multi-turn and CJK chats, except that llama.cpp adds
# Llama 3's BOS itself and Go cannot trim the spaces Llama 3's template trims around a message.
OLLAMA_TEMPLATES = {
    "chatml": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}'
        '{{- if or (ne .Role "assistant") (not $last) }}<|im_end|>\n{{ end }}{{ end }}'
        '{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}'
        "{{- end }}"
    ),
    "llama3": (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}'
        '{{- if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}{{ end }}'
        '{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}'
        "{{- end }}"
    ),
}
_DEFAULT_SYSTEM = {
    "chatml": re.compile(r"^<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S),
    "llama3": re.compile(r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S),
}


def default_system(tokenizer: Any, template: str) -> str:
    """The system prompt a template writes when the chat has none (SmolLM's and Qwen's do)."""
    pattern = _DEFAULT_SYSTEM.get(chat_format(template))
    if pattern is None:
        return ""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # noqa: BLE001 - a template that needs more than this: no default to copy
        return ""
    match = pattern.search(text)
    return match.group(1) if match else ""


def ollama_modelfile(source: str, template: str, system: str, stops: list[str], adapter: str = "") -> str:
    """An Ollama Modelfile for the export (`ollama create NAME -f Modelfile` in that folder)."""
    fmt = chat_format(template)
    lines = [
        "# Ollama model definition written by TuneBench; in this folder run:",
        "#   ollama create my-model -f Modelfile",
        f"FROM {source}",
    ]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if fmt:
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATES[fmt]}"""')
    else:
        lines.append(
            "# This chat format has no Ollama template here: Ollama will use the template stored in "
            "the model, if any. Add a TEMPLATE line if answers look unformatted."
        )
    if system:
        lines.append(f'SYSTEM """{system.replace(chr(34) * 3, chr(39) * 3)}"""')
    for stop in dict.fromkeys(stops):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"
