"""Named chat templates for `--template`, and the fallback for tokenizers that ship none.

ms-swift's own template names (qwen2_5, llama3_2, glm4, ...) are accepted too, as a copied command
passes them: each names a model family's own format, which is what that model's tokenizer renders.

Each is a Jinja template in the form `tokenizer.apply_chat_template(chat_template=...)` takes.
They render a finished conversation so that every assistant turn is the assistant header, then
the content, then the end-of-turn token: that is what lets the data code put the loss on the
content and end token only (see `encoding.tokenize_samples`).
"""

from __future__ import annotations

import json

from .errors import UserError


def _chatml(default_system: str) -> str:
    """ChatML, with tools in Qwen2.5's format: the tools listed in the system turn inside
    <tools>, each assistant call as <tool_call>{"name": ..., "arguments": ...}</tool_call>, tool
    results as a user turn of <tool_response> blocks. Without tools it is plain ChatML."""
    system = f"'<|im_start|>system\\n{default_system}<|im_end|>\\n'" if default_system else "''"
    return (
        "{% if tools %}{{ '<|im_start|>system\n' }}"
        "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
        + (f"{{% else %}}{{{{ '{default_system}\n\n' }}}}" if default_system else "")
        + "{% endif %}"
        "{{ '# Tools\n\nYou may call one or more of these functions to help with the request. "
        "Their signatures are inside <tools></tools> XML tags:\n<tools>' }}"
        "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
        "{{ '\n</tools>\n\nFor each call, return a JSON object with the function name and its "
        "arguments inside <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}'
        "\n</tool_call><|im_end|>\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if tools and loop.first and message['role'] == 'system' %}"
        "{% elif message['role'] == 'tool' %}"
        "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}"
        "{{ '<|im_start|>user' }}{% endif %}"
        "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
        "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
        "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
        "{{ '<|im_start|>assistant' }}{% if message['content'] %}{{ '\n' + message['content'] }}{% endif %}"
        "{% for call in message['tool_calls'] %}"
        "{{ '\n<tool_call>\n{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' "
        "+ (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}"
        "{% endfor %}{{ '<|im_end|>\n' }}"
        "{% else %}"
        + (
            "{% if loop.first and messages[0]['role'] != 'system' and not tools %}"
            f"{{{{ {system} }}}}{{% endif %}}"
            if default_system
            else ""
        )
        + "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


# ChatML as Qwen, SmolLM and many others use it. No default system prompt: a self-cognition
# fine-tune should not be fighting an identity written into the template.
CHATML = _chatml("")

# ChatML plus the default system prompt of Qwen1.5 / Qwen2 (Qwen2.5's names "Qwen" itself, which
# would contradict the identity the sample_data teaches).
QWEN = _chatml("You are a helpful assistant.")

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


# ms-swift's names for the text models' formats (swift/llm/template/constant.py, LLMTemplateType)
# that are not TEMPLATES' own: each means "the format this model family was trained with".
SWIFT_TEMPLATE_NAMES = frozenset(
    """default qwen2_5 qwen2_5_math qwen3 qwen3_thinking qwen3_nothinking qwen3_coder qwq_preview qwq
    marco_o1 llama llama3_2 reflection megrez yi_coder sus gpt_oss seed_oss minimax minimax_m1
    minimax_m2 numina ziya atom mengzi chatglm2 glm4 glm4_0414 glm4_5 codegeex4 longwriter_llama
    internlm internlm2 internlm3 deepseek deepseek_coder deepseek_v2_5 deepseek_r1 deepseek_v3_1
    openbuddy openbuddy2 baichuan baichuan_m1 minicpm telechat telechat2 codefuse codefuse_codellama
    skywork skywork_o1 mistral_nemo mistral_2501 devstral zephyr wizardlm2 wizardlm2_moe gemma
    gemma3_text phi3 phi4 ling ling2 ring2 yuan xverse bluelm orion moonlight kimi_k2 mimo_rl dots1
    hunyuan_moe hunyuan ernie ernie_thinking longchat aya c4ai dbrx minimind""".split()
)


def named_template(name: str) -> str | None:
    """The Jinja source `--template name` renders with: one of TEMPLATES, or None for the model's
    own format (the tokenizer's template), which an empty name or ms-swift's name for a model
    family's format asks for. ValueError names the known ones."""
    key = name.strip().lower()
    if not key or key in SWIFT_TEMPLATE_NAMES:
        return None
    return get_template(key)


def template_words(name: str) -> str:
    """A --template as logs, notes and transcripts say it: ms-swift's name for a family's format
    is the tokenizer's own template here, and says so."""
    if not name.strip():
        return "the tokenizer's own"
    if name.strip().lower() in SWIFT_TEMPLATE_NAMES:
        return f"the tokenizer's own (--template {name})"
    return name


def template_flag(name: str) -> str | None:
    """named_template for a --template the person typed: UserError naming the known ones."""
    try:
        return named_template(name)
    except ValueError as exc:
        raise UserError(f"--template: {exc}", "pass one of the names listed, or leave it out") from None


def get_template(name: str) -> str:
    """The Jinja source of one of TEMPLATES; ValueError names them."""
    key = name.strip().lower()
    if key not in TEMPLATES:
        known = ", ".join(TEMPLATES)
        raise ValueError(
            f"unknown chat template {name!r}: use one of {known}, ms-swift's name for the model's "
            "own format (qwen2_5, llama3_2, glm4, ...), or leave --template empty for the tokenizer's own"
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


def writes_bos(template: str, bos_token: str | None) -> bool:
    """Whether a chat template writes the BOS token itself (Llama 3's does). llama.cpp and Ollama,
    whose templates cannot, then add it when tokenising (tokenizer.ggml.add_bos_token); where
    the template does not, neither may they, or the model sees a BOS it never trained with."""
    return bool(bos_token) and "bos_token" in template
