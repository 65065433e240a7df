"""A stand-in for `tunebench deploy` in the TUI tests: answers /health and /metrics like the real
server (two requests running), without loading a model. Run as `python fake_deploy.py ARGS`."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(argv: list[str]) -> None:
    port = int(argv[argv.index("--port") + 1])
    names = ["base"]
    if "--adapters" in argv:
        for spec in argv[argv.index("--adapters") + 1 :]:
            if spec.startswith("--"):
                break
            names.append(spec.split("=", 1)[0])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's spelling
            if self.path == "/health":
                body = json.dumps({"status": "ok", "models": names, "running": 2, "waiting": 0}).encode()
            elif self.path == "/metrics":
                body = b"tunebench_requests_running 2\ntunebench_requests_waiting 1\n"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
