"""The recipients whose due message has not come back from the delay long after its time.

The delay keeps a due message in the broker; the x-delayed-message plugin loses those whose
time passed while its node was down (its README, Limitations), and an operator's purge or a
lost node loses any. Postgres still knows what is pending: a single or rule message with no
recipient row, or a deferred recipient, whose time is more than ``after`` seconds past. Each
statement takes at most ``limit`` of them, locks them against another scheduler (``SKIP
LOCKED``) and marks them, so that one is published again at most once per ``after`` seconds: a
message by ``rescued_at``, a deferred recipient by moving its ``next_attempt_at`` to now (when
its next attempt really is). The dispatch claim makes a copy that was not lost harmless."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from workers.recipients import MessageStatus

_SINGLES = text("""
WITH overdue AS (
    SELECT m.id FROM messages m
     WHERE m.kind <> 'campaign' AND m.status IN (:not_started, :sending)
       AND m.contact_id IS NOT NULL
       AND m.deliver_at < now() - make_interval(secs => :after)
       AND (m.rescued_at IS NULL OR m.rescued_at < now() - make_interval(secs => :after))
       AND NOT EXISTS (SELECT 1 FROM message_items mi
                        WHERE mi.message_id = m.id AND mi.contact_id = m.contact_id)
     ORDER BY m.deliver_at
     LIMIT :limit
       FOR UPDATE OF m SKIP LOCKED
)
UPDATE messages m SET rescued_at = now()
  FROM overdue o WHERE m.id = o.id
RETURNING m.id, m.contact_id, m.deliver_at, m.priority, 1 AS attempt
""")

_DEFERRED = text("""
WITH overdue AS (
    SELECT mi.message_id, mi.contact_id FROM message_items mi
      JOIN messages m ON m.id = mi.message_id
     WHERE mi.status = 'deferred'
       AND mi.next_attempt_at < now() - make_interval(secs => :after)
       AND m.status IN (:not_started, :sending)
     ORDER BY mi.next_attempt_at
     LIMIT :limit
       FOR UPDATE OF mi SKIP LOCKED
)
UPDATE message_items mi SET next_attempt_at = now(), updated_at = now()
  FROM overdue o, messages m
 WHERE mi.message_id = o.message_id AND mi.contact_id = o.contact_id AND m.id = mi.message_id
RETURNING mi.message_id, mi.contact_id, m.deliver_at, m.priority, mi.attempts + 1 AS attempt
""")


@dataclass(frozen=True, slots=True)
class Overdue:
    """A recipient to publish again, straight to the due queue of its priority."""

    message_id: int
    contact_id: int
    deliver_at: datetime
    priority: str
    attempt: int


async def take_overdue(conn: AsyncConnection, after: float, limit: int) -> list[Overdue]:
    """Up to ``limit`` single messages and up to ``limit`` deferred recipients more than
    ``after`` seconds past their time, marked as published again now."""
    params = {
        "after": after,
        "limit": limit,
        "not_started": int(MessageStatus.NOT_STARTED),
        "sending": int(MessageStatus.SENDING),
    }
    found: list[Overdue] = []
    for statement in (_SINGLES, _DEFERRED):
        found.extend(Overdue(*r) for r in await conn.execute(statement, params))
    return found
