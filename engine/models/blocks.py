"""The repeated decoder blocks of a loaded model: what the training path recomputes and compiles,
what FSDP shards one unit each, and where a prefill checks for a cancel; and the hooks that let a
stop land between two modules of a forward."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ..core.errors import Cancelled


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


def stop_before_each(modules: Iterable[Any], stopped: Callable[[], bool]) -> list[Any]:
    """Raise Cancelled before the forward of any of `modules` once `stopped()` is true: on a CPU a
    long prompt's prefill, or one step of a large batch, takes many seconds, and a stop should not
    wait for all of it. Returns the hooks' handles. Never on a captured CUDA graph or a compiled
    layer: a graph replays no Python hooks, and a hook breaks dynamo's graph."""

    def check(_module: Any, _args: Any) -> None:
        if stopped():
            raise Cancelled()

    return [module.register_forward_pre_hook(check) for module in modules]


@contextmanager
def stoppable(layers: list[Any], cancel: Any) -> Iterator[None]:
    """stop_before_each for the duration of the block, on `cancel` (a threading.Event, or None)."""
    handles = [] if cancel is None else stop_before_each(layers, cancel.is_set)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
