"""The email channel: SMTP with aiosmtplib, over STARTTLS or TLS, authenticated when
configured, on a small pool of connections reused across messages.

Each message has a text part, an HTML alternative when the template has one, a stable
``Message-ID`` (the same for every retry of a recipient, so a mail system can spot a
duplicate), and RFC 8058 one-click unsubscribe headers with a signed link (the ``web`` role
serves it). With a tracking URL, the HTML part gets an open pixel and its links become signed
click redirects (:mod:`workers.tracking`), unless the template opts out. SMTP 4xx replies,
timeouts and lost connections are transient; 5xx replies are permanent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, parseaddr

import aiosmtplib
import structlog
from pydantic import SecretStr

from workers import tracking, unsubscribe
from workers.channels import Delivery, SendResult, Verdict

log = structlog.get_logger("nudge.channel.email")


@dataclass(frozen=True)
class SmtpConfig:
    """Where and how to connect (from ``NUDGE_SMTP_*``)."""

    host: str
    port: int
    security: str  # "starttls", "tls" or "none"
    username: str | None
    password: SecretStr | None
    cert_bundle: str | None
    sender: str
    timeout: float
    connections: int
    unsubscribe_url: str
    unsubscribe_secret: SecretStr
    #: The web role's public base URL: HTML gets an open pixel and click redirects (None: off).
    tracking_url: str | None = None
    tracking_secret: SecretStr | None = None


def compose(config: SmtpConfig, delivery: Delivery) -> EmailMessage:
    """The email for one delivery."""
    assert delivery.email is not None
    content = delivery.content
    message = EmailMessage()
    message["From"] = config.sender
    message["To"] = delivery.email
    message["Subject"] = content.subject or ""
    message["Date"] = formatdate(localtime=False, usegmt=True)
    domain = parseaddr(config.sender)[1].rpartition("@")[2] or "nudge.invalid"
    message["Message-ID"] = f"<{delivery.idempotency_key}@{domain}>"
    link = unsubscribe.link(
        config.unsubscribe_url,
        config.unsubscribe_secret.get_secret_value(),
        delivery.external_id,
        delivery.message_id,
    )
    message["List-Unsubscribe"] = f"<{link}>"
    message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message.set_content(content.text)
    if content.html is not None:
        body = content.html
        tracked = content.track_opens or content.track_clicks
        if config.tracking_url is not None and config.tracking_secret is not None and tracked:
            body = tracking.instrument(
                body,
                base_url=config.tracking_url,
                secret=config.tracking_secret.get_secret_value(),
                message_id=delivery.message_id,
                contact_id=delivery.contact_id,
                opens=content.track_opens,
                clicks=content.track_clicks,
            )
        message.add_alternative(body, subtype="html")
    return message


def _verdict(
    exc: aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused,
) -> SendResult:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        error = "; ".join(f"SMTP {r.code}: {r.message}" for r in exc.recipients)
        transient = all(400 <= c < 500 for c in codes)
        return SendResult(Verdict.TRANSIENT if transient else Verdict.PERMANENT, error)
    error = f"SMTP {exc.code}: {exc.message}"
    transient = exc.code < 500  # 4xx, and aiosmtplib's negative codes for local failures
    return SendResult(Verdict.TRANSIENT if transient else Verdict.PERMANENT, error)


class SmtpSender:
    """Sends email through one SMTP server on up to ``connections`` connections."""

    name = "email"
    batch_size = 1

    def __init__(self, config: SmtpConfig) -> None:
        self._config = config
        self._idle: asyncio.LifoQueue[aiosmtplib.SMTP] = asyncio.LifoQueue()
        self._slots = asyncio.Semaphore(config.connections)
        #: Connections opened so far (the tests check they are reused).
        self.connects = 0

    def _client(self) -> aiosmtplib.SMTP:
        c = self._config
        return aiosmtplib.SMTP(
            hostname=c.host,
            port=c.port,
            username=c.username,
            password=c.password.get_secret_value() if c.password is not None else None,
            timeout=c.timeout,
            use_tls=c.security == "tls",
            start_tls=c.security == "starttls",
            cert_bundle=c.cert_bundle,
        )

    async def send(self, deliveries: Sequence[Delivery]) -> list[SendResult]:
        return [await self._send_one(d) for d in deliveries]

    async def _send_one(self, delivery: Delivery) -> SendResult:
        if not delivery.email:
            return SendResult(Verdict.UNSENDABLE, "email: the contact has no email address")
        message = compose(self._config, delivery)
        async with self._slots:
            client = self._idle.get_nowait() if not self._idle.empty() else None
            try:
                if client is None or not client.is_connected:
                    client = self._client()
                    await client.connect()
                    self.connects += 1
                await client.send_message(message)
            except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as exc:
                # A refused message leaves a usable connection once the transaction is reset.
                await self._release(client)
                return _verdict(exc)
            except (aiosmtplib.SMTPException, OSError) as exc:
                await _close(client)
                return SendResult(Verdict.TRANSIENT, f"{type(exc).__name__}: {exc}")
            self._idle.put_nowait(client)
            return SendResult.sent()

    async def _release(self, client: aiosmtplib.SMTP | None) -> None:
        if client is None or not client.is_connected:
            return
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, OSError):
            await _close(client)
            return
        self._idle.put_nowait(client)

    async def close(self) -> None:
        while not self._idle.empty():
            client = self._idle.get_nowait()
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


async def _close(client: aiosmtplib.SMTP | None) -> None:
    if client is not None and client.is_connected:
        client.close()
