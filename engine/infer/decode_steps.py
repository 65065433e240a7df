"""Decode steps for GenerationSession: the KV caches, CUDA graphs and sampling of one batch.

DynamicSteps grows its KV cache token by token (the CPU path: attention reads only what exists).
StaticDecoder preallocates the cache and keeps the attention mask itself, so a decode step reads
nothing back to the host and can be captured as a CUDA graph; it also outlives a request, so the
next request with the same rows and adapters replays the graphs already captured. Sampler picks
the next token of every row on the device.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..core.config import GenerationConfig

# Decode attention reads the cache only up to the next multiple of this many slots past what is
# filled, not the whole preallocated length; each such window gets its own CUDA graph.
ATTENTION_WINDOW = 256
# The static cache is preallocated in multiples of this, so later requests of similar length
# find it big enough and reuse it (and its captured graphs).
CACHE_ROUNDING = 256


class DynamicSteps:
    """Forward passes over a growing KV cache: the CPU path (attention reads only what exists)."""

    def __init__(self, model: Any, ids: Any, mask: Any) -> None:
        from transformers import DynamicCache

        self.model = model
        self.ids = ids
        self.padded = bool((mask == 0).any())
        self.mask = mask if self.padded else None  # no padding: no mask to build every step
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=model.config)

    def _forward(self, ids: Any) -> Any:
        return decode_forward(self.model, self.cache, ids, self.mask, self.positions)

    def prefill(self) -> Any:
        return self._forward(self.ids)

    def replay_ready(self) -> bool:
        return False  # every step is launched from Python

    def step(self, next_ids: Any) -> Any:
        self.positions = self.positions[:, -1:] + 1
        if self.padded:
            self.mask = _cat_ones(self.mask)
        return self._forward(next_ids[:, None])


def full_attention_only(config: Any) -> bool:
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"]
    return all(kind == "full_attention" for kind in layer_types)


def _cat_ones(mask: Any) -> Any:
    import torch

    return torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)


class StaticDecoder:
    """Decode over a preallocated KV cache with an additive attention mask kept by us.

    The mask is a [rows, slots] tensor (0 where a row may attend, -inf elsewhere) that each step
    opens one slot of, in place: nothing in a decode step depends on values read back to the
    host, so on CUDA the step is captured once as a CUDA graph and replayed. A 7B model's eager
    step is bound by Python launching thousands of kernels; a replay launches them all at once.

    Attention covers a window: the cache up to the next multiple of `window` slots past what is
    filled, not the whole preallocated length, so a long max_new_tokens costs nothing until it is
    used. Each window has its own graph, captured the first time decoding reaches it; all of them
    share one memory pool (they never run at the same time). The decoder is reused by the next
    request with the same key (rows, adapters, options) whose tokens fit, graphs included.
    """

    def __init__(
        self,
        model: Any,
        batch: int,
        total: int,
        device: Any,
        *,
        graphs: bool,
        window: int = ATTENTION_WINDOW,
        forward: Callable[..., Any] | None = None,
        key: tuple[Any, ...] = (),
        keepalive: Any = None,
    ) -> None:
        import torch

        self.model = model
        self.batch, self.total, self.device = batch, total, device
        self.key = key
        self.keepalive = keepalive  # what the graphs read (the fused adapter weights) stays alive
        self.cache = _window_cache_class()(config=model.config, max_cache_len=total)
        dtype = model.get_input_embeddings().weight.dtype
        # key_bias[b, k]: 0 where row b may attend to cache slot k, -inf elsewhere. A float mask
        # goes to SDPA as it is; a bool one is converted in every layer of every step.
        self.key_bias = torch.full((batch, total), float("-inf"), dtype=dtype, device=device)
        self.step_ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.step_positions = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.window = window
        self.forward_fn = forward
        # One CUDA graph per attention window, or None (eager).
        self.graphs = StepGraphs() if graphs and device.type == "cuda" else None
        self.prompt: Any = None
        self.prompt_positions: Any = None
        self.slot = 0  # cache slot the next token goes to

    def fits(self, key: tuple[Any, ...], tokens: int) -> bool:
        return key == self.key and tokens <= self.total

    def reset(self, ids: Any, mask: Any) -> None:
        """Start a request: an empty cache, the prompt's rows (left-padded) and their positions."""
        length = ids.shape[1]
        self.cache.reset()  # zeroes the slots and the per-layer fill counters, in place
        self.key_bias.fill_(float("-inf"))
        self.key_bias[:, :length].masked_fill_(mask.bool(), 0.0)
        self.prompt = ids
        self.prompt_positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.step_positions.copy_(self.prompt_positions[:, -1:])
        self.slot = length

    def _window(self, filled: int) -> int:
        if not self.window:
            return self.total
        return min(self.total, math.ceil(filled / self.window) * self.window)

    def _decode_mask(self, window: int) -> Any:
        return self.key_bias.view(self.batch, 1, 1, self.total)[..., :window]

    def _forward(self, ids: Any, mask: Any, positions: Any, window: int) -> Any:
        self.cache.window = window
        if self.forward_fn is not None and ids.shape[1] == 1:
            return self.forward_fn(self.model, self.cache, ids, mask, positions)
        return decode_forward(self.model, self.cache, ids, mask, positions)

    def prefill(self) -> Any:
        import torch

        batch, length = self.prompt.shape
        window = self._window(length)
        device = self.prompt.device
        causal = torch.ones((length, window), dtype=torch.bool, device=device).tril()
        allowed = causal[None, None] & (self.key_bias[:, None, None, :window] == 0)
        # A padding query that may see no key would give NaN, and NaN times a zero weight is still
        # NaN in later steps' attention; letting every query see its own slot keeps all of it finite.
        allowed |= torch.eye(length, window, dtype=torch.bool, device=device)[None, None]
        mask = torch.zeros(allowed.shape, dtype=self.key_bias.dtype, device=device)
        mask.masked_fill_(~allowed, float("-inf"))
        return self._forward(self.prompt, mask, self.prompt_positions, window)

    @property
    def capture_seconds(self) -> float:
        return self.graphs.capture_seconds if self.graphs is not None else 0.0

    def replay_ready(self) -> bool:
        """Whether the next step is a graph replay (asynchronous, nothing to capture first)."""
        return self.graphs is not None and self.graphs.ready(self._window(self.slot + 1))

    def step(self, next_ids: Any) -> Any:
        self.step_ids.copy_(next_ids[:, None])
        self.step_positions += 1
        self.key_bias[:, self.slot] = 0.0
        self.slot += 1
        window = self._window(self.slot)
        mask = self._decode_mask(window)

        def forward() -> Any:
            return self._forward(self.step_ids, mask, self.step_positions, window)

        if self.graphs is not None:
            return self.graphs.run(window, forward, self._counters_keeper)
        return forward()

    def _counters_keeper(self) -> Callable[[], None]:
        """Each static layer counts the tokens it holds in a tensor that every forward advances;
        the warm-up and the capture of a graph must not count, so it is put back after each."""
        counters = [layer.cumulative_length for layer in self.cache.layers]
        saved = [c.clone() for c in counters]

        def restore() -> None:
            for counter, value in zip(counters, saved, strict=True):
                counter.copy_(value)

        return restore


