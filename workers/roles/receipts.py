"""The ``receipts`` role: records read receipts from ``nudge.receipts``.

``read_at`` is set once per recipient (the first receipt wins; a replay changes nothing). A
receipt for a recipient Nudge never had is parked in ``nudge.dead`` with a reason naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from shared import contract
from shared.amqp import Incoming
from shared.contract import ReadReceipt
from shared.topology import RECEIPTS_QUEUE
from workers.runtime import metrics
from workers.runtime.outcomes import DONE, Outcome, Reject
from workers.store import receipts
from workers.store.db import transaction


class ReceiptsHandler:
    """Sets ``message_items.read_at`` for batches of receipts, in one statement each."""

    queue = RECEIPTS_QUEUE
    destination = None

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def decode(self, message: Incoming) -> ReadReceipt:
        contract.idempotency_key(message.message_id)
        return contract.decode(ReadReceipt, message.body, content_type=message.content_type)

    def due_at(self, item: ReadReceipt) -> datetime | None:
        return None

    async def handle(self, batch: Sequence[ReadReceipt]) -> Sequence[Outcome]:
        async with transaction(self._engine) as conn:
            found = await receipts.mark_read(
                conn, [(r.message_id, r.contact, r.read_at) for r in batch]
            )
        metrics.receipts_recorded.inc(len(found))
        return [
            DONE
            if i in found
            else Reject(f"message_id: message {r.message_id} has no recipient {r.contact!r}")
            for i, r in enumerate(batch)
        ]
