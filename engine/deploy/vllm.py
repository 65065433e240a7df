"""`--infer_backend vllm`: the same deployment handed to vLLM's own OpenAI-compatible server.

For the user who outgrows one process: vLLM's paged KV cache and kernels serve many more streams
per GPU. The command line is built from the same plan as the pt backend, so the served names,
the run's chat template and system prompt, and the defaults (--max_new_tokens, --temperature,
--top_p) are the same; only the process that answers differs. Adapters are served with
`--enable-lora --lora-modules NAME=PATH ...` over the base, or, with --merge_lora true, the
adapter is merged first (tunebench export) and vLLM serves the merged folder.

The API key goes to vLLM through its VLLM_API_KEY variable, not its command line, where any user
of the machine could read it in the process list.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import UserError

# Ranks vLLM accepts for --max-lora-rank; an adapter's rank is rounded up to the next one.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
INSTALL_HINT = (
    "install it where this command runs (pip install vllm; Linux with an NVIDIA GPU), then run the "
    "same command again; or serve with the built-in backend: --infer_backend pt"
)


@dataclass(frozen=True)
class VllmLaunch:
    argv: list[str]
    env: dict[str, str]  # variables to add to the environment (the API key)

    def shell(self) -> str:
        """The command as a person would type it (the key shown as a variable, not its value)."""
        prefix = "VLLM_API_KEY=... " if "VLLM_API_KEY" in self.env else ""
        return prefix + " ".join(shlex.quote(part) for part in self.argv)


def vllm_launch(
    *,
    model_path: str,
    served_model_name: str,
    lora_modules: list[tuple[str, str]],
    host: str,
    port: int,
    api_key: str,
    max_model_len: int,
    max_num_seqs: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    torch_dtype: str = "auto",
    chat_template: str = "",
    hermes_tool_calls: bool = False,
    engine_args: list[str] | None = None,
    python: str = "",
) -> VllmLaunch:
    """The vLLM server command for a model folder and (name, adapter folder) LoRA modules;
    `hermes_tool_calls`: the template writes calls as <tool_call> blocks, which vLLM reads back;
    `engine_args`: vLLM's own engine flags, as given (--gpu-memory-utilization 0.9, ...)."""
    argv = [python or sys.executable, "-m", VLLM_MODULE, "--model", model_path]
    argv += ["--served-model-name", served_model_name, "--host", host, "--port", str(port)]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    argv += ["--max-num-seqs", str(max_num_seqs)]
    if torch_dtype != "auto":
        argv += ["--dtype", torch_dtype]
    if chat_template:
        argv += ["--chat-template", chat_template]
    if hermes_tool_calls:  # as the pt backend reads them (deploy/tool_parser.py)
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    argv += engine_args or []
    # The defaults a request that leaves them out gets, as the pt backend gives them.
    overrides = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    argv += ["--override-generation-config", json.dumps(overrides)]
    if lora_modules:
        ranks = [adapter_rank(Path(path)) for _, path in lora_modules]
        argv += ["--enable-lora", "--max-loras", str(len(lora_modules))]
        argv += ["--max-lora-rank", str(vllm_lora_rank(max(ranks)))]
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in lora_modules)]
    return VllmLaunch(argv, {"VLLM_API_KEY": api_key} if api_key else {})


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank in a PEFT adapter_config.json (r, or any rank_pattern value)."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read {adapter_dir / 'adapter_config.json'}: {exc}", "copy or save the adapter again"
        ) from None
    ranks = [config.get("r") or 8, *(config.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks)


def vllm_lora_rank(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise UserError(
        f"an adapter has LoRA rank {rank}, more than vLLM serves ({VLLM_LORA_RANKS[-1]})",
        "merge it first with --merge_lora true, or serve it with --infer_backend pt",
    )


def chat_template_file(plan: Any, system: str | None, template: str = "") -> str:
    """A Jinja file with the first run's chat template (or `template`, --template) and its system
    prompt as the default, or "" when that is the tokenizer's own template and there is no system
    prompt (vLLM's default then)."""
    from ..core.model_files import cache_root
    from ..core.templates import get_template, named_template, with_default_system

    settings = plan.first_run_settings
    template = template or str(settings.get("template") or "")
    system_prompt = system if system is not None else str(settings.get("system") or "")
    named = named_template(template)  # None: the tokenizer's own
    if named is None and not system_prompt:
        return ""
    if named is not None:
        source = named
    else:
        from ..models.loading import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(plan.base_spec))
        if not tokenizer.chat_template:
            source = get_template("chatml")
        else:
            source = tokenizer.chat_template
    text = with_default_system(source, system_prompt)
    folder = cache_root() / "vllm"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"chat-template-{hashlib.sha1(text.encode()).hexdigest()[:12]}.jinja"
    if not path.is_file():
        path.write_text(text, encoding="utf-8")
    return str(path)


def writes_hermes_tool_calls(plan: Any, chat_template: str) -> bool:
    """Whether the template served (the file chat_template_file made, else the base's own) writes
    tool calls as Hermes / Qwen2.5's <tool_call> blocks."""
    from .tool_parser import CALL_START

    if chat_template:
        return CALL_START in Path(chat_template).read_text(encoding="utf-8")
    from ..models.loading import load_tokenizer, resolve_model

    return CALL_START in str(load_tokenizer(resolve_model(plan.base_spec)).chat_template or "")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def run_vllm(launch: VllmLaunch, say: Any = print) -> int:
    """Replace this process with vLLM's server (its signals and exit code become ours), or say
    that vLLM is missing and what it would have run."""
    if not vllm_available():
        raise UserError(
            f"vLLM is not installed in this Python ({sys.executable}); the command would be:\n  "
            f"{launch.shell()}",
            INSTALL_HINT,
        )
    say(f"handing over to vLLM: {launch.shell()}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(launch.argv[0], launch.argv, {**os.environ, **launch.env})
    return 0  # not reached: execve does not return