class StepGraphs:
    """CUDA graphs of one decode step, one per static shape (`key`), captured the first time a
    key is run and replayed after. A 7B model's eager step is bound by Python launching thousands
    of kernels; a replay launches them all at once. The graphs share one memory pool (they never
    run at the same time). What a graph reads (input buffers, KV cache, weights) must stay at the
    same address: a caller that moves any of it calls clear(). A step that cannot be captured
    turns graphs off, with a warning, and runs eagerly from then on."""

    def __init__(self) -> None:
        self.graphs: dict[Any, tuple[Any, Any]] = {}  # key -> (CUDA graph, its output)
        self.enabled = True
        self.pool: Any = None
        self.stream: Any = None
        self.capture_seconds = 0.0

    def ready(self, key: Any) -> bool:
        """Whether running `key` is a replay (asynchronous, nothing to capture first)."""
        return self.enabled and key in self.graphs

    def clear(self) -> None:
        self.graphs.clear()
        self.pool = None  # the old graphs' memory goes with them

    def run(
        self, key: Any, forward: Callable[[], Any], keep_state: Callable[[], Callable[[], None]] | None = None
    ) -> Any:
        """forward()'s output: key's graph replayed (captured first if new), else forward() run
        eagerly. keep_state, called before a capture, saves what the warm-up and capture runs of
        forward() change and returns the function that puts it back."""
        if self.enabled:
            entry = self.graphs.get(key) or self._capture(key, forward, keep_state)
            if entry is not None:
                entry[0].replay()
                return entry[1]
        return forward()

    def _capture(
        self, key: Any, forward: Callable[[], Any], keep_state: Callable[[], Callable[[], None]] | None
    ) -> tuple[Any, Any] | None:
        import torch

        started = time.perf_counter()
        restore = keep_state() if keep_state is not None else lambda: None
        try:
            if self.stream is None:
                self.stream = torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):  # lets cuBLAS and the allocator settle first
                forward()
                restore()
            torch.cuda.current_stream().wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the engine's memory sampler may touch CUDA from its own thread meanwhile.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = forward()
            restore()
        except Exception as exc:  # noqa: BLE001 - a model whose step cannot be captured still decodes
            restore()
            self.enabled = False
            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {exc}", RuntimeWarning, stacklevel=4)
            return None
        finally:
            self.capture_seconds += time.perf_counter() - started
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, output)
        return self.graphs[key]


