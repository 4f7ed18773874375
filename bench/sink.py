"""The benchmark's webhook receiver, in a process of its own: it verifies each batch's
signature, counts the messages and drops duplicates by their ``idempotency_key``, as a
business API would, and keeps only the keys (a million recorded requests would measure the
receiver, not Nudge). ``GET /stats`` answers the counts as JSON.

    python -m bench.sink --port 0 --secret S   # prints the port it listens on
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import click

from workers.channels.webhook import SIGNATURE_HEADER, verify


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.messages = 0
        self.bad_signatures = 0
        self.keys: set[str] = set()

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {
                "requests": self.requests,
                "messages": self.messages,
                "unique": len(self.keys),
                "duplicates": self.messages - len(self.keys),
                "bad_signatures": self.bad_signatures,
            }


def serve(port: int, secret: str) -> ThreadingHTTPServer:
    counts = Counts()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if not verify(secret, body, self.headers.get(SIGNATURE_HEADER, "")):
                with counts.lock:
                    counts.bad_signatures += 1
                self._answer(401, b"")
                return
            doc: dict[str, Any] = json.loads(body)
            docs = doc["messages"] if isinstance(doc.get("messages"), list) else [doc]
            with counts.lock:
                counts.requests += 1
                counts.messages += len(docs)
                counts.keys.update(d["idempotency_key"] for d in docs)
            self._answer(200, b"")

        def do_GET(self) -> None:
            self._answer(200, json.dumps(counts.stats()).encode())

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


@click.command()
@click.option("--port", type=int, default=0, show_default=True)
@click.option("--secret", required=True)
def main(port: int, secret: str) -> None:
    server = serve(port, secret)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
