"""A loaded deployment: the served models, the batcher thread and the ASGI app, on a socket.

`tunebench deploy` (engine/cli/deploy.py) builds one from its flags; tests and bench/ build one
in code. It listens on loopback unless an API key is set: a model on an open port answers anyone
who finds it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from ..core.errors import UserError
from .validation import DEFAULT_MAX_REQUEST_BYTES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_MAX_NUM_SEQS = 8
DEFAULT_MAX_QUEUE = 64
API_KEY_ENV = "TUNEBENCH_API_KEY"
FALLBACK_CONTEXT = 2048  # --max_model_len when the model's config names no context length
PROBE_PATHS = frozenset({"/health", "/metrics"})


def is_loopback(host: str) -> bool:
    """Only this machine can connect: localhost, 127.0.0.0/8 or ::1."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


class _QuietProbes(logging.Filter):
    """The access log leaves out answered health and metrics polls: the workbench asks every
    second, as monitors do, and the requests people made would drown in them."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:  # uvicorn's: client, method, path, version, status
            _, method, path, _, status = args
            return not (method == "GET" and path in PROBE_PATHS and status == 200)
        return True


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so a taken port fails in a second."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as exc:
        raise UserError(
            f"--host {host}: not an address of this machine ({exc})", "use 127.0.0.1, 0.0.0.0 or an IP it has"
        ) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)  # listen() comes when uvicorn serves: until then connections are refused
    except OSError as exc:
        sock.close()
        raise UserError(
            f"--host {host} --port {port}: cannot listen there: {exc.strerror or exc}",
            "pick another port with --port (0 takes any free one), or stop whatever holds this one",
        ) from None
    sock.set_inheritable(True)
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class Deployment:
    """A loaded deployment: the served models, the batcher thread and the ASGI app over them."""

    def __init__(
        self, served: Any, batcher: Any, app: Any, max_model_len: int, max_num_seqs: int, api_key: str = ""
    ) -> None:
        self.served, self.batcher, self.app = served, batcher, app
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.api_key = api_key
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @classmethod
    def load(
        cls,
        plan: Any,
        *,
        max_model_len: int,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        api_key: str = "",
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        system: str | None = None,
        template: str = "",
        torch_dtype: str = "auto",
        say: Any = None,
    ) -> Deployment:
        from .app import Defaults, create_app
        from .batcher import Batcher
        from .served import load_served

        served = load_served(plan, system=system, template=template, torch_dtype=torch_dtype, say=say)
        batcher = Batcher(served, max_num_seqs=max_num_seqs, max_queue=max_queue, max_model_len=max_model_len)
        app = create_app(
            served,
            batcher,
            defaults=Defaults(max_new_tokens, temperature, top_p),
            max_model_len=max_model_len,
            model_context=plan.context_length,
            api_key=api_key,
            max_request_bytes=max_request_bytes,
        )
        batcher.start()
        return cls(served, batcher, app, max_model_len, max_num_seqs, api_key)

    def describe(self, url: str) -> str:
        loaded = self.served.loaded
        names = ", ".join(
            f"{t.name} ({'base' if t.is_base else 'adapter ' + str(t.adapter_dir)})"
            for t in self.served.targets.values()
        )
        kv = self.served.kv_bytes_per_token() * self.max_num_seqs * self.max_model_len
        # The key itself is never printed (logs outlive it): the curl line reads it from the
        # environment, in double quotes so the shell expands it.
        auth, key_line = "", ""
        if self.api_key:
            auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"'
            # A key given as --api_key is not in the shell a person copies the curl line into.
            first = "" if os.environ.get(API_KEY_ENV) == self.api_key else f"export {API_KEY_ENV}=KEY, then "
            key_line = (
                f"key     required: clients send 'Authorization: Bearer KEY'; {first}the curl line below "
                f"reads KEY from ${API_KEY_ENV}\n"
            )
        return (
            f"model   {loaded.resolved.label}: {str(loaded.dtype).replace('torch.', '')} on {loaded.device}\n"
            f"serving {names}\n"
            f"batch   up to {self.max_num_seqs} sequences of up to {self.max_model_len} tokens together; "
            f"KV cache at most {kv / 2**30:.2f} GiB\n"
            f"listening on {url}/v1 (OpenAI API), {url}/health, {url}/metrics; Ctrl-C stops\n"
            f"{key_line}"
            f"try it  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
            f'-d \'{{"model": "{next(iter(self.served.targets))}", "messages": '
            f'[{{"role": "user", "content": "Who are you?"}}]}}\''
        )

    def _make_server(self, log_level: str) -> Any:
        import uvicorn

        batcher = self.batcher

        class Server(uvicorn.Server):
            interrupted = False

            def handle_exit(self, sig: int, frame: Any) -> None:
                self.interrupted = self.interrupted or sig == signal.SIGINT
                super().handle_exit(sig, frame)

            async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
                # Stop the batcher first: every open answer gets its end (a stream an error chunk
                # and [DONE], a whole answer a 503), so the connections close by themselves
                # rather than being cut at the grace period with a traceback.
                await asyncio.to_thread(batcher.stop)
                await super().shutdown(sockets)

        # Connections still open after the answers ended (a slow reader) get this long to close.
        config = uvicorn.Config(self.app, log_level=log_level, timeout_graceful_shutdown=3, lifespan="off")
        access = logging.getLogger("uvicorn.access")  # configured by the line above
        if not any(isinstance(f, _QuietProbes) for f in access.filters):
            access.addFilter(_QuietProbes())
        return Server(config)

    def serve(self, sock: socket.socket) -> None:
        """Serve in this thread until Ctrl-C / SIGTERM. uvicorn shuts down cleanly, then raises
        the signal again: KeyboardInterrupt after Ctrl-C, for the caller's exit status."""
        server = self._make_server("info")
        server.run(sockets=[sock])
        if server.interrupted:
            # uvicorn's raise went to the handler it found, which ignores SIGINT in a job that a
            # non-interactive shell started with `&`; Ctrl-C still stopped the server.
            raise KeyboardInterrupt

    def start_in_thread(self, sock: socket.socket) -> str:
        """Serve from a background thread (tests, benchmarks); returns the base URL once it answers."""
        self._server = self._make_server("warning")
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="tunebench-deploy-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        return base_url(sock)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.batcher.stop()
