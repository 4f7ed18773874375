"""The ``events`` role: records what contacts did, from ``nudge.events``.

Each event creates or updates its contact by external id (email, phone, timezone,
attributes, subscribed) and is stored once per event id (the AMQP ``message_id``), so a
redelivered or re-published event counts once. Dispatch workers read these events for
exclusion triggers and recent-interaction windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import contract
from shared.contract import TrackEvent
from shared.topology import EVENTS_QUEUE
from workers import metrics
from workers.outcomes import DONE, Outcome
from workers.store import contacts
from workers.store.db import transaction


@dataclass(frozen=True)
class Inbound:
    event_id: str
    event: TrackEvent


class EventsHandler:
    """Stores events and the contacts they describe."""

    queue = EVENTS_QUEUE
    destination = None

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def decode(self, message: AbstractIncomingMessage) -> Inbound:
        event_id = contract.idempotency_key(message.message_id)
        event = contract.decode(TrackEvent, message.body, content_type=message.content_type)
        return Inbound(event_id, event)

    def due_at(self, item: Inbound) -> datetime | None:
        return None

    async def handle(self, batch: Sequence[Inbound]) -> Sequence[Outcome]:
        async with transaction(self._engine) as conn:
            new = await contacts.record_events(conn, [(i.event_id, i.event) for i in batch])
        metrics.events_recorded.inc(new)
        return [DONE] * len(batch)