def decode_forward(model: Any, cache: Any, ids: Any, mask: Any, positions: Any) -> Any:
    """One forward pass over the KV cache; the last position's logits."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_keyword(type(model)): cache},
    )
    return out.logits[:, -1, :]


_CACHE_KEYWORDS: dict[type, str] = {}


def cache_keyword(model_class: type) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.25 on (where the old
    `past_key_values` warns on every call until it goes in 5.40), `past_key_values` before."""
    if model_class not in _CACHE_KEYWORDS:
        import inspect

        parameters = inspect.signature(model_class.forward).parameters
        _CACHE_KEYWORDS[model_class] = "cache" if "cache" in parameters else "past_key_values"
    return _CACHE_KEYWORDS[model_class]


_WINDOW_CACHE: Any = None


def _window_cache_class() -> Any:
    """transformers' StaticCache, returning only the first `window` slots to attention."""
    global _WINDOW_CACHE
    if _WINDOW_CACHE is None:
        from transformers import StaticCache

        class WindowedStaticCache(StaticCache):
            window: int | None = None

            def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any):
                keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
                if self.window is None or self.window >= keys.shape[2]:
                    return keys, values
                return keys[:, :, : self.window], values[:, :, : self.window]

        _WINDOW_CACHE = WindowedStaticCache
    return _WINDOW_CACHE


@contextmanager
def packed_gqa_attention() -> Iterator[None]:
    """While decoding, one-token SDPA attention runs on the key/value heads themselves.

    transformers' SDPA path copies every key/value head once per query head it serves (repeat_kv)
    whenever a mask is given, in every layer of every step: for Qwen2.5-7B that is 7 times the
    cache read again, plus the copies. With a single query token the query heads of one key/value
    head can be packed as that head's queries instead: (rows, kv heads, heads per kv head, dim)
    against the cache as it is. Exact, not an approximation; anything else goes to the original.
    """
    import torch.nn.functional as F

    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        yield
        return
    try:
        original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    except KeyError:
        yield
        return
    had_local = "sdpa" in getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", {})

    def attention(
        module: Any,
        query: Any,
        key: Any,
        value: Any,
        attention_mask: Any,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[Any, None]:
        groups = getattr(module, "num_key_value_groups", 1)
        if (
            query.shape[2] != 1
            or groups <= 1
            or dropout
            or kwargs.get("position_bias") is not None
            or kwargs.get("output_attentions")
            or attention_mask is None
            or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1
            or attention_mask.shape[2] != 1
            or key.shape[1] * groups != query.shape[1]
        ):
            return original(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
        batch, heads, _, dim = query.shape
        # repeat_kv gives query head h the key/value head h // groups: the same packing.
        packed = query.reshape(batch, key.shape[1], groups, dim)
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2), None

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = original
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]


class Sampler:
    """Greedy, or temperature / top-k / top-p sampling, with a repetition penalty.

    Each row draws from its own generator seeded with cfg.seed, so a column samples the same way
    whatever else is in the batch; the penalty covers the row's own prompt and answer, never padding.
    """

    def __init__(self, cfg: GenerationConfig, rows: list[Any], device: Any) -> None:
        import torch

        self.cfg = cfg
        self.greedy = cfg.temperature == 0
        self.penalty = cfg.repetition_penalty != 1.0
        self.prompts = [r.prompt for r in rows]
        self.device = device
        self.seen: Any = None  # [rows, vocab] bool, made on the first step when the vocab size is known
        self.generators = []
        if not self.greedy:
            for _ in rows:
                generator = torch.Generator(device=device)
                generator.manual_seed(cfg.seed)
                self.generators.append(generator)

    def _init_seen(self, vocab: int) -> None:
        import torch

        self.seen = torch.zeros((len(self.prompts), vocab), dtype=torch.bool, device=self.device)
        for i, prompt in enumerate(self.prompts):
            self.seen[i, torch.tensor(prompt, device=self.device)] = True

    def seen_tokens(self, next_ids: Any) -> None:
        if self.penalty and self.seen is not None:
            self.seen[range(next_ids.shape[0]), next_ids] = True

    def pick(self, logits: Any) -> Any:
        import torch

        if self.penalty:
            if self.seen is None:
                self._init_seen(logits.shape[-1])
            logits = logits.float()
            p = self.cfg.repetition_penalty
            penalised = torch.where(logits < 0, logits * p, logits / p)
            logits = torch.where(self.seen, penalised, logits)
        if self.greedy:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.cfg.temperature
        if self.cfg.top_k > 0:
            k = min(self.cfg.top_k, logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.cfg.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token once the more likely ones already hold top_p of the mass (keep the first).
            drop = probs.cumsum(dim=-1) - probs > self.cfg.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        picks = [
            torch.multinomial(probs[i], 1, generator=generator) for i, generator in enumerate(self.generators)
        ]
        return torch.cat(picks)
