"""The webhook channel: POSTs each delivery as JSON to a business API.

Every request carries ``Idempotency-Key`` (the same for every retry of a recipient, so the
receiver can drop duplicates) and ``X-Nudge-Signature: t=<unix seconds>,v1=<hex>`` where
``v1 = HMAC-SHA256(secret, f"{t}.{body}")``. A receiver verifies it with :func:`verify` (or
the same three lines in any language) and rejects timestamps older than a few minutes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from pydantic import SecretStr

from workers.channels import Delivery, SendResult, Verdict

SIGNATURE_HEADER = "X-Nudge-Signature"


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str, body: bytes, header: str, *, tolerance: float = 300.0, now: float | None = None
) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` within ``tolerance`` seconds."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header)


def payload(delivery: Delivery) -> dict[str, Any]:
    """The JSON document a receiver gets for one delivery."""
    return {
        "v": 1,
        "idempotency_key": delivery.idempotency_key,
        "message_id": delivery.message_id,
        "message_key": delivery.key,
        "deliver_at": delivery.deliver_at.isoformat(),
        "contact": {"id": delivery.external_id, "email": delivery.email, "phone": delivery.phone},
        "template": delivery.template,
        "template_version": delivery.content.version,
        "subject": delivery.content.subject,
        "text": delivery.content.text,
        "html": delivery.content.html,
        "category": delivery.category,
        "priority": delivery.priority,
        "attempt": delivery.attempt,
        "data": delivery.data,
    }


def batch_payload(deliveries: Sequence[Delivery]) -> dict[str, Any]:
    """The JSON document of a batch request: the single payloads under ``messages``."""
    return {"v": 1, "messages": [payload(d) for d in deliveries]}


def batch_key(deliveries: Sequence[Delivery]) -> str:
    """The ``Idempotency-Key`` of a batch request: the same for the same set of messages.
    A retry may group messages differently, so receivers drop duplicates per message (each
    carries its own ``idempotency_key``)."""
    keys = "\n".join(sorted(d.idempotency_key for d in deliveries))
    return "nudge-batch-" + hashlib.sha256(keys.encode()).hexdigest()[:32]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class WebhookSender:
    """Delivers over HTTP; 2xx is sent, 408/425/429/5xx, timeouts and network errors are
    transient, other 4xx are permanent. With ``batch_size`` above 1 one POST carries up to
    that many messages, and they share its outcome."""

    name = "webhook"

    def __init__(
        self,
        url: str,
        secret: SecretStr,
        *,
        timeout: float = 10.0,
        max_connections: int = 100,
        batch_size: int = 1,
    ) -> None:
        self._url = url
        self._secret = secret
        self.batch_size = batch_size
        self._client = httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=max_connections)
        )

    async def send(self, deliveries: Sequence[Delivery]) -> list[SendResult]:
        if self.batch_size == 1:
            return [await self._post(payload(d), d.idempotency_key) for d in deliveries]
        result = await self._post(batch_payload(deliveries), batch_key(deliveries))
        return [result] * len(deliveries)

    async def _post(self, document: dict[str, Any], key: str) -> SendResult:
        body = json.dumps(document, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            SIGNATURE_HEADER: sign(self._secret.get_secret_value(), body, int(time.time())),
        }
        try:
            response = await self._client.post(self._url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            return SendResult(Verdict.TRANSIENT, f"timeout: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            return SendResult(Verdict.TRANSIENT, f"{type(exc).__name__}: {exc}")
        if response.is_success:
            return SendResult.sent()
        error = f"HTTP {response.status_code}: {response.text[:200]}".rstrip(": ")
        if response.status_code in (408, 425, 429) or response.status_code >= 500:
            return SendResult(Verdict.TRANSIENT, error, _retry_after(response))
        return SendResult(Verdict.PERMANENT, error)

    async def close(self) -> None:
        await self._client.aclose()
