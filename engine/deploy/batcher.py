"""Continuous batching for `tunebench deploy`: one thread owns the model and decodes every request.

Requests arrive from the HTTP handlers through `Batcher.submit` and wait in a bounded queue. The
batcher thread loops: it takes waiting requests while fewer than `max_num_seqs` decode, prefills
each one on its own (its first token streams out at once; a long prompt in pieces of
PREFILL_CHUNK_TOKENS, with a decode step for the running sequences between two pieces), puts it
in a free row of the running batch, and runs one decode step for every sequence in the batch. A
sequence leaves the batch the step it ends (a stop token, a stop string, its token limit, or its
client gone), so a short answer never waits for a long one, a new request never waits for the
batch to drain, and a long prompt holds the others up by one piece at a time.

Rows of one batch may run different adapters: each step goes through the same mixed-adapter
forward as the side-by-side chat (infer/lora_decode.FusedLora, else PEFT's own mixed batch), over
one copy of the base weights. One fused forward stacks every served adapter; a step only rewrites
which adapter each row takes (FusedLora.set_rows), in place.

The KV cache is one [max rows, kv heads, slots, head dim] tensor per layer, allocated once and
grown (in CACHE_ROUNDING steps) only when a sequence needs more slots. Row i holds its sequence's
tokens in slots 0..length-1 and writes the next one at slot `length` (RowCache below), so a
sequence's keys sit in the same slots whatever else is in the batch, and attention masks only
what lies past each row's own length. A decode step runs the first `bucket` rows (the smallest
of BATCH_SIZES that holds every sequence; the rest are idle padding) over an attention window
rounded up to ATTENTION_WINDOW slots: nothing in a step's shapes or addresses changes while
sequences join and leave, so on CUDA each (bucket, window) is captured once as a CUDA graph
(infer/decode_steps.StepGraphs, as the chat's decode) and replayed; on the CPU the same step runs
eagerly. Before the server says it is ready, the batcher runs a prefill for every served name and
a decode step at every bucket (`_warm_up`), so no client pays the start-up costs.

Events flow back through each sequence's `emit` callback (the HTTP side turns it into a put on
an asyncio queue), which never blocks: a slow client only lets its own queue grow.
"""

from __future__ import annotations

import collections
import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..infer.decode_steps import ATTENTION_WINDOW, CACHE_ROUNDING
from ..infer.lora_decode import PEFT_BASE
from ..infer.prompts import StopText

# A lone sequence decodes beside an idle row, as the chat's lone column does (generate.py's ghost
# row): CPU matmul kernels take another path for a single row (M=1) and round its last bits
# differently, which could tip a near-tie and make an answer alone differ from the same in a batch.
SMALLEST_BATCH = 2
WARM_UP_PROMPT = "Hello"
# A longer prompt is prefilled in pieces of this many tokens, with a decode step for the running
# sequences between two pieces: a 32k-token prompt would otherwise stop every other stream for
# its whole prefill. The pieces depend on the prompt alone, so an answer does not depend on what
# else is being served.
PREFILL_CHUNK_TOKENS = 2048


def batch_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """The row counts a decode step runs with: powers of two from SMALLEST_BATCH, and the most."""
    most = max(SMALLEST_BATCH, max_num_seqs)
    sizes = [SMALLEST_BATCH]
    while sizes[-1] * 2 < most:
        sizes.append(sizes[-1] * 2)
    return tuple(sorted(set(sizes) | {most}))


class QueueFull(Exception):
    """Every decode slot and every queue place is taken: the HTTP side answers 429."""


class BatcherStopped(Exception):
    """The server is shutting down and takes no more requests."""


# What a client whose answer the shutdown cuts is told (503: the server, not the request).
SHUTTING_DOWN = "the server is shutting down: this answer ends here; send the request again once it is back"


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens whatever comes (benchmarks)


