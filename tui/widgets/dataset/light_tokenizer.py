"""A tokenizer for the Dataset pane's checks and preview, without transformers or torch.

encoding.check_sample and encoding.assistant_spans take any object with `apply_chat_template` and a
`__call__` that returns input_ids. This one renders the chat template with jinja2 (sandboxed and
configured as transformers does) and counts tokens with the Rust `tokenizers` library from the
model folder's tokenizer.json: token counts match training, and the TUI stays torch-free.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tunebench.engine.core.model_files import cached_model_dir, workspace_model
from tunebench.engine.core.templates import DEFAULT_TEMPLATE, get_template


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, **kwargs: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class LightTokenizer:
    """Chat template rendering plus (when tokenizer.json is there) token counting."""

    def __init__(
        self, chat_template: str | None, backend: Any = None, special: dict[str, str] | None = None
    ) -> None:
        self.chat_template = chat_template
        self.backend = backend
        self.special = special or {}
        self.source = f"the {DEFAULT_TEMPLATE} template"

    @classmethod
    def from_dir(cls, folder: Path) -> LightTokenizer:
        config: dict[str, Any] = {}
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # several named templates: transformers takes "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        backend = None
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
        tokenizer = cls(template, backend, special)
        tokenizer.source = f"the tokenizer in {folder.name}"
        return tokenizer

    @property
    def counts_tokens(self) -> bool:
        return self.backend is not None

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        chat_template: str | None = None,
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        template = chat_template or self.chat_template or get_template(DEFAULT_TEMPLATE)
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special, **kwargs
        )

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        if self.backend is None:
            raise RuntimeError("no tokenizer.json: token counts are not available")
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}


def tokenizer_folder(model: str, workspace: Path) -> Path | None:
    """The folder holding `model`'s tokenizer, if it is on disk already; never converts or downloads.

    The demo and GGUF models are converted by the engine on first load; until then there is no
    tokenizer.json and the pane renders with the default template and skips token counts.
    """
    folder = cached_model_dir(workspace_model(model, workspace))
    return folder if folder is not None and (folder / "tokenizer.json").is_file() else None


def load_for_model(model: str, workspace: Path) -> LightTokenizer:
    folder = tokenizer_folder(model, workspace)
    if folder is None:
        tokenizer = LightTokenizer(None)
        tokenizer.source = f"the {DEFAULT_TEMPLATE} template (no tokenizer on disk for {model!r} yet)"
        return tokenizer
    return LightTokenizer.from_dir(folder)
