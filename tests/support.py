"""Test support: waiting on conditions, per-test RabbitMQ vhosts and Postgres databases, and
worker processes. Everything here talks to the real servers started by ``make up``."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pika
from pydantic import SecretStr
from sqlalchemy import Engine, or_, select

from shared import brokers
from shared.topology import (
    BATCHES_QUEUE,
    DUE_QUEUE,
    EVENTS_QUEUE,
    INTAKE_QUEUE,
    PLAN_QUEUE,
    RECEIPTS_QUEUE,
)
from workers.config import Settings
from workers.store.schema import message_items, messages

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Management:
    """The RabbitMQ management HTTP API."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self._client = httpx.Client(
            base_url=f"{parts.scheme}://{parts.hostname}:{parts.port}/api",
            auth=(parts.username or "guest", parts.password or "guest"),
            timeout=10,
        )

    def close(self) -> None:
        self._client.close()

    def create_vhost(self, vhost: str) -> None:
        q = urllib.parse.quote(vhost, safe="")
        self._client.put(f"/vhosts/{q}").raise_for_status()
        self._client.put(
            f"/permissions/{q}/guest", json={"configure": ".*", "write": ".*", "read": ".*"}
        ).raise_for_status()

    def delete_vhost(self, vhost: str) -> None:
        self._client.delete(f"/vhosts/{urllib.parse.quote(vhost, safe='')}")

    def import_users(self, definitions: dict[str, Any]) -> None:
        """Create the ``users`` and ``permissions`` of a definitions document one by one (as
        :func:`shared.topology.users_definitions` makes it)."""
        for user in definitions["users"]:
            body = {k: user[k] for k in ("password_hash", "hashing_algorithm", "tags")}
            self._client.put(
                f"/users/{urllib.parse.quote(user['name'], safe='')}", json=body
            ).raise_for_status()
        for p in definitions["permissions"]:
            vhost, user = (urllib.parse.quote(p[k], safe="") for k in ("vhost", "user"))
            self._client.put(
                f"/permissions/{vhost}/{user}",
                json={k: p[k] for k in ("configure", "write", "read")},
            ).raise_for_status()

    def delete_user(self, name: str) -> None:
        self._client.delete(f"/users/{urllib.parse.quote(name, safe='')}")

    def connections(self) -> list[dict[str, Any]]:
        r = self._client.get("/connections")
        r.raise_for_status()
        connections: list[dict[str, Any]] = r.json()
        return connections

    def nodes(self) -> list[dict[str, Any]]:
        r = self._client.get("/nodes")
        r.raise_for_status()
        nodes: list[dict[str, Any]] = r.json()
        return nodes

    def queue(self, vhost: str, name: str) -> dict[str, Any]:
        r = self._client.get(
            f"/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(name, safe='')}"
        )
        r.raise_for_status()
        doc: dict[str, Any] = r.json()
        return doc

    def queues(self, vhost: str) -> dict[str, dict[str, Any]]:
        r = self._client.get(f"/queues/{urllib.parse.quote(vhost, safe='')}")
        r.raise_for_status()
        return {q["name"]: q for q in r.json()}

    def exchange(self, vhost: str, name: str) -> dict[str, Any] | None:
        """The exchange's details (``messages_delayed`` for the plugin's), or None."""
        r = self._client.get(
            f"/exchanges/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(name, safe='')}"
        )
        if r.status_code == 404:
            return None
        r.raise_for_status()
        doc: dict[str, Any] = r.json()
        return doc

    def delete_exchange(self, vhost: str, name: str) -> None:
        self._client.delete(
            f"/exchanges/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(name, safe='')}"
        ).raise_for_status()

    def get_messages(self, vhost: str, queue: str, count: int = 100) -> list[dict[str, Any]]:
        """Fetch (and requeue) up to ``count`` messages of ``queue``."""
        r = self._client.post(
            f"/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(queue)}/get",
            json={"count": count, "ackmode": "ack_requeue_true", "encoding": "auto"},
        )
        r.raise_for_status()
        msgs: list[dict[str, Any]] = r.json()
        return msgs