@dataclass(frozen=True)
class Delta:
    """A piece of answer text."""

    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 500  # the HTTP status a whole (non-streamed) answer gets


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Sequence:
    """One request: a prompt for one served name, how to sample, and where its events go."""

    served_name: str
    peft_name: str  # the adapter its rows run with, PEFT_BASE for the base model
    prompt: list[int]
    options: SamplingOptions
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Called from the HTTP side when the client is gone: the row leaves at the next step."""
        self.cancelled.set()


@dataclass
class Metrics:
    """Counters for /metrics; written by the batcher thread, read by the HTTP side."""

    finished: collections.Counter = field(default_factory=collections.Counter)  # (name, reason)
    rejected: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # rows summed over steps: decode_rows / decode_steps is the mean batch
    running: int = 0
    waiting: int = 0
    cache_slots: int = 0  # rows x slots of the KV cache as allocated now


class RowCache:
    """A KV cache where each row writes its new token at its own slot (its length so far).

    transformers' caches write every row at the same position; continuous batching needs each
    row at its own. The model calls `update` once per layer per forward pass; the batcher sets
    `write_at` (one slot for each of the first rows) and `window` (slots attention reads) before
    each step.
    """

    def __init__(self, layers: int) -> None:
        self.keys: list[Any] = [None] * layers
        self.values: list[Any] = [None] * layers
        self.write_at: Any = None
        self.rows_index: Any = None  # arange over every row of the cache
        self.window = 0

    def layer_cache(self) -> Any:
        """A transformers Cache object over these tensors (built once; it holds no tensors itself)."""
        from transformers.cache_utils import Cache, CacheLayerMixin

        owner = self

        class _RowLayer(CacheLayerMixin):
            is_sliding = False
            is_compileable = False

            def __init__(self, index: int) -> None:
                super().__init__()
                self.index = index
                self.is_initialized = True

            def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
                pass

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
                return owner.update(self.index, key_states, value_states)

            def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
                return owner.window, 0

            def get_seq_length(self) -> int:
                return owner.window

            def get_max_length(self) -> int:
                return -1

        return Cache(layers=[_RowLayer(i) for i in range(len(self.keys))])

    def update(self, layer: int, key_states: Any, value_states: Any) -> tuple[Any, Any]:
        keys, values = self.keys[layer], self.values[layer]
        rows = key_states.shape[0]
        # key_states: [rows, kv heads, 1, head dim] -> row r's slot write_at[r]
        keys[self.rows_index[:rows], :, self.write_at] = key_states[:, :, 0]
        values[self.rows_index[:rows], :, self.write_at] = value_states[:, :, 0]
        return keys[:rows, :, : self.window], values[:rows, :, : self.window]


@dataclass(eq=False)
class _Row:
    seq: Sequence
    length: int  # tokens in the KV cache
    limit: int  # most tokens it may produce
    detok: Any
    stop: StopText
    generator: Any  # torch.Generator for sampled rows, None for greedy ones
    next_token: int = 0
    generated: int = 0
    slot: int = -1  # its row in the KV cache, -1 until placed


class Batcher:
    """The thread that owns the model and decodes every request in one continuous batch."""

    def __init__(self, served: Any, *, max_num_seqs: int, max_queue: int, max_model_len: int) -> None:
        self.served = served
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.metrics = Metrics()
        self._lock = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._rows: list[_Row] = []
        # Taken off the queue, not yet in _rows: they count as running, or a long prefill would let
        # more requests in than --max_num_seqs + --max_queue.
        self._joining: collections.deque[Sequence] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batch_sizes = batch_sizes(max_num_seqs)
        self._cache: RowCache | None = None
        self._cache_object: Any = None
        self._capacity = 0  # slots per row in the cache
        self._step_inputs: Any = None  # [2, rows] on the device: each row's token, then its write slot
        self._fused: Any = None  # the FusedLora over every served adapter, once built
        self._fused_built = False
        self._cuda = served.device.type == "cuda"
        self._graphs: Any = None  # StepGraphs on CUDA, keyed (bucket, window)
        if self._cuda:
            from ..infer.decode_steps import StepGraphs

            self._graphs = StepGraphs()
        pad = served.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else 0
        self._ready = threading.Event()
        self._warm_up_error = ""

    # ------------------------------------------------------------ HTTP side

    def submit(self, seq: Sequence) -> None:
        """Queue a request; QueueFull when every slot and queue place is taken."""
        with self._lock:
            if self._stopping:
                raise BatcherStopped(SHUTTING_DOWN)
            if self.metrics.running + len(self._waiting) >= self.max_num_seqs + self.max_queue:
                self.metrics.rejected += 1
                # Counted together: requests not yet admitted wait even while slots are free.
                raise QueueFull(
                    f"{self.metrics.running + len(self._waiting)} requests are in ({self.metrics.running} "
                    f"decoding, {len(self._waiting)} waiting to start), the most this server takes at once "
                    f"(--max_num_seqs {self.max_num_seqs} + --max_queue {self.max_queue})"
                )
            self._waiting.append(seq)
            self.metrics.waiting = len(self._waiting)
            self._lock.notify()

    def start(self) -> None:
        if self._cuda and self.served.fuse_base:
            from ..infer.lora_decode import fuse_sibling_weights

            fuse_sibling_weights(self.served.loaded.model)  # before inference_mode: see infer/lora_decode
        self._thread = threading.Thread(target=self._run, name="tunebench-deploy-batcher", daemon=True)
        self._thread.start()
        self._ready.wait()  # the warm-up: the server listens only once the model has run
        if self._warm_up_error:
            self._thread.join()
            raise RuntimeError(f"the model failed its warm-up run: {self._warm_up_error}")

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, fail the ones waiting or decoding, and end the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        import torch

        attention = nullcontext()
        if self._cuda:
            from ..infer.decode_steps import packed_gqa_attention

            attention = packed_gqa_attention()
        with torch.inference_mode(), attention:
            try:
                self._warm_up()
            except Exception as exc:  # noqa: BLE001 - start() raises it in the caller's thread
                self._warm_up_error = _describe(exc)
                return
            finally:
                self._ready.set()
            while self._next_work():
                while self._joining:
                    seq = self._joining[0]
                    try:
                        self._admit(seq)
                    except Exception as exc:  # noqa: BLE001 - one bad prompt must not fail the others
                        if self._joining and self._joining[0] is seq:  # it failed before it had a row
                            self._joining.popleft()
                            _emit(seq, Failed(_describe(exc), 500))
                            self.metrics.finished[(seq.served_name, "error")] += 1
                        self._fail_rows([r for r in self._rows if r.seq is seq], _describe(exc))
                self._decode_running()
        self._fail_rows(list(self._rows), SHUTTING_DOWN, drop_cache=True, status=503)
        with self._lock:
            for seq in self._waiting:
                _emit(seq, Failed(SHUTTING_DOWN, 503))
            self._waiting.clear()

    def _decode_running(self) -> None:
        """One decode step for the sequences in the batch (those whose prefill is done), the
        finished and the abandoned dropped before and after."""
        self._drop_finished()
        if not any(row.slot >= 0 for row in self._rows):
            return
        try:
            self._step()
        except Exception as exc:  # noqa: BLE001 - one bad batch must not take the server down
            self._fail_rows(list(self._rows), _describe(exc), drop_cache=True)
        self._drop_finished()

    def _next_work(self) -> bool:
        """Block until there is something to do, and move the requests that join the batch now to
        _joining; False: stop."""
        with self._lock:
            while not self._stopping and not self._waiting and not self._rows:
                self._lock.wait()
            if self._stopping:
                return False
            # A client that left while queued gives up its place now, and counts as cancelled.
            for seq in [s for s in self._waiting if s.cancelled.is_set()]:
                self._waiting.remove(seq)
                self.metrics.finished[(seq.served_name, "cancelled")] += 1
            while self._waiting and len(self._rows) + len(self._joining) < self.max_num_seqs:
                self._joining.append(self._waiting.popleft())
            self.metrics.waiting = len(self._waiting)
            self._count_running()
            return True

    def _admit(self, seq: Sequence) -> None:
        """Prefill one request on its own, stream its first token, and put it in a free row."""
        import torch

        from ..infer.prompts import IncrementalDetokenizer

        options = seq.options
        generator = None
        if options.temperature > 0:
            generator = torch.Generator(device=self.served.device)
            seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            generator.manual_seed(seed)
        row = _Row(
            seq=seq,
            length=len(seq.prompt),
            limit=max(0, min(options.max_tokens, self.max_model_len - len(seq.prompt))),
            detok=IncrementalDetokenizer(self.served.tokenizer),
            stop=StopText(options.stop),
            generator=generator,
        )
        self.metrics.prompt_tokens += len(seq.prompt)
        # In the batch from here on, so that a failure or a client leaving reaches it (_fail_rows,
        # _drop_finished); with no slot until its prefill is done, no decode step includes it.
        self._joining.popleft()
        self._rows.append(row)
        if row.limit == 0:
            self._finish(row, "length")
            return
        prefilled = self._prefill(seq.peft_name, seq.prompt, between=lambda: self._between_pieces(row))
        if prefilled is None:  # the client left, or a decode step between two pieces failed
            return
        logits, kv = prefilled
        self._place(row, kv)
        self._accept(row, self._pick(logits, [row])[0])

    def _between_pieces(self, row: _Row) -> bool:
        """Between two pieces of a long prefill: a decode step for the running sequences; whether
        the prefill goes on (its row still in the batch)."""
        self._decode_running()
        return row in self._rows

    def _prefill(
        self, peft_name: str, prompt: list[int], between: Callable[[], bool] | None = None
    ) -> tuple[Any, list[tuple[Any, Any]]] | None:
        """The prompt's last logits and its keys/values per layer ([1, kv heads, tokens, head dim]),
        prefilled in pieces of PREFILL_CHUNK_TOKENS; `between` runs after each piece but the last
        (None from it: stop, and return None)."""
        import torch
        from transformers import DynamicCache

        from ..infer.decode_steps import decode_forward

        ids = torch.tensor([prompt], dtype=torch.long, device=self.served.device)
        positions = torch.arange(len(prompt), device=self.served.device)[None]
        cache = DynamicCache(config=self.served.loaded.model.config)
        # Alone, with no padding and no mask: the same computation however many requests are in
        # flight, so a request's first token never depends on what else is being served.
        for start in range(0, len(prompt), PREFILL_CHUNK_TOKENS):
            end = start + PREFILL_CHUNK_TOKENS
            with self._adapters((peft_name,)):
                logits = decode_forward(
                    self.served.loaded.model, cache, ids[:, start:end], None, positions[:, start:end]
                )
            if end < len(prompt) and between is not None and not between():
                return None
        return logits, [(layer.keys, layer.values) for layer in cache.layers]

    def _step(self) -> None:
        """One decode step for every row of the batch whose prefill is done."""
        self._compact()
        placed = [row for row in self._rows if row.slot >= 0]
        bucket = next(size for size in self.batch_sizes if size >= len(placed))
        by_row: list[_Row | None] = [None] * bucket
        for row in placed:
            by_row[row.slot] = row
        logits = self._decode(
            bucket,
            [r.next_token if r else self._pad_id for r in by_row],
            [r.length if r else 0 for r in by_row],
            tuple(r.seq.peft_name if r else PEFT_BASE for r in by_row),
        )
        self.metrics.decode_steps += 1
        self.metrics.decode_rows += len(placed)
        for row, token in zip(by_row, self._pick(logits, by_row), strict=True):
            if row is not None:
                row.length += 1
                self._accept(row, token)

    def _decode(self, bucket: int, tokens: list[int], lengths: list[int], names: tuple[str, ...]) -> Any:
        """Logits of one decode step over the first `bucket` rows: row i takes tokens[i] at slot
        lengths[i] with adapter names[i]. A CUDA graph replay where it can be."""
        import torch

        from ..infer.decode_steps import decode_forward

        self._grow_cache(max(lengths) + 1)
        window = min(self._capacity, math.ceil((max(lengths) + 1) / ATTENTION_WINDOW) * ATTENTION_WINDOW)
        inputs = self._step_inputs
        inputs[:, :bucket].copy_(torch.tensor([tokens, lengths], dtype=torch.long))  # one host-to-device copy
        cache = self._cache
        assert cache is not None
        model = self.served.loaded.model

        def forward() -> Any:
            ids, write_at = inputs[0, :bucket, None], inputs[1, :bucket]
            cache.write_at, cache.window = write_at, window
            # Row r may attend to slots 0..length_r (its tokens so far and the one being written).
            visible = torch.arange(window, device=write_at.device)[None, :] <= write_at[:, None]
            mask = torch.zeros(visible.shape, dtype=cache.keys[0].dtype, device=write_at.device)
            mask.masked_fill_(~visible, float("-inf"))
            return decode_forward(model, self._cache_object, ids, mask[:, None, None, :], write_at[:, None])

        key = (bucket, window)
        replay = self._graphs is not None and self._graphs.ready(key)
        with self._adapters(names, install=not replay) as capturable:
            if self._graphs is not None and capturable:
                return self._graphs.run(key, forward)
            return forward()

    def _warm_up(self) -> None:
        """Run what a request runs before any client comes: a prefill with every served name and
        a decode step at every batch size (on CUDA, that captures their graphs). The first forward
        passes pay CUDA, cuBLAS and allocator start-up, which would otherwise land on the first
        requests' time to first token. Nothing of it shows in the metrics."""
        prompt = self.served.encode_text(WARM_UP_PROMPT) or [self._pad_id]
        names = list(dict.fromkeys(t.peft_name for t in self.served.targets.values()))
        for name in names:
            _, kv = self._prefill(name, prompt)
        self._grow_cache(len(prompt) + 1, sample=kv)
        for bucket in self.batch_sizes:
            rows = [names[i % len(names)] for i in range(bucket)]
            self._decode(bucket, [self._pad_id] * bucket, [len(prompt)] * bucket, tuple(rows))

    # ------------------------------------------------------------ rows

    def _pick(self, logits: Any, rows: list[_Row | None]) -> list[int]:
        """The next token of each row: argmax for greedy rows (and idle ones), else its own seeded draw."""
        import torch

        greedy = logits.argmax(dim=-1).tolist()  # a host sync; streaming needs the ids anyway
        picks = []
        for i, row in enumerate(rows):
            if row is None or row.generator is None:
                picks.append(greedy[i])
                continue
            scores = logits[i].float() / row.seq.options.temperature
            top_p = row.seq.options.top_p
            if top_p < 1.0:
                ordered, order = torch.sort(scores, descending=True)
                probs = ordered.softmax(dim=-1)
                # Drop a token once the more likely ones already hold top_p of the mass (keep the first).
                ordered = ordered.masked_fill(probs.cumsum(dim=-1) - probs > top_p, float("-inf"))
                scores = torch.full_like(scores, float("-inf")).scatter(0, order, ordered)
            picks.append(int(torch.multinomial(scores.softmax(dim=-1), 1, generator=row.generator)))
        return picks

    def _accept(self, row: _Row, token: int) -> bool:
        """Take a row's new token; True when the row has finished."""
        if token in self.served.stop_ids and not row.seq.options.ignore_eos:
            self._finish(row, "stop")
            return True
        row.generated += 1
        row.next_token = token
        self.metrics.generation_tokens += 1
        piece = row.detok.push(token)
        if piece:
            text, stopped = row.stop.push(piece)
            if text:
                _emit(row.seq, Delta(text))
            if stopped:
                self._finish(row, "stop", flush=False)
                return True
        if row.generated >= row.limit:
            self._finish(row, "length")
            return True
        return False

    def _finish(self, row: _Row, reason: str, flush: bool = True) -> None:
        text = ""
        if flush:
            text, stopped = row.stop.end(row.detok.flush())
            reason = "stop" if stopped else reason
        # Out of the batch and the counts first: a client that reads /health right after its
        # answer must not still see itself running.
        if row in self._rows:
            self._rows.remove(row)
        self.metrics.finished[(row.seq.served_name, reason)] += 1
        self._count_running()
        if text:
            _emit(row.seq, Delta(text))
        _emit(row.seq, Finished(reason, len(row.seq.prompt), row.generated))

    def _drop_finished(self) -> None:
        """Rows whose client has gone leave the batch; the lock-protected counts follow."""
        for row in [r for r in self._rows if r.seq.cancelled.is_set()]:
            self._rows.remove(row)
            self.metrics.finished[(row.seq.served_name, "cancelled")] += 1
        self._count_running()

    def _count_running(self) -> None:
        """What /metrics and submit's limit count as running: the batch's rows and the requests
        joining it (its lock is reentrant: callers may hold it)."""
        with self._lock:
            self.metrics.running = len(self._rows) + len(self._joining)

    def _fail_rows(self, rows: list[_Row], message: str, drop_cache: bool = False, status: int = 500) -> None:
        """Tell these rows' clients their request failed and drop the rows; drop_cache after a
        failed decode step (the cache may be half-written; every row fails then)."""
        for row in rows:
            _emit(row.seq, Failed(message, status))
            self.metrics.finished[(row.seq.served_name, "error")] += 1
            if row in self._rows:
                self._rows.remove(row)
        if drop_cache:
            self._drop_cache()
        self._count_running()

    # ------------------------------------------------------------ the KV cache

    def _drop_cache(self) -> None:
        self._cache, self._cache_object, self._capacity, self._step_inputs = None, None, 0, None
        for row in self._rows:
            row.slot = -1
        if self._graphs is not None:
            self._graphs.clear()
        self.metrics.cache_slots = 0

    def _grow_cache(self, needed: int, sample: list[tuple[Any, Any]] | None = None) -> None:
        """A cache of every row with at least `needed` slots each: made on first use (shaped like
        `sample`, a prefill's keys/values), else grown with the rows' slots copied. Growing moves
        the cache, so the CUDA graphs that read it go."""
        import torch

        if self._cache is not None and needed <= self._capacity:
            return
        capacity = math.ceil(needed / CACHE_ROUNDING) * CACHE_ROUNDING
        old = self._cache
        layers = len(old.keys) if old is not None else len(sample or ())
        assert layers, "the first cache is shaped like a prefill's keys/values"
        rows, device = self.batch_sizes[-1], self.served.device
        cache = RowCache(layers)
        for layer in range(layers):
            for store, part in ((cache.keys, 0), (cache.values, 1)):
                if old is not None:
                    source = (old.keys if part == 0 else old.values)[layer]
                else:
                    source = sample[layer][part]  # type: ignore[index]
                _, kv_heads, _, head_dim = source.shape
                tensor = torch.zeros((rows, kv_heads, capacity, head_dim), dtype=source.dtype, device=device)
                if old is not None:
                    tensor[:, :, : self._capacity] = source
                store[layer] = tensor
        cache.rows_index = torch.arange(rows, device=device)
        if self._step_inputs is None:
            self._step_inputs = torch.zeros((2, rows), dtype=torch.long, device=device)
        self._cache, self._capacity = cache, capacity
        self._cache_object = cache.layer_cache()
        if self._graphs is not None:
            self._graphs.clear()
        self.metrics.cache_slots = rows * capacity

    def _place(self, row: _Row, kv: list[tuple[Any, Any]]) -> None:
        """Copy a prefill's keys/values into the lowest free row of the cache."""
        self._grow_cache(row.length + 1, sample=kv)
        cache = self._cache
        assert cache is not None
        taken = {r.slot for r in self._rows}
        row.slot = next(i for i in range(len(cache.rows_index)) if i not in taken)
        for layer, (keys, values) in enumerate(kv):
            cache.keys[layer][row.slot, :, : keys.shape[2]] = keys[0]
            cache.values[layer][row.slot, :, : values.shape[2]] = values[0]

    def _compact(self) -> None:
        """Move the rows past the first len(rows) into the free rows before them, so a step over
        the first `bucket` rows covers every sequence."""
        placed = [r for r in self._rows if r.slot >= 0]
        count = len(placed)
        cache = self._cache
        assert cache is not None
        free = sorted(set(range(count)) - {r.slot for r in placed})
        for row in [r for r in placed if r.slot >= count]:
            to = free.pop(0)
            for store in (cache.keys, cache.values):
                for tensor in store:
                    tensor[to] = tensor[row.slot]
            row.slot = to

    # ------------------------------------------------------------ adapters

    @contextmanager
    def _adapters(self, names: tuple[str, ...], install: bool = True) -> Iterator[bool]:
        """Within this block a forward pass runs row i with adapter names[i] (PEFT_BASE: none).
        Yields whether the forward can be captured as a CUDA graph (PEFT's own mixed batch copies
        row indices from the host, so it cannot). install=False: only the row masks are set (a
        graph replay reads them; the modules' forwards are not called)."""
        from ..infer.lora_decode import FusedLora

        served = self.served
        if served.peft is None and not served.fuse_base:
            yield True
            return
        if not self._fused_built:
            peft_names = [t.peft_name for t in served.targets.values() if not t.is_base]
            self._fused = FusedLora.build(
                served.model,
                [PEFT_BASE] * self.batch_sizes[-1],
                fuse_base=served.fuse_base,
                adapters=peft_names,
            )
            self._fused_built = True
        fused = self._fused
        if fused is not None:
            fused.set_rows(names)
            if not install:
                yield True
                return
            with fused.installed():
                yield True
            return
        # Any LoRA variant the fused path does not cover: PEFT's own mixed-batch forward.
        with served.peft._enable_peft_forward_hooks(adapter_names=list(names)):
            yield False


def _describe(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"generation failed: {type(exc).__name__}{': ' + first if first else ''}"


def _emit(seq: Sequence, event: Event) -> None:
    try:
        seq.emit(event)
    except Exception:  # noqa: BLE001 - the HTTP side has gone (its event loop closed): drop the row
        seq.cancel()
