"""Side-by-side generation: one chat sent to the base model and to adapters, streamed per column.

A GenerationSession owns one base model. Every adapter (a run's final adapter, a checkpoint, any
PEFT adapter folder) is loaded once into the same PeftModel under its own name, so all columns
share one copy of the base weights, and one batched decode loop serves every column at once:
row i of the batch runs with adapter i, or with none for the base (PEFT's mixed-adapter batches,
`adapter_names=[..., "__base__"]`, computed by the faster equivalent in lora_decode.py). Greedy
decoding (temperature 0) gives each column exactly what a call with that column alone gives.
The KV caches, CUDA graphs and sampling of a decode live in decode_steps.py; the decode-speed
options and their measured worth are in bench/RESULTS_generate.md.

Which targets a column can name, and how their adapters and run settings are found, is in
targets.py; how a chat becomes prompt tokens, when a turn stops and how tokens stream back as
text is in prompts.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.config import GenerationConfig
from ..core.context import context_length, prompt_overflow
from ..core.errors import Cancelled, UserError
from ..core.targets import ADAPTER_WEIGHTS, Target, check_trained_on, resolve_target
from ..models.blocks import decoder_layers, stoppable
from .decode_steps import ATTENTION_WINDOW
from .lora_decode import PEFT_BASE
from .lora_decode import FusedLora as _FusedLora
from .prompts import IncrementalDetokenizer, StopText, encode_prompt, stop_token_ids

log = logging.getLogger(__name__)

MAX_LOADED_ADAPTERS = 8  # older ones are dropped (least recently used) to bound memory
MAX_BATCH_ROWS = 16  # probe sets are decoded in batches of at most this many rows
DECODE_MODES = ("auto", "dynamic", "static", "graphs")

ChunkCallback = Callable[[str, str], None]


@dataclass
class _Row:
    """One sequence of the batch: a target answering one conversation."""

    target: Target
    adapter: str  # PEFT adapter name, or PEFT_BASE
    prompt: list[int]
    detok: IncrementalDetokenizer
    stop: StopText = field(default_factory=lambda: StopText(()))  # the request's stop texts
    pieces: list[str] = field(default_factory=list)
    finish_reason: str = ""
    stopped_at_text: bool = False
    first_at: float = 0.0
    last_at: float = 0.0

    def result(self, started: float) -> dict[str, Any]:
        tokens = len(self.detok.ids)
        ttft = self.first_at - started if tokens else 0.0
        # Decode rate after the first token: time to first token (prompt included) is its own stat.
        span = self.last_at - self.first_at
        rate = (tokens - 1) / span if tokens > 1 and span > 0 else 0.0
        return {
            "text": "".join(self.pieces),
            "tokens": tokens,
            "ttft_s": round(ttft, 4),
            "tokens_per_s": round(rate, 2),
            "finish_reason": self.finish_reason,
        }


class GenerationSession:
    """One base model plus any number of adapters, reused across requests for the same base."""

    def __init__(
        self, model: str = "demo", *, torch_dtype: str = "auto", decode: str = "auto", cancel: Any = None
    ) -> None:
        from ..models.loading import load_model

        self._setup(model, load_model(model, torch_dtype=torch_dtype, cancel=cancel), decode)

    @classmethod
    def from_loaded(cls, loaded: Any, model_spec: str = "", decode: str = "auto") -> GenerationSession:
        """A session over a model that is already loaded (models.LoadedModel), e.g. for benchmarks."""
        session = cls.__new__(cls)
        session._setup(model_spec or str(loaded.resolved.path), loaded, decode)
        return session

    def _setup(self, model_spec: str, loaded: Any, decode: str) -> None:
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}")
        self.model_spec = model_spec
        self.loaded = loaded
        self.loaded.model.eval()
        # "dynamic": a KV cache that grows (best on CPU); "static": preallocated cache and mask;
        # "graphs": static plus CUDA graph replay of each decode step (the CUDA default).
        if decode == "auto":
            decode = "graphs" if loaded.device.type == "cuda" else "dynamic"
        self.decode_mode = decode
        self.tokenizer = self.loaded.tokenizer
        self._layers = decoder_layers(loaded.model)  # where a prefill checks for a cancel
        self.context_length = context_length(loaded.model.config.to_dict())  # 0: not known
        self.stop_ids = stop_token_ids(self.tokenizer, self.loaded.model)
        self.peft: Any = None  # the PeftModel, once the first adapter is loaded
        self._adapters: dict[Path, tuple[str, int]] = {}  # adapter dir -> (name, weights mtime)
        self._next_name = 0
        self._fused_cache: dict[tuple[str, ...], Any] = {}
        self._eager_batches_noted: set[tuple[str, ...]] = set()
        self._decoder: Any = None  # the last StaticDecoder (KV cache and CUDA graphs), for reuse
        self._compiled_step: Any = None
        self._lock = threading.Lock()  # one generation at a time: the batch owns the model
        # Decode-speed options, all on by default where they help (CUDA); bench/bench_generate.py
        # turns them off one at a time to measure each (bench/RESULTS_generate.md).
        cuda = loaded.device.type == "cuda"
        # One base matmul for q/k/v and for gate/up: their weights are laid out side by side once.
        self.fuse_base = cuda
        # One-token attention on the key/value heads themselves, no per-step repeat_kv copies.
        self.packed_gqa = cuda
        # Launch step n+1 before reading step n's tokens back, so the GPU never waits for Python.
        self.pipelined = cuda
        # liger's one-kernel RMSNorm, SwiGLU and rotary embedding while decoding (where installed):
        # a two-row step is bound by how many kernels it launches, not by their work.
        self.fused_kernels = cuda
        # Attention reads the static cache up to the next multiple of this many slots (0: all).
        self.attention_window = ATTENTION_WINDOW
        # torch.compile the decode step before capturing it (measured, off: see RESULTS_generate).
        self.compile_step = False
        self._weights_fused = False

    # ------------------------------------------------------------- public API

    def generate(
        self,
        messages: list[dict[str, str]] | dict[str, list[dict[str, str]]],
        targets: list[str],
        cfg: GenerationConfig,
        system: str = "",
        on_chunk: ChunkCallback | None = None,
        cancel: threading.Event | None = None,
        template: str = "",
    ) -> dict[str, dict[str, Any]]:
        """Answer the chat with every target in one batched decode; stream (target, text) pieces.

        `messages` is the chat so far (user turn last), shared by every target, or a dict giving
        each target its own history (side-by-side chat, where each column has its own answers).
        The system prompt is `system`, else a system message in `messages`, else the one the
        target's run trained with; the chat template is `template` (--template), else the run's.
        The base column takes the chat template and system prompt of the first adapter's run, so
        both sides get the same prompt. Returns per target: text,
        tokens, ttft_s (time to first token, prompt included), tokens_per_s (decode rate after
        the first token) and finish_reason ("stop", "length" or "cancelled").
        """
        specs = list(dict.fromkeys(targets))  # the same target twice is one column
        conversations = [messages[s] if isinstance(messages, dict) else messages for s in specs]
        with self._lock:
            resolved = self._resolve(specs)
            rows = [
                self._row(target, conversation, system, template, resolved)
                for target, conversation in zip(resolved, conversations, strict=True)
            ]
            callback = None
            if on_chunk is not None:
                callback = lambda i, text: on_chunk(specs[i], text)  # noqa: E731
            results = self._decode(rows, cfg, callback, cancel)
        return dict(zip(specs, results, strict=True))

    def generate_many(
        self,
        conversations: list[list[dict[str, str]]],
        targets: list[str],
        cfg: GenerationConfig,
        system: str = "",
        cancel: threading.Event | None = None,
        template: str = "",
    ) -> list[dict[str, dict[str, Any]]]:
        """Every conversation against every target (a probe set), batched; one result dict each."""
        specs = list(dict.fromkeys(targets))
        with self._lock:
            resolved = self._resolve(specs)
            rows = [
                self._row(t, conv, system, template, resolved) for conv in conversations for t in resolved
            ]
            results: list[dict[str, Any]] = []
            per_batch = max(len(specs), MAX_BATCH_ROWS // len(specs) * len(specs))
            for start in range(0, len(rows), per_batch):
                results += self._decode(rows[start : start + per_batch], cfg, None, cancel)
        out = []
        for i in range(len(conversations)):
            chunk = results[i * len(specs) : (i + 1) * len(specs)]
            out.append(dict(zip(specs, chunk, strict=True)))
        return out

    # ------------------------------------------------------------- adapters

    def _resolve(self, specs: list[str]) -> list[Target]:
        if not specs:
            raise UserError("no targets to generate with", "name 'base' and/or adapter folders")
        targets = [resolve_target(s) for s in specs]
        if sum(not t.is_base for t in targets) > MAX_LOADED_ADAPTERS:
            raise UserError(
                f"at most {MAX_LOADED_ADAPTERS} adapters can answer side by side",
                "compare fewer adapters at a time",
            )
        return targets

    def _row(
        self,
        target: Target,
        messages: list[dict[str, str]],
        system: str,
        template: str,
        all_targets: list[Target],
    ) -> _Row:
        if not messages:
            raise UserError("nothing to answer: the chat has no messages", "send a user message")
        # The base answers with the first adapter's settings: an A/B comparison needs one prompt.
        settings = target if not target.is_base else next((t for t in all_targets if not t.is_base), target)
        has_system = any(m.get("role") == "system" for m in messages)
        run_system = "" if has_system else str(settings.train_config.get("system") or "")
        template = template or str(settings.train_config.get("template") or "")
        adapter = PEFT_BASE if target.is_base else self._adapter_name(target)
        prompt = encode_prompt(self.tokenizer, messages, template, system or run_system)
        # Refused here, in a second: a prompt past the context would take minutes to prefill (on
        # a CPU) and then answer garbage.
        problem = prompt_overflow(len(prompt), self.context_length)
        if problem:
            raise UserError(
                problem,
                "shorten it, or clear the chat so its earlier turns are not sent again "
                "(ctrl+l in the TUI's Chat pane, /clear in tunebench chat)",
                code="context",
            )
        return _Row(target, adapter, prompt, IncrementalDetokenizer(self.tokenizer))

    def _within_context(self, rows: list[_Row], cfg: GenerationConfig) -> GenerationConfig:
        """The answers end where the context does (finish_reason "length"): positions past it
        are ones the model never saw, and its answer there is garbage."""
        if not self.context_length:
            return cfg
        room = self.context_length - max(len(r.prompt) for r in rows)  # >= 1: _row refused the rest
        return cfg if room >= cfg.max_new_tokens else replace(cfg, max_new_tokens=max(1, room))

    def load_adapters(self, targets: list[Target]) -> None:
        """Load the targets' adapters now, so that one which does not fit this base is said
        before the first question rather than after it."""
        for target in targets:
            if target.adapter_dir is not None:
                self._adapter_name(target)

    def _adapter_name(self, target: Target) -> str:
        """Load the target's adapter into the shared PeftModel once (again if its file changed)."""
        assert target.adapter_dir is not None
        loaded = self.loaded.resolved
        check_trained_on(target, loaded.path, f"the loaded model {loaded.label} ({loaded.path})")
        mtime = (target.adapter_dir / ADAPTER_WEIGHTS).stat().st_mtime_ns
        known = self._adapters.get(target.adapter_dir)
        if known and known[1] == mtime:
            self._adapters[target.adapter_dir] = self._adapters.pop(target.adapter_dir)  # most recent last
            return known[0]
        if known:  # retrained or re-saved in place since we loaded it
            self._drop_adapter(target.adapter_dir)
        while len(self._adapters) >= MAX_LOADED_ADAPTERS:
            self._drop_adapter(next(iter(self._adapters)))
        name = f"a{self._next_name}"
        self._next_name += 1
        from peft import PeftModel

        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(
                    self.loaded.model, str(target.adapter_dir), adapter_name=name
                )
                self.peft.eval()
            else:
                self.peft.load_adapter(str(target.adapter_dir), adapter_name=name)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise UserError(
                f"could not load the adapter {target.adapter_dir} onto {self.loaded.resolved.label}: "
                f"{str(exc).splitlines()[0][:300]}",
                "an adapter only loads onto the base model it was trained on; pass that one with --model",
            ) from None
        self._adapters[target.adapter_dir] = (name, mtime)
        self._prune_adapters()
        return name

    def _drop_adapter(self, adapter_dir: Path) -> None:
        self._adapters.pop(adapter_dir)
        self._prune_adapters()

    def _prune_adapters(self) -> None:
        """Delete adapters no longer listed (evicted, or stale copies) from the PeftModel."""
        live = {name for name, _ in self._adapters.values()}
        if self.peft is not None:
            for name in list(self.peft.peft_config):
                # PEFT keeps at least one adapter; an unlisted last one is replaced on the next load.
                if name not in live and len(self.peft.peft_config) > 1:
                    self.peft.delete_adapter(name)
        self._fused_cache.clear()
        self._decoder = None  # its graphs read the fused weights just dropped

    @contextmanager
    def _adapters_for_rows(self, names: list[str]) -> Iterator[Any]:
        """Within this block a forward pass runs row i with adapter names[i] (PEFT_BASE: none).
        Yields the fused forward in use, or None (PEFT's own forward, or the plain model)."""
        model = self.peft if self.peft is not None else self.loaded.model
        if self.peft is None and not self.fuse_base:
            yield None
            return
        fused = self._fused_cache.get(tuple(names))
        if fused is None:
            fused = _FusedLora.build(model, names, fuse_base=self.fuse_base)
            if fused is not None:
                self._fused_cache[tuple(names)] = fused
        if fused is not None:
            with fused.installed():
                yield fused
            return
        # Any LoRA variant the fused path does not cover: PEFT's own mixed-batch forward.
        with self.peft._enable_peft_forward_hooks(adapter_names=names):
            yield None

    # ------------------------------------------------------------- decode loop

    def _decode(
        self,
        rows: list[_Row],
        cfg: GenerationConfig,
        on_chunk: Callable[[int, str], None] | None,
        cancel: threading.Event | None,
    ) -> list[dict[str, Any]]:
        """Prefill the rows together, then sample, stream and step until every row stops, the
        token limit or a cancel; one result per row."""
        import torch

        from .decode_steps import Sampler

        started = time.perf_counter()
        cfg = self._within_context(rows, cfg)
        for row in rows:
            row.stop = StopText(tuple(cfg.stop_words))
        answered = len(rows)
        rows = self._with_ghost(rows)
        batch = len(rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = self.loaded.device
        ids, mask = self._left_padded(rows, pad_id)
        sampler = Sampler(cfg, rows, device)
        finished = [False] * answered + [True] * (batch - answered)
        finished_on_device = torch.tensor(finished, device=device)
        mode = self._prepare_mode()
        cancelled_early = cancel is not None and cancel.is_set()
        with (
            torch.inference_mode(),
            self._adapters_for_rows([r.adapter for r in rows]) as fused,
            self._attention(),
            self._kernels(),
        ):
            try:
                names = tuple(r.adapter for r in rows)
                steps = None if cancelled_early else self._steps(mode, ids, mask, cfg, fused, names)
                with stoppable(self._layers, cancel):
                    logits = steps.prefill() if steps is not None else None
            except BaseException as exc:
                self._decoder = None  # half-written: the next request starts a fresh one
                if not isinstance(exc, Cancelled):  # a cancel between two layers of the prefill
                    raise
                logits = None
            # Pipelined (CUDA graphs): step n+1 is launched before step n's tokens are read back,
            # so the GPU never idles while Python detokenises and streams. Only the token copy is
            # waited for. A row that ends at step n gets its stop token instead of padding for
            # one extra step; its output is ignored either way.
            pipelined = self.pipelined and device.type == "cuda" and steps is not None
            if pipelined:
                host_ids = torch.empty((batch,), dtype=torch.long, pin_memory=True)
                copied = torch.cuda.Event()
            for step in range(cfg.max_new_tokens):
                if logits is None:
                    break
                next_ids = sampler.pick(logits)
                last = step == cfg.max_new_tokens - 1
                ahead = (
                    pipelined
                    and not last
                    and not (cancel is not None and cancel.is_set())
                    and steps.replay_ready()
                )
                if ahead:
                    host_ids.copy_(next_ids, non_blocking=True)
                    copied.record()
                    sampler.seen_tokens(next_ids)
                    logits = steps.step(next_ids.masked_fill(finished_on_device, pad_id))
                    copied.synchronize()
                    chosen = host_ids.tolist()
                else:
                    chosen = next_ids.tolist()  # a host sync; streaming needs the ids anyway
                self._take_tokens(rows, chosen, finished, finished_on_device, on_chunk)
                if all(finished) or last:
                    break
                if cancel is not None and cancel.is_set():
                    break
                if not ahead:
                    sampler.seen_tokens(next_ids)
                    # Finished rows keep decoding padding (their output is ignored) so the batch
                    # keeps its shape and the KV cache needs no reshuffling.
                    logits = steps.step(next_ids.masked_fill(finished_on_device, pad_id))
            del steps  # a dynamic cache goes now; a static decoder stays for the next request
        cancelled = cancel is not None and cancel.is_set()
        return self._finish_rows(rows[:answered], finished, cancelled, on_chunk, started)

    def _with_ghost(self, rows: list[_Row]) -> list[_Row]:
        """The rows to decode: a lone row gets a ghost beside it.

        CPU matmul kernels take another path for a single row (M=1) than for two or more, which
        rounds the last bit differently; a ghost row (finished from the start, output ignored)
        keeps a lone column bit-identical to the same column inside a bigger batch. The ghost runs
        the base: a lone adapter's LoRA pass then covers one row, as it does beside the base
        column (CUDA's row-slice pass, lora_decode.py), and costs no adapter work for the ghost."""
        if len(rows) != 1:
            return rows
        ghost = _Row(rows[0].target, PEFT_BASE, rows[0].prompt, IncrementalDetokenizer(self.tokenizer))
        return [*rows, ghost]

    def _left_padded(self, rows: list[_Row], pad_id: int) -> tuple[Any, Any]:
        """The prompts as one batch (ids and attention mask) on the model's device, left-padded
        so every row's next token sits in the last column."""
        import torch

        longest = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, longest - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, longest - len(row.prompt) :] = 1
        return ids.to(self.loaded.device), mask.to(self.loaded.device)

    def _prepare_mode(self) -> str:
        """The decode mode this model allows, with its sibling weights fused first if asked."""
        from .decode_steps import full_attention_only

        mode = self.decode_mode
        if mode != "dynamic" and not full_attention_only(self.loaded.model.config):
            mode = "dynamic"  # sliding-window caches reuse slots, which the static mask cannot follow
        if self.fuse_base and not self._weights_fused:
            from .lora_decode import fuse_sibling_weights

            fuse_sibling_weights(self.loaded.model)  # once per model, before inference_mode
            self._weights_fused = True
        return mode

    def _take_tokens(
        self,
        rows: list[_Row],
        chosen: list[int],
        finished: list[bool],
        finished_on_device: Any,
        on_chunk: Callable[[int, str], None] | None,
    ) -> None:
        """One step's tokens into their rows: a stop token ends its row, others are detokenised
        and streamed up to a stop text, which ends the row too."""
        now = time.perf_counter()
        for i, (row, token) in enumerate(zip(rows, chosen, strict=True)):
            if finished[i]:
                continue
            if token in self.stop_ids:
                finished[i], row.finish_reason = True, "stop"
                finished_on_device[i] = True  # a device-side write: no sync
                continue
            if not row.detok.ids:
                row.first_at = now
            row.last_at = now
            piece, row.stopped_at_text = row.stop.push(row.detok.push(token))
            if piece:
                row.pieces.append(piece)
                if on_chunk is not None:
                    on_chunk(i, piece)
            if row.stopped_at_text:
                finished[i], row.finish_reason = True, "stop"
                finished_on_device[i] = True

    def _finish_rows(
        self,
        rows: list[_Row],
        finished: list[bool],
        cancelled: bool,
        on_chunk: Callable[[int, str], None] | None,
        started: float,
    ) -> list[dict[str, Any]]:
        """Flush each answered row's last text and say why it ended; its result dict."""
        results = []
        for i, row in enumerate(rows):
            tail = ""
            if not row.stopped_at_text:
                tail, row.stopped_at_text = row.stop.end(row.detok.flush())
                if row.stopped_at_text:
                    finished[i], row.finish_reason = True, "stop"
            if tail:
                row.pieces.append(tail)
                if on_chunk is not None:
                    on_chunk(i, tail)
            if not finished[i]:
                row.finish_reason = "cancelled" if cancelled else "length"
            results.append(row.result(started))
        return results

    def _steps(
        self, mode: str, ids: Any, mask: Any, cfg: GenerationConfig, fused: Any, names: tuple[str, ...]
    ) -> Any:
        """The decode steps for this batch: a fresh dynamic cache, or the static decoder (reused
        when the last request had the same rows, adapters and options and this one fits)."""
        from .decode_steps import CACHE_ROUNDING, DynamicSteps, StaticDecoder

        if mode == "dynamic":
            self._decoder = None
            return DynamicSteps(self.loaded.model, ids, mask)
        graphs = mode == "graphs"
        if graphs and fused is None and self.peft is not None:
            # PEFT's own mixed-batch forward picks each adapter's rows with a Python list, a
            # host-to-device copy that a CUDA graph cannot capture.
            graphs = False
            if names not in self._eager_batches_noted:
                self._eager_batches_noted.add(names)
                log.warning(
                    "decoding eagerly (no CUDA graph): the adapters %s use a LoRA variant that only "
                    "PEFT's own mixed-batch forward serves, and it copies row indices from the host",
                    ", ".join(sorted(set(names) - {PEFT_BASE})),
                )
        needed = ids.shape[1] + cfg.max_new_tokens
        # The graphs bake in which adapter each row runs (PEFT's own forward slices by name).
        key = (
            names,
            id(fused),
            graphs,
            self.attention_window,
            self.packed_gqa,
            self.fused_kernels,
            self.compile_step,
        )
        decoder = self._decoder
        if decoder is None or not decoder.fits(key, needed):
            self._decoder = decoder = None  # the old cache and graphs go before the new ones come
            decoder = StaticDecoder(
                self.loaded.model,
                ids.shape[0],
                -(-needed // CACHE_ROUNDING) * CACHE_ROUNDING,
                ids.device,
                graphs=graphs,
                window=self.attention_window,
                forward=self._compiled_step_fn(),
                key=key,
                keepalive=fused,
            )
            self._decoder = decoder
        decoder.reset(ids, mask)
        return decoder

    def _attention(self) -> Any:
        from contextlib import nullcontext

        from .decode_steps import packed_gqa_attention

        return packed_gqa_attention() if self.packed_gqa else nullcontext()

    def _kernels(self) -> Any:
        from contextlib import nullcontext

        from ..models.kernels import liger_kernels

        if not self.fused_kernels:
            return nullcontext()
        return liger_kernels(self.loaded.model, rope_in_place=not self.compile_step)

    def _compiled_step_fn(self) -> Any:
        """torch.compile of one decode forward, made once per session (compile_step only)."""
        if not self.compile_step:
            return None
        if self._compiled_step is None:
            import torch

            from .decode_steps import cache_keyword, decode_forward

            cache_keyword(type(self.loaded.model))  # asked here: torch.compile should not trace inspect
            self._compiled_step = torch.compile(decode_forward, dynamic=False)
        return self._compiled_step
