"""Delivery channels: one small interface, several real implementations.

A channel turns a :class:`Delivery` into a :class:`SendResult`: sent, a transient failure
worth retrying (with an optional ``retry_after`` from the receiver), or a permanent failure.
Channels never raise for a failed send; they raise only for their own bugs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True)
class Delivery:
    """One message to one recipient."""

    message_id: int
    contact_id: int
    #: The idempotency key the service published the message with.
    key: str
    external_id: str
    template: str
    channel: str
    category: str | None
    priority: str
    data: dict[str, Any]
    deliver_at: datetime
    attempt: int
    email: str | None = None
    phone: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def idempotency_key(self) -> str:
        """Stable across retries and redeliveries, so a receiver can drop duplicates."""
        return f"nudge-{self.message_id}-{self.contact_id}"


class Verdict(enum.Enum):
    SENT = "sent"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class SendResult:
    verdict: Verdict
    error: str | None = None
    retry_after: float | None = None

    @classmethod
    def sent(cls) -> SendResult:
        return cls(Verdict.SENT)


class Channel(Protocol):
    """Where messages go out."""

    name: str

    async def send(self, delivery: Delivery) -> SendResult: ...

    async def close(self) -> None: ...
