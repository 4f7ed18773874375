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
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

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
    """The JSON document a receiver gets."""
    return {
        "v": 1,
        "idempotency_key": delivery.idempotency_key,
        "message_id": delivery.message_id,
        "message_key": delivery.key,
        "deliver_at": delivery.deliver_at.isoformat(),
        "contact": {"id": delivery.external_id, "email": delivery.email, "phone": delivery.phone},
        "template": delivery.template,
        "category": delivery.category,
        "priority": delivery.priority,
        "attempt": delivery.attempt,
        "data": delivery.data,
    }


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


class WebhookChannel:
    """Delivers over HTTP; 2xx is sent, 408/429/5xx and network errors are transient, other
    4xx are permanent."""

    name = "webhook"

    def __init__(
        self, url: str, secret: str, *, timeout: float = 10.0, max_connections: int = 100
    ) -> None:
        self._url = url
        self._secret = secret
        self._client = httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=max_connections)
        )

    async def send(self, delivery: Delivery) -> SendResult:
        body = json.dumps(payload(delivery), separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": delivery.idempotency_key,
            SIGNATURE_HEADER: sign(self._secret, body, int(time.time())),
        }
        try:
            response = await self._client.post(self._url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return SendResult(Verdict.TRANSIENT, f"{type(exc).__name__}: {exc}")
        if response.is_success:
            return SendResult.sent()
        error = f"HTTP {response.status_code}: {response.text[:200]}"
        if response.status_code in (408, 425, 429) or response.status_code >= 500:
            return SendResult(Verdict.TRANSIENT, error, _retry_after(response))
        return SendResult(Verdict.PERMANENT, error)

    async def close(self) -> None:
        await self._client.aclose()
