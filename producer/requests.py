"""Building validated requests: every producer (sync, async, in-memory) goes through here, so
a bad argument fails in the service, before anything is published, naming the field."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from shared import contract
from shared.contract import ContactRef, Priority, ScheduleMessage
from shared.topology import INTAKE_EXCHANGE, SCHEDULE_KEY


@dataclass(frozen=True)
class Scheduled:
    """A validated scheduled message and its idempotency key."""

    message: ScheduleMessage
    idempotency_key: str

    exchange = INTAKE_EXCHANGE
    routing_key = SCHEDULE_KEY

    @property
    def body(self) -> bytes:
        return contract.encode(self.message)


def scheduled(
    contact: str | Mapping[str, Any] | ContactRef,
    template: str,
    channel: str,
    *,
    delay: timedelta | float | None = None,
    deliver_at: datetime | None = None,
    exclude_events: Sequence[str] = (),
    expires_at: datetime | None = None,
    idempotency_key: str | None = None,
    data: Mapping[str, Any] | None = None,
    category: str | None = None,
    priority: str = Priority.AUTOMATION,
) -> Scheduled:
    """Validate a scheduled message. ``contact`` is the service's user id, or a mapping with
    ``id`` and optional ``email``, ``phone``, ``timezone``, ``attributes``. Give ``delay``
    (seconds or a timedelta) or ``deliver_at`` (timezone-aware), or neither for now. Without
    ``idempotency_key`` a random one is made: pass your own to make retries safe."""
    message = contract.schedule_request(
        contact,
        template,
        channel,
        delay=delay,
        deliver_at=deliver_at,
        exclude_events=exclude_events,
        expires_at=expires_at,
        category=category,
        priority=priority,
        data=data,
    )
    key = contract.idempotency_key(
        idempotency_key if idempotency_key is not None else str(uuid.uuid4())
    )
    return Scheduled(message, key)
