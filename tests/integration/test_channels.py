"""Real delivery: what reaches an SMTP server and a webhook receiver, and what Nudge records
when they fail, throttle or answer slowly."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, select

from producer import Producer, scheduled
from tests.backends import both_backends
from tests.support import MailServer, Worker, final_row, wait_for
from workers import unsubscribe
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store.schema import message_items

UNSUBSCRIBE = secrets.token_urlsafe(32)


def test_an_email_arrives_rendered_with_a_signed_unsubscribe_header_on_a_reused_connection(
    settings: Settings,
    mail_server: MailServer,
    engine: Engine,
    add_template: Callable[..., int],
    start_worker: Callable[..., Worker],
) -> None:
    version = add_template(
        "receipt",
        "Hi {{ contact.first_name }}, your {{ plan }} plan costs {{ price }}.",
        subject="Your {{ plan }} receipt",
        html_body="<p>Hi {{ contact.first_name }}, {{ plan }}</p>",
    )
    start_worker(
        smtp_host="127.0.0.1",
        smtp_port=mail_server.port,
        smtp_security="none",
        smtp_connections=2,
        unsubscribe_secret=SecretStr(UNSUBSCRIBE),
    )
    n = 8
    with Producer(settings.amqp_url) as producer:
        producer.schedule_many(
            scheduled(
                {
                    "id": f"u-{i}",
                    "email": f"u{i}@example.com",
                    "attributes": {"first_name": f"Ann{i}"},
                },
                "receipt",
                "email",
                idempotency_key=f"mail-{i}",
                data={"plan": "<pro>", "price": "9 EUR"},
            )
            for i in range(n)
        )
    wait_for(lambda: len(mail_server.received) == n, timeout=20, message=f"{n} emails")
    mail = next(m for m in mail_server.received if m.recipients == ["u3@example.com"])
    assert mail.message["Subject"] == "Your <pro> receipt"
    assert mail.message["To"] == "u3@example.com"
    text = mail.message.get_body(("plain",)).get_content()
    assert text.strip() == "Hi Ann3, your <pro> plan costs 9 EUR."
    html = mail.message.get_body(("html",)).get_content()
    assert "<p>Hi Ann3, &lt;pro&gt;</p>" in html  # HTML parts are autoescaped
    header = mail.message["List-Unsubscribe"]
    assert header.startswith("<http://localhost:8080/unsubscribe?")
    assert unsubscribe.verify(UNSUBSCRIBE, header.strip("<>")) == "u-3"
    assert unsubscribe.verify(secrets.token_urlsafe(32), header.strip("<>")) is None
    assert mail.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    # connections are reused: at most the configured two for eight messages
    assert len({m.peer for m in mail_server.received}) <= 2
    item = final_row(engine, "mail-3")
    assert (item["status"], item["template_version"]) == ("sent", version)


def _certificate(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (the openssl command line makes it)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make a test certificate: apt-get install openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@contextmanager
def _tls_mail_server(tmp_path: Path, *, implicit: bool) -> Iterator[tuple[MailServer, str]]:
    """An SMTP server requiring TLS (STARTTLS, or from the first byte) and a login, and its
    certificate."""
    cert, key = _certificate(tmp_path)
    server = MailServer(login=("nudge", "s3cret"), tls=(cert, key), implicit_tls=implicit)
    server.start()
    try:
        yield server, cert
    finally:
        server.stop()


def _smtp_settings(server: MailServer, cert: str, security: str) -> dict[str, Any]:
    """Worker settings for ``server``: trusting ``cert``, logging in as it expects."""
    return {
        "smtp_host": "127.0.0.1",
        "smtp_port": server.port,
        "smtp_security": security,
        "smtp_cert_bundle": cert,
        "smtp_username": "nudge",
        "smtp_password": SecretStr("s3cret"),
    }


@pytest.fixture
def secure_mail_server(tmp_path: Path) -> Iterator[tuple[MailServer, str]]:
    """An SMTP server requiring STARTTLS and a login, and its certificate. Requested before
    ``start_worker``, so it stops after the workers closed their connections."""
    with _tls_mail_server(tmp_path, implicit=False) as served:
        yield served


def test_an_email_to_a_contact_without_an_address_fails_with_the_reason_but_is_no_failed_send(
    settings: Settings,
    mail_server: MailServer,
    engine: Engine,
    add_template: Callable[..., int],
    start_worker: Callable[..., Worker],
) -> None:
    add_template("hello", "Hello")
    worker = start_worker(smtp_host="127.0.0.1", smtp_port=mail_server.port, smtp_security="none")
    with Producer(settings.amqp_url) as producer:
        producer.schedule("no-address", "hello", "email", idempotency_key="no-address")
        producer.schedule(
            {"id": "ann", "email": "ann@example.com"}, "hello", "email", idempotency_key="ann"
        )
    item = final_row(engine, "no-address")
    assert (item["status"], item["reason"], item["failures"]) == (
        "failed",
        "email: the contact has no email address",
        0,
    )
    assert final_row(engine, "ann")["status"] == "sent"
    assert [m.recipients for m in mail_server.received] == [["ann@example.com"]]
    failed = {"channel": "email", "status": "failed"}
    assert worker.metric("nudge_outcomes_total", **failed, reason="email") == 1
    assert worker.metric("nudge_outcomes_total", **failed, reason="permanent") == 0


def test_smtp_upgrades_with_starttls_authenticates_fails_a_5xx_at_once_and_retries_a_4xx(
    secure_mail_server: tuple[MailServer, str],
    settings: Settings,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> None:
    server, cert = secure_mail_server
    server.refuse = {
        "gone@example.com": "550 5.1.1 no such user",
        "busy@example.com": "451 4.3.0 try again later",
    }
    start_worker(**_smtp_settings(server, cert, "starttls"), max_attempts=2)
    with Producer(settings.amqp_url) as producer:
        for who in ("ok", "gone", "busy"):
            producer.schedule(
                {"id": who, "email": f"{who}@example.com"},
                "welcome",
                "email",
                idempotency_key=who,
            )
    gone = final_row(engine, "gone")
    assert (gone["status"], gone["failures"]) == ("failed", 1)
    assert gone["last_error"].startswith("SMTP 550")
    busy = final_row(engine, "busy")
    assert (busy["status"], busy["failures"]) == ("failed", 2)
    assert busy["reason"] == "attempts: gave up after 2 failed sends"
    assert busy["last_error"].startswith("SMTP 451")
    assert final_row(engine, "ok")["status"] == "sent"
    assert [(m.recipients, m.login, m.encrypted) for m in server.received] == [
        (["ok@example.com"], "nudge", True)
    ]


@pytest.fixture
def implicit_tls_mail_server(tmp_path: Path) -> Iterator[tuple[MailServer, str]]:
    """An SMTP server speaking TLS from the first byte and requiring a login, and its
    certificate; requested before ``start_worker`` for the same reason as above."""
    with _tls_mail_server(tmp_path, implicit=True) as served:
        yield served


# aiosmtpd's warning assumes plain text before STARTTLS; this server is TLS from the first byte
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_smtp_with_implicit_tls_authenticates_and_delivers(
    implicit_tls_mail_server: tuple[MailServer, str],
    settings: Settings,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> None:
    server, cert = implicit_tls_mail_server
    start_worker(**_smtp_settings(server, cert, "tls"))
    with Producer(settings.amqp_url) as producer:
        producer.schedule(
            {"id": "tls", "email": "tls@example.com"}, "welcome", "email", idempotency_key="tls"
        )
    assert final_row(engine, "tls")["status"] == "sent"
    assert [(m.recipients, m.login, m.encrypted) for m in server.received] == [
        (["tls@example.com"], "nudge", True)
    ]


@both_backends
def test_a_webhook_answering_503_twice_gets_the_message_on_the_third_attempt_after_backoff(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    sink.script(503, 503, 200)
    start_worker()  # retry_base_seconds is 0.5: waits of 0.25-0.5 s, then 0.5-1 s
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="flaky")
    item = final_row(engine, "flaky")
    assert [r.status for r in sink.requests] == [503, 503, 200]
    gaps = [b.at - a.at for a, b in zip(sink.requests, sink.requests[1:], strict=False)]
    assert gaps[0] >= 0.25, gaps
    assert gaps[1] >= 0.5, gaps
    assert (item["status"], item["attempts"], item["failures"]) == ("sent", 3, 2)
    assert item["last_error"].startswith("HTTP 503")
    assert len({r.idempotency_key for r in sink.requests}) == 1


def test_a_webhook_answering_400_fails_at_once_with_the_error(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    sink.script(400)
    start_worker()
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="refused")
    item = final_row(engine, "refused")
    assert (item["status"], item["attempts"], item["failures"]) == ("failed", 1, 1)
    assert item["reason"] == "permanent: receiver refused"
    assert item["last_error"].startswith("HTTP 400")
    assert len(sink.requests) == 1


def test_a_webhook_answering_429_with_retry_after_is_retried_no_sooner_than_asked(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    sink.script((429, {"Retry-After": "2"}), 200)
    start_worker()  # our own backoff would wait at most 0.5 s
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="throttled")
    item = final_row(engine, "throttled")
    assert [r.status for r in sink.requests] == [429, 200]
    waited = sink.requests[1].at - sink.requests[0].at
    assert 2.0 <= waited < 4.0, waited
    assert (item["status"], item["failures"]) == ("sent", 1)


def test_a_webhook_that_times_out_is_retried_then_failed_with_the_timeout(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    sink.latency = 1.0
    start_worker(webhook_timeout_seconds=0.3, max_attempts=2)
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="slow")
    item = final_row(engine, "slow")
    assert (item["status"], item["failures"]) == ("failed", 2)
    assert item["last_error"].startswith("timeout:")


def test_batch_mode_carries_many_messages_per_signed_request_and_each_is_recorded_sent(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    n = 120
    start_worker(webhook_batch_size=50)
    with Producer(settings.amqp_url) as producer:
        producer.schedule_many(
            scheduled(f"c-{i}", "welcome", "webhook", idempotency_key=f"b-{i}") for i in range(n)
        )
    wait_for(lambda: len(sink.accepted()) == n, timeout=20, message=f"{n} messages")
    assert all(r.signature_ok for r in sink.requests)
    assert max(r.batch for r in sink.requests) > 1
    assert all(r.batch <= 50 for r in sink.requests)
    assert sink.accepted()[0].body["text"].startswith("welcome for c-")
    with engine.connect() as conn:
        statuses = list(conn.scalars(select(message_items.c.status)))
    assert statuses == ["sent"] * n
