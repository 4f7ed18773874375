"""A webhook receiver as a business API should write one: it verifies the signature and
drops duplicates by ``Idempotency-Key``. The demo, the tests and the benchmarks use it as the
far end of the webhook channel; it records what arrived.

Its answers can be scripted to play a failing API: :meth:`Sink.script` gives the answers to
the first, second, ... request of each message (``503, 503, 200``; ``(429, {"Retry-After":
"2"})``), or ``respond`` decides per request. It understands batch requests (``messages``):
each message of a batch is recorded on its own, with the request's answer.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from workers.channels.webhook import SIGNATURE_HEADER, verify


@dataclass(frozen=True)
class Received:
    """One request that reached the sink."""

    at: float
    idempotency_key: str
    body: dict[str, Any]
    signature_ok: bool
    status: int
    #: How many messages the request carried (1 unless batch mode).
    batch: int = 1


@dataclass
class Sink:
    """Records every request; answers 200 unless ``respond`` says otherwise."""

    secret: str
    #: Seconds each request takes to answer, to play a slow API.
    latency: float = 0.0
    requests: list[Received] = field(default_factory=list)
    respond: Callable[[dict[str, Any], int], tuple[int, dict[str, str]]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _calls: dict[str, int] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def start(self, port: int = 0) -> Sink:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a thread per connection, not per call

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if len(body) < length:  # the client died mid-request: nothing arrived
                    self.close_connection = True
                    return
                if sink.latency:
                    time.sleep(sink.latency)
                ok = verify(sink.secret, body, self.headers.get(SIGNATURE_HEADER, ""))
                doc = json.loads(body) if body else {}
                docs = doc["messages"] if isinstance(doc.get("messages"), list) else [doc]
                header_key = self.headers.get("Idempotency-Key", "")
                keys = [d.get("idempotency_key", header_key) for d in docs]
                with sink._lock:
                    # a dict, not a scan of the requests: 20,000 calls stay O(n)
                    attempt = sink._calls.get(keys[0], 0)
                    sink._calls[keys[0]] = attempt + 1
                    status, headers = sink.respond(doc, attempt) if sink.respond else (200, {})
                    if not ok:
                        status = 401
                    now = time.time()
                    sink.requests += [
                        Received(now, key, d, ok, status, len(docs))
                        for key, d in zip(keys, docs, strict=True)
                    ]
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def script(self, *answers: int | tuple[int, dict[str, str]]) -> None:
        """Answer the n-th request of each message with ``answers[n]`` (the last one repeats
        once they run out)."""
        table = [a if isinstance(a, tuple) else (a, {}) for a in answers]

        def respond(doc: dict[str, Any], attempt: int) -> tuple[int, dict[str, str]]:
            return table[min(attempt, len(table) - 1)]

        self.respond = respond

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def accepted(self) -> list[Received]:
        """Requests answered 2xx, first per idempotency key (what a receiver would keep)."""
        seen: set[str] = set()
        out = []
        with self._lock:
            for r in self.requests:
                if 200 <= r.status < 300 and r.idempotency_key not in seen:
                    seen.add(r.idempotency_key)
                    out.append(r)
        return out

    def duplicates(self) -> int:
        """2xx requests whose idempotency key had already been accepted."""
        with self._lock:
            ok = [r.idempotency_key for r in self.requests if 200 <= r.status < 300]
        return len(ok) - len(set(ok))