def ready_count(amqp_url: str, queue: str) -> int:
    """Messages ready in ``queue`` (passive declare)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        count: int = connection.channel().queue_declare(queue, passive=True).method.message_count
        return count
    finally:
        connection.close()


def raw_publish(
    amqp_url: str,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    message_id: str | None = None,
    content_type: str = "application/json",
    copies: int = 1,
    delivery_mode: int = 2,
    headers: dict[str, Any] | None = None,
    user_id: str | None = None,
) -> None:
    """Publish as a service in another language would: plain AMQP, persistent (unless told),
    with confirms and mandatory, bypassing our producers' validation."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(
            content_type=content_type,
            delivery_mode=delivery_mode,
            message_id=message_id,
            headers=headers,
            user_id=user_id,
        )
        for _ in range(copies):
            channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
    finally:
        connection.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """The NUDGE_* environment that makes a subprocess use ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUDGE_")}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            text = json.dumps(value) if isinstance(value, dict | list) else str(value)
            env[f"NUDGE_{name.upper()}"] = text
    return env


def nudge(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``nudge`` CLI with ``args`` in a subprocess configured by ``settings``."""
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Worker:
    """A ``nudge worker`` subprocess."""

    settings: Settings
    roles: tuple[str, ...]
    concurrency: int = 2
    extra: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    log_path: str = ""
    metrics_port: int = field(default_factory=free_port)

    def start(self, *, wait: bool = True) -> Worker:
        env = settings_env(self.settings)
        env["NUDGE_METRICS_PORT"] = str(self.metrics_port)
        self.log_path = (
            f"{os.environ.get('TMPDIR', '/tmp')}/nudge-worker-{os.getpid()}-{self.metrics_port}.log"
        )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "workers",
                    "worker",
                    *self.roles,
                    "--concurrency",
                    str(self.concurrency),
                    *self.extra,
                ],
                env=env,
                stderr=log,
            )
        if wait:
            queues = [
                q
                for role, q in (
                    ("scheduler", INTAKE_QUEUE),
                    ("dispatch", DUE_QUEUE),
                    ("events", EVENTS_QUEUE),
                    ("dispatch", BATCHES_QUEUE),
                    ("planner", PLAN_QUEUE),
                    ("receipts", RECEIPTS_QUEUE),
                )
                if role in self.roles
            ]
            wait_for(
                lambda: self.consuming(queues),
                timeout=30,
                message=f"worker {self.roles} to consume",
            )
        return self

    def consuming(self, queues: list[str]) -> bool:
        """Whether this worker consumes all of ``queues`` (fails if it exited)."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()}")
        connection = pika.BlockingConnection(brokers.pika_parameters(self.settings.amqp_url))
        try:
            channel = connection.channel()
            return all(channel.queue_declare(q, passive=True).method.consumer_count for q in queues)
        finally:
            connection.close()

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-5000:]
        except OSError:
            return ""

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample of this worker (0 if absent)."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        total = 0.0
        # Lines end at "\n" only: a label value (a reason's field, from the input) may hold
        # other line separators, which str.splitlines would split on.
        for line in text.split("\n"):
            if line.startswith(name) and (
                not want or all(f'{k}="{v}"' in line for k, v in labels.items())
            ):
                head, _, value = line.rpartition(" ")
                if head.split("{")[0] == name:
                    total += float(value)
        return total

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)


@dataclass(frozen=True)
class Mail:
    """One email that reached the test SMTP server."""

    peer: tuple[str, int]
    sender: str
    recipients: list[str]
    message: Any  # email.message.EmailMessage
    login: str | None
    #: The session was encrypted (STARTTLS or implicit TLS) when the message arrived.
    encrypted: bool = False


class MailServer:
    """A real SMTP server (aiosmtpd) on a free port that records what arrives. ``refuse``
    maps a recipient address to the reply its RCPT gets (``"550 no such user"``). With
    ``tls`` (certificate and key files) it requires STARTTLS, or with ``implicit_tls`` too it
    speaks TLS from the first byte (SMTPS, port 465 style); with ``login`` it requires
    authentication (over TLS only)."""

    def __init__(
        self,
        *,
        login: tuple[str, str] | None = None,
        tls: tuple[str, str] | None = None,
        implicit_tls: bool = False,
    ) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        self.received: list[Mail] = []
        self.refuse: dict[str, str] = {}
        server = self

        class Handler:
            async def handle_RCPT(  # noqa: N802 (aiosmtpd hook name)
                self, srv: Any, session: Any, envelope: Any, address: str, options: Any
            ) -> str:
                if address in server.refuse:
                    return server.refuse[address]
                envelope.rcpt_tos.append(address)
                return "250 OK"

            async def handle_DATA(  # noqa: N802 (aiosmtpd hook name)
                self, srv: Any, session: Any, envelope: Any
            ) -> str:
                import email
                import email.policy

                message = email.message_from_bytes(envelope.content, policy=email.policy.default)
                login = session.auth_data.login.decode() if session.auth_data else None
                server.received.append(
                    Mail(
                        session.peer,
                        envelope.mail_from,
                        list(envelope.rcpt_tos),
                        message,
                        login,
                        srv.transport.get_extra_info("ssl_object") is not None,
                    )
                )
                return "250 Message accepted"

        def authenticate(
            srv: Any, session: Any, envelope: Any, mechanism: str, data: Any
        ) -> AuthResult:
            ok = (
                login is not None
                and isinstance(data, LoginPassword)
                and (data.login.decode(), data.password.decode()) == login
            )
            return AuthResult(success=ok, auth_data=data if ok else None)

        self.port = free_port()
        kwargs: dict[str, Any] = {}
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
            if implicit_tls:
                # aiosmtpd advertises AUTH only after STARTTLS unless told the connection
                # itself is trusted; here it is TLS from the first byte
                kwargs |= {"ssl_context": context, "auth_require_tls": False}
            else:
                kwargs |= {"tls_context": context, "require_starttls": True}
        if login is not None:
            kwargs |= {"authenticator": authenticate, "auth_required": True}
        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, **kwargs)

    def start(self) -> MailServer:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


def recipient_row(engine: Engine, key: str) -> dict[str, Any] | None:
    """The message_items row of the single-recipient message with idempotency key ``key``
    (of a single message: its contact's, whatever other rows a test added)."""
    with engine.connect() as conn:
        row = (
            conn.execute(
                select(message_items)
                .join(messages, messages.c.id == message_items.c.message_id)
                .where(
                    messages.c.idempotency_key == key,
                    or_(
                        messages.c.contact_id.is_(None),
                        messages.c.contact_id == message_items.c.contact_id,
                    ),
                )
            )
            .mappings()
            .first()
        )
    return dict(row) if row is not None else None


def final_row(engine: Engine, key: str, timeout: float = 20) -> dict[str, Any]:
    """:func:`recipient_row` once it is final (neither sending nor deferred), waited for."""

    def done() -> dict[str, Any]:
        item = recipient_row(engine, key)
        return item if item and item["status"] not in ("sending", "deferred") else {}

    return wait_for(done, timeout=timeout, message=f"{key} to reach a final status")
