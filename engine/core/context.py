"""A model's context length, and the one rule that a prompt must leave room in it for an answer:
the engine's chat (infer/generate.py) and `tunebench deploy` (deploy/validation.py) both refuse
with it, each adding what to do there. Standard library only."""

from __future__ import annotations

from typing import Any


def context_length(config: dict[str, Any]) -> int:
    """The context a model's config.json (as a dict) names, 0 if it does not say."""
    nested = config.get("text_config")
    text = nested if isinstance(nested, dict) else config  # multimodal models nest the text model's
    value = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else 0


def prompt_overflow(prompt_tokens: int, context: int) -> str:
    """What is wrong when the prompt leaves no room for an answer ("" when it fits, or when the
    context is unknown). OpenAI's wording, which clients look for to trim a chat."""
    if not context or prompt_tokens < context:
        return ""
    return (
        f"this model's maximum context length is {context} tokens, but the prompt has {prompt_tokens} tokens"
    )
