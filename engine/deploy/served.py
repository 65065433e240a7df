"""What a deployment serves: one base model and its adapters, each under the name clients ask for.

The adapters load into one PeftModel over one copy of the base weights, as the side-by-side chat
loads them (generate.py), so a batch can run base rows and adapter rows together. Each served
name keeps the chat template and system prompt of the run that trained it; the base takes those
of the first adapter's run, as `tunebench chat --compare` gives the base column, so the same
request to the base and to the adapter sees the same prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.context import context_length
from ..core.errors import UserError
from ..core.memory_model import model_sizes
from ..infer.lora_decode import PEFT_BASE

# A served name goes into JSON bodies and Prometheus labels: no spaces, quotes or backslashes.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


@dataclass(frozen=True)
class ServedTarget:
    """One name a client can put in a request's `model`."""

    name: str
    peft_name: str  # the PEFT adapter it runs with, PEFT_BASE for the base model
    adapter_dir: Path | None
    template: str  # the run's --template ("" = the tokenizer's own)
    system: str  # the run's system prompt ("" = none)

    @property
    def is_base(self) -> bool:
        return self.adapter_dir is None


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter named on the command line: `name=path`, or a path served under its run's name."""

    name: str
    path: str


def parse_adapter_specs(values: list[str]) -> list[AdapterSpec]:
    """`--adapters a=runs/x runs/y` -> [a: runs/x, y: runs/y]; UserError names a bad one."""
    from ..core.targets import resolve_target

    specs: list[AdapterSpec] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            path = value
            target = resolve_target(str(Path(value).expanduser()))
            name = target.label
        if not path.strip():
            raise UserError(
                f"--adapters {value!r}: no path after '='",
                "write name=path, e.g. --adapters mine=runs/<run-id>",
            )
        check_served_name(name, f"--adapters {value!r}")
        specs.append(AdapterSpec(name, path))
    return specs


def check_served_name(name: str, where: str) -> None:
    if not NAME_PATTERN.match(name):
        raise UserError(
            f"{where}: {name!r} cannot be a served model name",
            "use letters, digits and . _ : / @ + - (up to 128, starting with a letter or digit)",
        )


def default_base_name(model_spec: str) -> str:
    """What clients call the base when --served_model_name is not given: `demo`, a hub id as it
    was typed, or a folder's own name (vLLM serves a folder under its path; a name reads better)."""
    spec = model_spec.strip().rstrip("/")
    path = Path(spec).expanduser()
    if spec == "demo" or (not path.exists() and spec.count("/") == 1):
        return spec
    return path.stem if path.suffix.lower() == ".gguf" else path.name


class ServedModels:
    """The loaded base model, its adapters in one PeftModel, and the served names."""

    def __init__(self, loaded: Any, targets: list[ServedTarget], peft: Any = None) -> None:
        from ..infer.prompts import stop_token_ids

        self.loaded = loaded
        self.peft = peft
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        # One base matmul for sibling projections (q/k/v, gate/up), as the chat decodes on CUDA.
        self.fuse_base = loaded.device.type == "cuda"
        self.stop_ids = stop_token_ids(self.tokenizer, loaded.model)
        self.targets = {t.name: t for t in targets}

    @property
    def model(self) -> Any:
        """The module a forward pass goes through: the PeftModel once an adapter is loaded."""
        return self.peft if self.peft is not None else self.loaded.model

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: the rows of the input embedding."""
        return int(self.loaded.model.get_input_embeddings().weight.shape[0])

    @property
    def base_name(self) -> str:
        return next(t.name for t in self.targets.values() if t.is_base)

    def encode_chat(
        self, name: str, messages: list[dict[str, Any]], tools: list[dict] | None = None
    ) -> list[int]:
        """Prompt tokens of a chat for one served name: its run's template, and its run's system
        prompt unless the chat brings its own; `tools` shown as the template shows them."""
        from ..infer.prompts import encode_prompt

        target = self.targets[name]
        has_system = any(m.get("role") == "system" for m in messages)
        system = "" if has_system else target.system
        return encode_prompt(self.tokenizer, messages, target.template, system, tools)

    def encode_text(self, prompt: str) -> list[int]:
        """A plain completion prompt, tokenised as-is (special tokens such as BOS added, as vLLM does)."""
        return list(self.tokenizer(prompt)["input_ids"])

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes across every layer."""
        sizes = model_sizes(self.loaded.model.config)
        element = self.loaded.model.get_input_embeddings().weight.element_size()
        return 2 * sizes["layers"] * sizes["kv_heads"] * sizes["head_dim"] * element


