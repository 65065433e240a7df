"""The HTTP side of `tunebench deploy`: OpenAI's chat and completions API over the batcher.

Handlers validate a request, turn it into prompt tokens and hand it to the batcher thread; they
never touch the model. Each request's events come back through its own asyncio queue (the
batcher puts into it thread-safely and never waits), so a slow reader only slows itself. A client
that goes away, mid-stream or while waiting for a whole answer, cancels its sequence and frees
its decode slot at the next step.

Errors carry OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, with the status
the official clients map to their exceptions: 400 bad request, 401 key, 404 model, 429 busy.
This module imports FastAPI at the top (its handlers' annotations must resolve); command.py
imports it only when a server starts.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..core.errors import UserError
from ..infer.prompts import TemplateWithoutTools
from .batcher import Batcher, BatcherStopped, Delta, Failed, Finished, QueueFull, Sequence
from .tool_parser import StreamedToolCalls, split_tool_calls
from .validation import (
    DEFAULT_MAX_REQUEST_BYTES,
    ApiError,
    Defaults,
    chat_messages,
    chat_tools,
    check_unsupported,
    completion_prompts,
    flag,
    read_json,
    sampling_options,
)

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")


def create_app(
    served: Any,
    batcher: Batcher,
    *,
    defaults: Defaults,
    max_model_len: int,
    model_context: int | None = None,
    api_key: str = "",
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> Any:
    """The ASGI app serving `served` (ServedModels) through `batcher`; `model_context` is the
    model's own context length, if its config names one."""
    app = FastAPI(title="TuneBench deploy", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    http_counts: collections.Counter = collections.Counter()
    app.add_middleware(_CountRequests, counts=http_counts)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> Response:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> Response:
        known = {404: ("no such route", "not_found"), 405: ("method not allowed", "method_not_allowed")}
        message, code = known.get(exc.status_code, (str(exc.detail), None))
        error = ApiError(exc.status_code, f"{message}; routes: {', '.join(ROUTES)}", code=code)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    def check_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not given.strip():  # also "Bearer ", from a shell variable meant to hold the key that is unset
            raise ApiError(
                401,
                "no API key: send the header 'Authorization: Bearer <key>' with the key this server "
                "was started with (--api_key); an empty key comes from a shell variable that is not set",
                code="invalid_api_key",
            )
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "wrong API key", code="invalid_api_key")

    def target_of(body: dict[str, Any]) -> Any:
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise ApiError(
                400,
                f"'model' must be a string: one of {', '.join(served.targets)}",
                param="model",
                code="invalid_model",
            )
        if not name:
            raise ApiError(
                400,
                f"'model' is required: one of {', '.join(served.targets)}",
                param="model",
                code="missing_model",
            )
        target = served.targets.get(name)
        if target is None:
            raise ApiError(
                404,
                f"the model {name!r} does not exist here; this server serves {', '.join(served.targets)}",
                param="model",
                code="model_not_found",
            )
        return target

    async def run(
        request: Request,
        body: dict[str, Any],
        target: Any,
        prompts: list[list[int]],
        shape: Callable[..., Any],
    ) -> Response:
        """Submit one sequence per prompt (several only for /v1/completions); answer as a stream
        of chunks or as one object, the choices in the prompts' order."""
        options = [sampling_options(body, len(p), defaults, max_model_len, model_context) for p in prompts]
        stream = flag(body, "stream")
        if body.get("stream_options") is not None and not stream:
            raise ApiError(
                400, "'stream_options' is only allowed with \"stream\": true", param="stream_options"
            )
        include_usage = stream and flag(body.get("stream_options") or {}, "include_usage", "stream_options")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()  # (choice index, event)

        def emitter(index: int) -> Callable[[Any], None]:
            return lambda event: loop.call_soon_threadsafe(events.put_nowait, (index, event))

        room = batcher.max_num_seqs + batcher.max_queue
        if len(prompts) > room:  # refused whenever it comes: a 429's "retry" would not help
            raise ApiError(
                400,
                f"'prompt' holds {len(prompts)} prompts; this server takes at most {room} at once "
                f"(--max_num_seqs {batcher.max_num_seqs} + --max_queue {batcher.max_queue}): "
                "send fewer a request",
                param="prompt",
            )
        seqs = [
            Sequence(target.name, target.peft_name, prompt, opts, emit=emitter(i))
            for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True))
        ]
        try:
            for seq in seqs:
                batcher.submit(seq)
        except (QueueFull, BatcherStopped) as exc:
            for seq in seqs:
                seq.cancel()  # the prompts already queued leave with the rest
            if isinstance(exc, BatcherStopped):
                raise ApiError(503, str(exc), kind="server_error") from None
            raise ApiError(
                429,
                f"the server is busy: {exc}; retry shortly",
                kind="rate_limit_error",
                code="queue_full",
            ) from None
        if stream:
            return StreamingResponse(
                _sse(seqs, events, shape, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        pieces: list[list[str]] = [[] for _ in seqs]
        finished: dict[int, Finished] = {}
        check_at = loop.time() + DISCONNECT_POLL_S
        try:
            while len(finished) < len(seqs):
                try:
                    index, event = await asyncio.wait_for(events.get(), max(0.0, check_at - loop.time()))
                except asyncio.TimeoutError:
                    event = None
                # Checked on a clock, not only when no token came: tokens may arrive faster than that.
                if loop.time() >= check_at:
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; the slots are freed below
                    check_at = loop.time() + DISCONNECT_POLL_S
                if event is None:
                    continue
                if isinstance(event, Delta):
                    pieces[index].append(event.text)
                elif isinstance(event, Finished):
                    finished[index] = event
                else:
                    raise ApiError(event.status, event.message, kind="server_error")
            answers = [shape("".join(pieces[i]), finished[i]) for i in range(len(seqs))]
            return JSONResponse(_together(answers, _usage(*finished.values())))
        finally:
            for seq in seqs:
                seq.cancel()  # a no-op once finished; otherwise the row leaves the batch

    @app.get("/health")
    async def health() -> Response:
        ok = batcher.alive
        return JSONResponse(
            {
                "status": "ok" if ok else "stopped",
                "models": list(served.targets),
                "running": batcher.metrics.running,
                "waiting": batcher.metrics.waiting,
            },
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        check_key(request)
        return PlainTextResponse(
            prometheus_text(batcher, http_counts), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    def model_card(target: Any) -> dict[str, Any]:
        return {
            "id": target.name,
            "object": "model",
            "created": created,
            "owned_by": "tunebench",
            "root": str(target.adapter_dir or served.loaded.resolved.path),
            "parent": None if target.is_base else served.base_name,
            "max_model_len": max_model_len,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [model_card(t) for t in served.targets.values()]})

    @app.get("/v1/models/{name:path}")  # served names may hold '/': runid/step-4
    async def model(request: Request, name: str) -> Response:
        check_key(request)
        return JSONResponse(model_card(target_of({"model": name})))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        body = await read_json(request, max_request_bytes)
        target = target_of(body)
        messages = chat_messages(body)
        check_unsupported(body)
        tools, read_calls = chat_tools(body)
        try:
            prompt = await run_in_threadpool(served.encode_chat, target.name, messages, tools)
        except TemplateWithoutTools as exc:
            raise ApiError(
                400,
                f"{exc.message}: {exc.hint}",
                param="tools" if tools else "messages",
                code="tools_not_supported",
            ) from None
        except UserError as exc:
            raise ApiError(400, exc.message, param="messages", code="template_error") from None
        ident, stamp = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        # A streamed answer's calls are known only once they are whole: held, and sent at the end.
        streamed_calls = StreamedToolCalls() if read_calls else None

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": stamp,
                "model": target.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }

        def shape(text: str | None, event: Finished | None, first: bool = False) -> Any:
            if text is not None and event is not None:  # the whole answer at once
                message: dict[str, Any] = {"role": "assistant", "content": text}
                finish_reason = event.finish_reason
                content, calls = split_tool_calls(text) if read_calls else (text, [])
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    finish_reason = "tool_calls"
                return {
                    "id": ident,
                    "object": "chat.completion",
                    "created": stamp,
                    "model": target.name,
                    "choices": [
                        {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
                    ],
                    "usage": _usage(event),
                }
            if first:
                return [chunk({"role": "assistant", "content": ""})]
            if event is None:  # a piece of the answer
                if streamed_calls is not None:
                    text = streamed_calls.push(text or "")
                    if not text:
                        return []
                return [chunk({"content": text})]
            chunks, finish_reason = [], event.finish_reason
            if streamed_calls is not None:
                rest, calls = streamed_calls.finish()
                if rest:
                    chunks.append(chunk({"content": rest}))
                for index, call in enumerate(calls):
                    chunks.append(chunk({"tool_calls": [{"index": index, **call}]}))
                finish_reason = "tool_calls" if calls else finish_reason
            return [*chunks, chunk({}, finish_reason)]

        return await run(request, body, target, [prompt], shape)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_key(request)
        body = await read_json(request, max_request_bytes)
        target = target_of(body)
        check_unsupported(body)
        given = completion_prompts(body, served.vocab_size)
        prompts = await run_in_threadpool(  # one trip to a worker thread for the whole batch
            lambda: [served.encode_text(p) if isinstance(p, str) else p for p in given]
        )
        ident, stamp = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def shape(text: str | None, event: Finished | None, first: bool = False) -> Any:
            if first:
                return []  # completions streams have no role chunk: the first chunk carries text
            choice = {
                "index": 0,
                "text": text or "",
                "logprobs": None,
                "finish_reason": event.finish_reason if event is not None else None,
            }
            out = {
                "id": ident,
                "object": "text_completion",
                "created": stamp,
                "model": target.name,
                "choices": [choice],
            }
            if text is not None and event is not None:
                out["usage"] = _usage(event)
                return out
            return [out]

        return await run(request, body, target, prompts, shape)

    return app


# ---------------------------------------------------------------- output


def _usage(*events: Finished) -> dict[str, int]:
    """OpenAI's usage of one answer, or summed over a batch's answers."""
    prompt = sum(e.prompt_tokens for e in events)
    completion = sum(e.completion_tokens for e in events)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------- streaming


def _chunk(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _together(answers: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
    """One answer object for several prompts: each one's choice at its index, and their usage."""
    if len(answers) == 1:
        return answers[0]
    choices = [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]
    return {**answers[0], "choices": choices, "usage": usage}


async def _sse(
    seqs: list[Sequence], events: asyncio.Queue, shape: Callable[..., Any], include_usage: bool
) -> AsyncIterator[bytes]:
    """OpenAI's chunk stream: a first chunk (the role, for chat), one per piece of text, one with
    the finish reason (after a chat's tool calls) for each prompt's choice (its index), the usage
    (summed) when asked for, then `data: [DONE]`. `shape` gives the chunks (a list) for the
    opening, a piece, and the end. If the client goes away, Starlette cancels this generator at
    its await, and `finally` frees the slots."""

    def at(index: int, payloads: list[dict[str, Any]]) -> Iterator[bytes]:
        for payload in payloads:
            if index and payload.get("choices"):
                payload = {**payload, "choices": [{**c, "index": index} for c in payload["choices"]]}
            yield _chunk(payload)

    try:
        for index in range(len(seqs)):
            for line in at(index, shape(None, None, first=True)):
                yield line
        ended: dict[int, Finished] = {}
        last: dict[str, Any] = {}
        while len(ended) < len(seqs):
            index, event = await events.get()
            if isinstance(event, Delta):
                for line in at(index, shape(event.text, None)):
                    yield line
            elif isinstance(event, Finished):
                ending = shape(None, event)
                ended[index], last = event, ending[-1]
                for line in at(index, ending):
                    yield line
            elif isinstance(event, Failed):
                # OpenAI's clients raise on an error chunk: the reader learns the answer is cut.
                yield _chunk(ApiError(event.status, event.message, kind="server_error").body())
                break
        else:
            if include_usage:
                yield _chunk({**last, "choices": [], "usage": _usage(*ended.values())})
        yield b"data: [DONE]\n\n"
    finally:
        for seq in seqs:
            seq.cancel()


# ---------------------------------------------------------------- metrics


class _CountRequests:
    """Counts HTTP answers by route and status for /metrics. A plain ASGI wrapper, not
    BaseHTTPMiddleware, so streamed answers and disconnect detection pass through untouched."""

    def __init__(self, app: Any, counts: collections.Counter) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("path", "")
            if route.startswith("/v1/models/"):
                route = "/v1/models"  # one model's card: counted with the list
            self.counts[(route if route in ROUTES else "other", status)] += 1


def prometheus_text(batcher: Batcher, http_counts: collections.Counter) -> str:
    """The counters in Prometheus' text format."""
    m = batcher.metrics
    lines = [
        "# HELP tunebench_http_requests_total HTTP requests answered, by route and status.",
        "# TYPE tunebench_http_requests_total counter",
    ]
    for (route, status), count in sorted(http_counts.items()):
        lines.append(f'tunebench_http_requests_total{{route="{route}",status="{status}"}} {count}')
    lines += [
        "# HELP tunebench_requests_finished_total Generation requests finished, by model and reason.",
        "# TYPE tunebench_requests_finished_total counter",
    ]
    for (model, reason), count in sorted(m.finished.items()):
        lines.append(f'tunebench_requests_finished_total{{model="{model}",finish_reason="{reason}"}} {count}')
    gauges = [
        (
            "requests_rejected_total",
            "counter",
            "Requests refused with 429: every slot and queue place taken.",
            m.rejected,
        ),
        ("prompt_tokens_total", "counter", "Prompt tokens prefilled.", m.prompt_tokens),
        ("generation_tokens_total", "counter", "Tokens generated.", m.generation_tokens),
        ("decode_steps_total", "counter", "Batched decode steps run.", m.decode_steps),
        (
            "decode_rows_total",
            "counter",
            "Sequences summed over decode steps (rows / steps = mean batch).",
            m.decode_rows,
        ),
        ("requests_running", "gauge", "Sequences in the decode batch.", m.running),
        ("requests_waiting", "gauge", "Requests in the queue, waiting for a decode slot.", m.waiting),
        (
            "kv_cache_slots",
            "gauge",
            "Token slots of the KV cache allocated now (rows x slots).",
            m.cache_slots,
        ),
    ]
    for name, kind, text, value in gauges:
        lines += [
            f"# HELP tunebench_{name} {text}",
            f"# TYPE tunebench_{name} {kind}",
            f"tunebench_{name} {value}",
        ]
    return "\n".join(lines) + "\n"
