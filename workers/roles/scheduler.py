"""The ``scheduler`` role: accepts scheduled messages from ``nudge.intake``.

For each: validate again (a raw-AMQP producer may not have), store the ``messages`` row keyed
by the idempotency key, publish the due message into the delay exchange with confirms, and
only then ack. The due messages of a batch that leave the delay together travel as one
``DueBatch`` (docs/delays.md, "Bundles"). A redelivered or re-published request finds its row
and publishes again; the dispatch claim makes the duplicate harmless.

It also rescues what the delay lost: every few seconds, the recipients still pending well
after their time (``NUDGE_RESCUE_AFTER_SECONDS``) are published again straight to the due
queue (``workers/store/rescue.py``). And it keeps the time partitions: the coming months'
are created every ``NUDGE_PARTITION_MAINTENANCE_SECONDS``, the old ones no longer needed
dropped every ``NUDGE_PRUNE_INTERVAL_SECONDS`` (``workers/store/partitions.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import contract, delay
from shared.amqp import Incoming, Outgoing, Publisher
from shared.contract import DueBatch, DueMessage, ScheduleMessage, due_message_id
from shared.errors import BrokerError, StoreError
from shared.topology import INTAKE_QUEUE, due_destination
from workers.rules.firing import RULE_HEADER
from workers.runtime import metrics
from workers.runtime.outcomes import DONE, Outcome, Reject
from workers.store import messages, partitions, rescue, templates
from workers.store.db import transaction
from workers.store.messages import StoredMessage

log = structlog.get_logger("nudge.scheduler")


#: The most recipients of each kind one rescue round publishes again.
RESCUE_LIMIT = 1000


@dataclass(frozen=True)
class Intake:
    key: str
    request: ScheduleMessage
    #: Published by an automation rule (the events role), not by a service.
    from_rule: bool = False


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

    def decode(self, message: Incoming) -> Intake:
        key = contract.published_by_a_service(message.message_id, message.delivery_mode)
        request = contract.decode(ScheduleMessage, message.body, content_type=message.content_type)
        return Intake(key, request, bool((message.headers or {}).get(RULE_HEADER)))

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
                    conn,
                    [(i.key, i.request) for i in accepted],
                    now,
                    from_rules={i.key for i in accepted if i.from_rule},
                )
        priority = {i.key: i.request.priority.value for i in accepted}
        await self._publisher.publish_many(self._due(stored, priority, datetime.now(UTC)))
        return [
            Reject(
                f"template: no template named {i.request.template!r} "
                "(add it with `nudge template add`)"
            )
            if i.request.template in unknown
            else DONE
            for i in batch
        ]

    def _due(
        self, stored: Sequence[StoredMessage], priority: dict[str, str], now: datetime
    ) -> list[Outgoing]:
        """The due messages of ``stored``, those that leave the delay together bundled into
        one :class:`DueBatch` (on the ladder, one set of hops and one dead-lettering per
        bundle instead of per message, and one delivery to dispatch)."""
        groups: dict[tuple[str, int], list[StoredMessage]] = {}
        for s in stored:
            destination = due_destination(priority[s.idempotency_key])
            wait = delay.delay_until(s.deliver_at, now)
            groups.setdefault((destination, delay.leaves_with(self._backend, wait)), []).append(s)
        out = []
        for (destination, _), group in groups.items():
            for i in range(0, len(group), contract.MAX_DUE_BATCH):
                chunk = group[i : i + contract.MAX_DUE_BATCH]
                due = [
                    DueMessage(message_id=s.id, contact_id=s.contact_id, deliver_at=s.deliver_at)
                    for s in chunk
                ]
                wait = delay.delay_until(min(s.deliver_at for s in chunk), now)
                if len(due) == 1:
                    body = contract.encode(due[0])
                    message_id = due_message_id(chunk[0].id, chunk[0].contact_id, 1)
                else:
                    body = contract.encode(DueBatch(due=due))
                    message_id = f"due-batch-{chunk[0].id}-{len(chunk)}"
                metrics.due_batch_size.observe(len(due))
                out.append(Publisher.delayed(self._backend, destination, wait, body, message_id))
        return out

    async def rescue_forever(self, after: float) -> None:
        """Publish again, straight to the due queue, every recipient still pending ``after``
        seconds past its time; a round every ``after / 4`` seconds (at most 30)."""
        while True:
            await asyncio.sleep(min(30.0, after / 4))
            try:
                while await self.rescue(after) >= RESCUE_LIMIT:
                    pass  # a full round: there may be more
            except (StoreError, BrokerError) as exc:
                log.warning("rescue failed", error=str(exc))

    async def partitions_forever(
        self, maintain_every: float, prune_every: float, retention: partitions.Retention
    ) -> None:
        """Create the coming months' partitions now and every ``maintain_every`` seconds,
        and prune every ``prune_every`` seconds (0: never); a round another scheduler is
        running is skipped."""
        last_prune = asyncio.get_running_loop().time()
        while True:
            prune = (
                prune_every > 0 and asyncio.get_running_loop().time() - last_prune >= prune_every
            )
            try:
                async with transaction(self._engine) as conn:
                    done = await conn.run_sync(partitions.scheduled_round, retention, prune)
                for line in done:
                    log.info("partitions", done=line)
            except StoreError as exc:
                log.warning("partition maintenance failed", error=str(exc))
            if prune:
                last_prune = asyncio.get_running_loop().time()
            await asyncio.sleep(maintain_every)

    async def rescue(self, after: float) -> int:
        """One round; returns how many recipients it published again. The marks commit only
        once the broker confirmed every publish."""
        async with transaction(self._engine) as conn:
            found = await rescue.take_overdue(conn, after, RESCUE_LIMIT)
            await self._publisher.publish_many(
                Publisher.delayed(
                    self._backend,
                    due_destination(o.priority),
                    0,
                    contract.encode(
                        DueMessage(
                            message_id=o.message_id,
                            contact_id=o.contact_id,
                            deliver_at=o.deliver_at,
                            attempt=o.attempt,
                        )
                    ),
                    due_message_id(o.message_id, o.contact_id, o.attempt),
                )
                for o in found
            )
        if found:
            metrics.rescued.inc(len(found))
            log.warning("rescued recipients lost by the delay", count=len(found))
        return len(found)
