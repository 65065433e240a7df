"""The repeated decoder blocks of a loaded model: what the training path recomputes and compiles,
what FSDP shards one unit each, and where a prefill checks for a cancel."""

from __future__ import annotations

from typing import Any


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a causal LM (PEFT-wrapped or not), in order.

    transformers' decoder layers are GradientCheckpointingLayer modules; a model from before that
    class (or a custom one) names them instead as the classes it never splits across devices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        layers = []
    else:
        layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    if layers:
        return layers
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]
