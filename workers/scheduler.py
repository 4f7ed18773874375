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
from shared.topology import INTAKE_QUEUE, due_destination
from workers.outcomes import DONE, Outcome, Reject
from workers.store import messages, templates
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
            # The earliest point with the database: a message naming an unknown template is
            # parked now, not failed when it falls due.
            unknown = await templates.missing_async(conn, {i.request.template for i in batch})
            accepted = [i for i in batch if i.request.template not in unknown]
            stored = []
            if accepted:
                stored = await messages.insert_single_messages(
                    conn, [(i.key, i.request) for i in accepted], now
                )
        priority = {i.key: i.request.priority.value for i in accepted}
        now = datetime.now(UTC)
        await self._publisher.publish_many(
            Publisher.delayed(
                self._backend,
                due_destination(priority[s.idempotency_key]),
                delay.delay_until(s.deliver_at, now),
                contract.encode(
                    DueMessage(message_id=s.id, contact_id=s.contact_id, deliver_at=s.deliver_at)
                ),
                due_message_id(s.id, s.contact_id, 1),
            )
            for s in stored
        )
        return [
            Reject(
                f"template: no template named {i.request.template!r} "
                "(add it with `nudge template add`)"
            )
            if i.request.template in unknown
            else DONE
            for i in batch
        ]
