"""The ``receipts`` role: records read receipts from ``nudge.receipts``.

``read_at`` is set once per recipient (the first receipt wins; a replay changes nothing), and
only for a recipient whose status is ``sent``. A receipt for a recipient Nudge never had, or
for one it did not send (``excluded``, ``failed``, ``planned``, still ``sending`` or
``deferred``, …), is parked in ``nudge.dead`` with a reason naming the recipient and its
status; one that came before the outcome was recorded can be replayed once it is
(``nudge dead replay``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from shared import contract
from shared.amqp import Incoming
from shared.contract import ReadReceipt
from shared.topology import RECEIPTS_QUEUE
from workers.recipients import ItemStatus
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
        contract.published_by_a_service(message.message_id, message.delivery_mode)
        return contract.decode(ReadReceipt, message.body, content_type=message.content_type)

    def due_at(self, item: ReadReceipt) -> datetime | None:
        return None

    async def handle(self, batch: Sequence[ReadReceipt]) -> Sequence[Outcome]:
        async with transaction(self._engine) as conn:
            found = await receipts.mark_read(
                conn, [(r.message_id, r.contact, r.read_at) for r in batch]
            )
        metrics.receipts_recorded.inc(sum(s == ItemStatus.SENT for s in found.values()))
        return [_outcome(r, found.get(i)) for i, r in enumerate(batch)]


def _outcome(receipt: ReadReceipt, status: str | None) -> Outcome:
    if status is None:
        return Reject(
            f"message_id: message {receipt.message_id} has no recipient {receipt.contact!r}"
        )
    if status != ItemStatus.SENT:
        return Reject(
            f"contact: recipient {receipt.contact!r} of message {receipt.message_id} was not "
            f"sent (status {status}): only a sent message can be read"
        )
    return DONE
