"""A worker's HTTP endpoint (``NUDGE_METRICS_PORT``): Prometheus metrics, liveness and
readiness, for Kubernetes probes and load balancers.

- ``GET /metrics``: the Prometheus exposition.
- ``GET /healthz``: liveness. 200 while the event loop turns (a heartbeat task stamps it every
  second); 503 when it has been stuck for :data:`STALL_SECONDS`, which only a restart cures.
- ``GET /readyz``: readiness. 200 once every role consumes, while the RabbitMQ connection is
  open and the worker is not stopping; otherwise 503. The body names each check.

The server runs in a thread of its own, so a blocked event loop cannot hide from it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

#: Seconds without a heartbeat after which the worker is reported dead.
STALL_SECONDS = 30.0


class Health:
    """What the probes report: a heartbeat and named readiness checks."""

    def __init__(self) -> None:
        self.beat = time.monotonic()
        self._checks: dict[str, Callable[[], bool]] = {}

    def check(self, name: str, predicate: Callable[[], bool]) -> None:
        """Add (or replace) a readiness check."""
        self._checks[name] = predicate

    def alive(self) -> bool:
        return time.monotonic() - self.beat < STALL_SECONDS

    def readiness(self) -> dict[str, bool]:
        out = {}
        for name, predicate in list(self._checks.items()):
            try:
                out[name] = bool(predicate())
            except Exception:  # a probe must answer, whatever the check does
                out[name] = False
        return out

    async def heartbeat(self) -> None:
        """Stamp the heartbeat every second, until cancelled."""
        while True:
            self.beat = time.monotonic()
            await asyncio.sleep(1.0)


def serve(health: Health, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` from a thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.alive()
                age = round(time.monotonic() - health.beat, 1)
                self._json(200 if ok else 503, {"alive": ok, "heartbeat_age_seconds": age})
            elif path == "/readyz":
                checks = health.readiness()
                ok = bool(checks) and all(checks.values())
                self._json(200 if ok else 503, {"ready": ok, "checks": checks})
            else:
                self._json(404, {"error": "try /metrics, /healthz or /readyz"})

        def _json(self, status: int, doc: dict[str, Any]) -> None:
            self._send(status, json.dumps(doc).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
