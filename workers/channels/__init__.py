"""Delivery channels: one small interface, several real implementations.

A channel turns each :class:`Delivery` of a call into a :class:`SendResult`: sent, a transient
failure worth retrying (with an optional ``retry_after`` from the receiver), a permanent
failure, or unsendable (the channel could not even try). A call carries at most
``batch_size`` deliveries (the webhook's batch mode sends them in one request; other channels
take one at a time). Channels never raise for a failed send; they raise only for their own
bugs.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from workers.templating import Rendered


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
    content: Rendered
    email: str | None = None
    phone: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def idempotency_key(self) -> str:
        """Stable across retries and redeliveries, so a receiver can drop duplicates."""
        return f"nudge-{self.message_id}-{self.contact_id}"


class Verdict(enum.Enum):
    """What became of a delivery."""

    SENT = "sent"
    #: The receiver failed for now: worth retrying.
    TRANSIENT = "transient"
    #: The receiver refused it: a failed send, not retried.
    PERMANENT = "permanent"
    #: The channel could not even try (an email to a contact without an address): nothing
    #: was sent and no receiver was contacted, so it is not a failed send. The result's
    #: ``error`` is the recipient's reason, ``<channel>: <why>``.
    UNSENDABLE = "unsendable"


@dataclass(frozen=True)
class SendResult:
    verdict: Verdict
    error: str | None = None
    retry_after: float | None = None

    @classmethod
    def sent(cls) -> SendResult:
        return cls(Verdict.SENT)


class Sender(Protocol):
    """What sends a channel's deliveries (the channel itself is named by the contract's
    :class:`~shared.contract.Channel`)."""

    name: str
    #: The most deliveries one :meth:`send` call takes.
    batch_size: int

    async def send(self, deliveries: Sequence[Delivery]) -> list[SendResult]:
        """One result per delivery, in order."""
        ...

    async def close(self) -> None: ...