@dataclass(frozen=True)
class DeployPlan:
    """Everything a deployment serves, resolved and checked before any weights load (torch-free):
    the pt backend loads it, the vLLM hand-off turns it into a command line."""

    base_spec: str  # as load_model takes it: demo, a folder, a hub id, a .gguf file
    base_path: Path  # the local model folder it resolves to
    base_name: str
    adapters: tuple[tuple[AdapterSpec, Any], ...]  # (spec, targets.Target)
    context_length: int  # the model's max_position_embeddings, 0 if its config does not say

    @property
    def first_run_settings(self) -> dict[str, Any]:
        """The first adapter's run settings: the base is asked with them, as in `tunebench chat`."""
        return self.adapters[0][1].train_config if self.adapters else {}


def plan_deployment(model: str, adapters: list[AdapterSpec], served_model_name: str = "") -> DeployPlan:
    """Resolve the adapters and the base model and check every served name."""
    from ..core.targets import resolve_target
    from ..infer.export import base_model_of
    from ..models.loading import resolve_model

    targets = [resolve_target(str(Path(a.path).expanduser())) for a in adapters]
    base_spec = base_model_of(targets, model)
    resolved = resolve_model(base_spec)
    base_name = served_model_name or default_base_name(base_spec)
    check_served_name(base_name, "--served_model_name")
    names = [base_name] + [a.name for a in adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(
            f"the served name {duplicates[0]!r} is given twice (base: {base_name!r}; adapters: "
            f"{', '.join(a.name for a in adapters)})",
            "give each adapter its own name with --adapters NAME=PATH, or rename the base with "
            "--served_model_name",
        )
    return DeployPlan(
        base_spec,
        resolved.path,
        base_name,
        tuple(zip(adapters, targets, strict=True)),
        _context_length(resolved.path / "config.json"),
    )


def _context_length(config_file: Path) -> int:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    return context_length(config) if isinstance(config, dict) else 0


def load_served(
    plan: DeployPlan,
    *,
    system: str | None = None,
    template: str = "",
    torch_dtype: str = "auto",
    say: Any = None,
) -> ServedModels:
    """Load the base and every adapter into one PeftModel. `system` (--system) and `template`
    (--template) override the runs' system prompts and chat templates."""
    from ..models.loading import load_model

    say = say or (lambda _text: None)
    say(f"loading {plan.base_spec} ...")
    loaded = load_model(plan.base_spec, torch_dtype=torch_dtype)
    return serve_loaded(
        loaded, plan.base_name, list(plan.adapters), system=system, template=template, say=say
    )


def serve_loaded(
    loaded: Any,
    base_name: str,
    adapters: list[tuple[AdapterSpec, Any]],
    *,
    system: str | None = None,
    template: str = "",
    say: Any = None,
) -> ServedModels:
    """ServedModels over a model already loaded (models.LoadedModel; benchmarks build one in
    code) and (spec, targets.Target) adapters, loaded here into one PeftModel."""
    from ..infer.decode_steps import full_attention_only

    say = say or (lambda _text: None)
    loaded.model.eval()
    if not full_attention_only(loaded.model.config):
        raise UserError(
            f"{loaded.resolved.label} has sliding-window attention layers, which the pt backend's "
            "batched decode does not handle",
            "serve it with --infer_backend vllm",
        )
    base_settings = adapters[0][1].train_config if adapters else {}
    served = [
        ServedTarget(
            base_name,
            PEFT_BASE,
            None,
            template or str(base_settings.get("template") or ""),
            system if system is not None else str(base_settings.get("system") or ""),
        )
    ]
    peft = None
    for index, (spec, target) in enumerate(adapters):
        peft_name = f"a{index}"
        peft = _load_adapter(peft, loaded, target, peft_name)
        settings = target.train_config
        served.append(
            ServedTarget(
                spec.name,
                peft_name,
                target.adapter_dir,
                template or str(settings.get("template") or ""),
                system if system is not None else str(settings.get("system") or ""),
            )
        )
        say(f"adapter {spec.name}: {target.adapter_dir}")
    if peft is not None:
        peft.eval()
    return ServedModels(loaded, served, peft)


def _load_adapter(peft: Any, loaded: Any, target: Any, name: str) -> Any:
    from peft import PeftModel

    try:
        if peft is None:
            return PeftModel.from_pretrained(loaded.model, str(target.adapter_dir), adapter_name=name)
        peft.load_adapter(str(target.adapter_dir), adapter_name=name)
        return peft
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UserError(
            f"could not load the adapter {target.adapter_dir} onto {loaded.resolved.label}: "
            f"{str(exc).splitlines()[0][:300]}",
            "an adapter only loads onto the base model it was trained on; pass that one with --model",
        ) from None
