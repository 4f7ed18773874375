"""What a handler says happened to each message; the consumer loop maps it to AMQP."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Done:
    """Handled (whatever the recipient's outcome): ack."""


@dataclass(frozen=True)
class Retry:
    """Not now: publish ``body`` (or the same body) back through the delay exchange to
    arrive after ``delay_ms``, then ack."""

    delay_ms: int
    body: bytes | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class Reject:
    """Never processable: park in ``nudge.dead`` with ``reason``, then ack."""

    reason: str


Outcome = Done | Retry | Reject
DONE = Done()
