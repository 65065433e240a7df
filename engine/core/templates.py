"""Named chat templates for `--template`, and the fallback for tokenizers that ship none.

Each is a Jinja template in the form `tokenizer.apply_chat_template(chat_template=...)` takes.
They render a finished conversation so that every assistant turn is the assistant header, then
the content, then the end-of-turn token: that is what lets the data code put the loss on the
content and end token only (see `encoding.tokenize_samples`).
"""

from __future__ import annotations

import json

# ChatML as Qwen, SmolLM and many others use it. No default system prompt: a self-cognition
# fine-tune should not be fighting an identity written into the template.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ChatML plus the default system prompt of Qwen1.5 / Qwen2 (Qwen2.5's names "Qwen" itself, which
# would contradict the identity the sample_data teaches).
QWEN = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta's Llama 3 / 3.1 format without tools: BOS once, header per turn, content trimmed, <|eot_id|>.
LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = (bos_token or '') + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {"chatml": CHATML, "qwen": QWEN, "llama3": LLAMA3}

# Used when the tokenizer has no chat template of its own and no --template was given.
DEFAULT_TEMPLATE = "chatml"


def get_template(name: str) -> str:
    """The Jinja source of a named template; ValueError names the known ones."""
    key = name.strip().lower()
    if key not in TEMPLATES:
        known = ", ".join(TEMPLATES)
        raise ValueError(
            f"unknown chat template {name!r}: use one of {known}, "
            "or leave --template empty to use the tokenizer's own"
        )
    return TEMPLATES[key]


def with_default_system(template: str, system: str) -> str:
    """`template` with `system` as the system prompt of any chat that brings none, as training
    gave it to samples without one (TrainConfig.system); unchanged when `system` is empty."""
    if not system:
        return template
    # JSON's double-quoted string is a Jinja string literal too (ensure_ascii=False: Jinja decodes
    # escapes one code point at a time, which would split an emoji's surrogate pair).
    literal = json.dumps(system, ensure_ascii=False)
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages %}"
        "{%- endif %}" + template
    )
