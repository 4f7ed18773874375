"""The ``events`` role: records what contacts did, from ``nudge.events``.

Each event creates or updates its contact by external id (email, phone, timezone,
attributes, subscribed) and is stored once per event id (the AMQP ``message_id``), so a
redelivered or re-published event counts once. Dispatch workers read these events for
exclusion triggers and recent-interaction windows.

In the same transaction, the enabled automation rules the events trigger are evaluated
(:mod:`workers.rules.firing`); their messages are published to ``nudge.intake`` with confirms after
the commit, and only then are the events acked. A crash in between redelivers the events,
which fire again under the same idempotency keys.

Each consumer also keeps a watermark in ``events_watermarks`` (:meth:`EventsHandler.
record_progress_forever`): a time before which every event published to ``nudge.events`` is
recorded. It is a time at which the queue had no ready message (so every event published
before it had been delivered to a consumer), once every delivery this consumer had received
by the next tick is committed; times are the consumer's clock, never a service's
``occurred_at``. Dispatch waits for the minimum over the live consumers before sending a
message that lists exclusion events.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import amqp, contract
from shared.amqp import Incoming, Outgoing, Publisher
from shared.contract import TrackEvent
from shared.errors import BrokerError, StoreError, StoreUnavailable
from shared.topology import EVENTS_QUEUE, INTAKE_EXCHANGE, SCHEDULE_KEY
from workers.rules import firing
from workers.runtime import metrics
from workers.runtime.outcomes import DONE, Outcome
from workers.store import contacts, watermarks
from workers.store.db import transaction

log = structlog.get_logger("nudge.events")

#: How often the watermark is advanced (a queue depth and one upsert per tick).
PROGRESS_TICK = 0.2
#: After a batch failed (its deliveries go back to the queue), the watermark waits this long
#: before trusting an empty queue again: by then they are back in the queue or redelivered.
AFTER_FAILURE = 2.0
#: The watermark of a consumer that has recorded nothing yet.
NOTHING_RECORDED = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Inbound:
    event_id: str
    event: TrackEvent
    #: This consumer's number for the delivery, in the order they were received.
    seq: int = 0


class EventsHandler:
    """Stores events and the contacts they describe, and fires the rules they trigger."""

    queue = EVENTS_QUEUE
    destination = None

    def __init__(self, engine: AsyncEngine, publisher: Publisher) -> None:
        self._engine = engine
        self._publisher = publisher
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._seqs = itertools.count(1)
        #: The number of the last delivery received.
        self._received = 0
        #: Deliveries received and not yet committed.
        self._open: set[int] = set()
        #: Candidates: (a time the queue had no ready message, the last delivery received a
        #: tick later); recorded once no delivery up to the latter is open.
        self._candidates: list[tuple[datetime, int]] = []
        self._empty_at: datetime | None = None
        self._trust_from = 0.0
        self.recorded_until = NOTHING_RECORDED

    def decode(self, message: Incoming) -> Inbound:
        event_id = contract.published_by_a_service(message.message_id, message.delivery_mode)
        event = contract.decode(TrackEvent, message.body, content_type=message.content_type)
        self._received = next(self._seqs)
        self._open.add(self._received)
        return Inbound(event_id, event, self._received)

    def due_at(self, item: Inbound) -> datetime | None:
        return None

    async def handle(self, batch: Sequence[Inbound]) -> Sequence[Outcome]:
        try:
            outcomes = await self._record(batch)
        except (StoreUnavailable, BrokerError):
            raise  # the consumer tries the same batch again: its deliveries stay open
        except Exception:
            self._given_back(batch)
            raise
        self._open.difference_update(i.seq for i in batch)
        return outcomes

    def _given_back(self, batch: Sequence[Inbound]) -> None:
        """The batch failed: its deliveries go back to the queue (and come back under new
        numbers). No empty queue seen before then, nor shortly after, is trusted."""
        self._open.difference_update(i.seq for i in batch)
        self._candidates.clear()
        self._empty_at = None
        self._trust_from = time.monotonic() + AFTER_FAILURE

    def advance(self, queue_empty_at: datetime | None) -> datetime:
        """One tick of the watermark: ``queue_empty_at`` is when the queue was last asked
        for its depth, if it had no ready message. Returns the watermark."""
        if self._empty_at is not None:
            # a tick later: what the broker delivered before answering has been received
            self._candidates.append((self._empty_at, self._received))
        trusted = time.monotonic() >= self._trust_from
        self._empty_at = queue_empty_at if trusted else None
        oldest_open = min(self._open, default=self._received + 1)
        done = [at for at, last in self._candidates if last < oldest_open]
        self._candidates = [c for c in self._candidates if c[1] >= oldest_open]
        if done:
            self.recorded_until = max(self.recorded_until, *done)
        return self.recorded_until

    async def record_progress_forever(self, connection: Any) -> None:
        """Advance this consumer's watermark every :data:`PROGRESS_TICK` and store it (the
        store's row doubles as a heartbeat); the row is deleted when the worker stops."""
        try:
            while True:
                asked_at = datetime.now(UTC)
                try:
                    depth = (await amqp.queue_depths(connection, [EVENTS_QUEUE]))[EVENTS_QUEUE]
                except BrokerError as exc:
                    log.debug("events queue depth unavailable", error=str(exc))
                    depth = None
                until = self.advance(asked_at if depth == 0 else None)
                try:
                    async with transaction(self._engine) as conn:
                        await watermarks.record(conn, self.name, until)
                except StoreError as exc:
                    log.debug("events watermark not stored", error=str(exc))
                await asyncio.sleep(PROGRESS_TICK)
        finally:
            try:
                async with transaction(self._engine) as conn:
                    await watermarks.forget(conn, self.name)
            except StoreError as exc:
                log.info("events watermark left behind", error=str(exc))

    async def _record(self, batch: Sequence[Inbound]) -> Sequence[Outcome]:
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
