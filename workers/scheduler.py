"""The ``scheduler`` role: accepts scheduled messages from ``nudge.intake``.

For each: validate again (a raw-AMQP producer may not have), store the ``messages`` row keyed
by the idempotency key, publish the due message into the delay exchange with confirms, and
only then ack. A redelivered or re-published request finds its row and publishes again; the
dispatch claim makes the duplicate harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import contract, delay
from shared.amqp import Publisher
from shared.contract import DueMessage, ScheduleMessage
from shared.topology import DUE_DESTINATION, INTAKE_QUEUE
from workers.outcomes import DONE, Outcome
from workers.store import messages
from workers.store.db import transaction


@dataclass(frozen=True)
class Intake:
    key: str
    request: ScheduleMessage


def due_message_id(message_id: int, contact_id: int, attempt: int) -> str:
    """The AMQP message_id of a due message: unique per recipient and attempt."""
    return f"due-{message_id}-{contact_id}-{attempt}"


class SchedulerHandler:
    """Persists scheduled messages and sends them into the delay."""

    queue = INTAKE_QUEUE
    destination = None

    def __init__(
        self, engine: AsyncEngine, publisher: Publisher, backend: delay.BackendName
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._backend = backend

    def decode(self, message: AbstractIncomingMessage) -> Intake:
        key = contract.idempotency_key(message.message_id)
        request = contract.decode(ScheduleMessage, message.body, content_type=message.content_type)
        return Intake(key, request)

    def due_at(self, item: Intake) -> datetime | None:
        return None

    async def handle(self, batch: Sequence[Intake]) -> Sequence[Outcome]:
        now = datetime.now(UTC)
        async with transaction(self._engine) as conn:
            stored = await messages.insert_single_messages(
                conn, [(i.key, i.request) for i in batch], now
            )
        now = datetime.now(UTC)
        await self._publisher.publish_many(
            Publisher.delayed(
                self._backend,
                DUE_DESTINATION,
                delay.delay_until(s.deliver_at, now),
                contract.encode(
                    DueMessage(message_id=s.id, contact_id=s.contact_id, deliver_at=s.deliver_at)
                ),
                due_message_id(s.id, s.contact_id, 1),
            )
            for s in stored
        )
        return [DONE] * len(batch)
