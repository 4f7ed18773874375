"""The ``events`` role: records what contacts did, from ``nudge.events``.

Each event creates or updates its contact by external id (email, phone, timezone,
attributes, subscribed) and is stored once per event id (the AMQP ``message_id``), so a
redelivered or re-published event counts once. Dispatch workers read these events for
exclusion triggers and recent-interaction windows.

In the same transaction, the enabled automation rules the events trigger are evaluated
(:mod:`workers.rules.firing`); their messages are published to ``nudge.intake`` with confirms after
the commit, and only then are the events acked. A crash in between redelivers the events,
which fire again under the same idempotency keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import contract
from shared.amqp import Outgoing, Publisher
from shared.contract import TrackEvent
from shared.topology import EVENTS_QUEUE, INTAKE_EXCHANGE, SCHEDULE_KEY
from workers.rules import firing
from workers.runtime import metrics
from workers.runtime.outcomes import DONE, Outcome
from workers.store import contacts
from workers.store.db import transaction


@dataclass(frozen=True)
class Inbound:
    event_id: str
    event: TrackEvent


class EventsHandler:
    """Stores events and the contacts they describe, and fires the rules they trigger."""

    queue = EVENTS_QUEUE
    destination = None

    def __init__(self, engine: AsyncEngine, publisher: Publisher) -> None:
        self._engine = engine
        self._publisher = publisher

    def decode(self, message: AbstractIncomingMessage) -> Inbound:
        event_id = contract.idempotency_key(message.message_id)
        event = contract.decode(TrackEvent, message.body, content_type=message.content_type)
        return Inbound(event_id, event)

    def due_at(self, item: Inbound) -> datetime | None:
        return None

    async def handle(self, batch: Sequence[Inbound]) -> Sequence[Outcome]:
        events = [(i.event_id, i.event) for i in batch]
        async with transaction(self._engine) as conn:
            new = await contacts.record_events(conn, events)
            fired = await firing.fire(conn, events)
        metrics.events_recorded.inc(new)
        # Unconfirmed: the consumer keeps the batch unacked and handles it again.
        await self._publisher.publish_many(
            Outgoing(
                INTAKE_EXCHANGE,
                SCHEDULE_KEY,
                contract.encode(f.request),
                f.key,
                headers={firing.RULE_HEADER: f.rule},
            )
            for f in fired
        )
        for f in fired:
            metrics.rules_fired.labels(f.rule).inc()
        return [DONE] * len(batch)
