"""Repository for read receipts: ``message_items.read_at``, set once per recipient."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

_MARK_READ = text("""
WITH given AS (
    SELECT * FROM unnest(CAST(:mids AS bigint[]), CAST(:contacts AS text[]),
                         CAST(:reads AS timestamptz[]))
           WITH ORDINALITY AS t(message_id, external_id, read_at, i)
), found AS (
    SELECT g.i, mi.message_id, mi.contact_id, mi.status, g.read_at
      FROM given g
      JOIN contacts c ON c.external_id = g.external_id
      JOIN message_items mi ON mi.message_id = g.message_id AND mi.contact_id = c.id
), first_read AS (
    SELECT message_id, contact_id, min(read_at) AS read_at FROM found
     WHERE status = 'sent'
     GROUP BY message_id, contact_id
), marked AS (
    UPDATE message_items mi SET read_at = f.read_at
      FROM first_read f
     WHERE mi.message_id = f.message_id AND mi.contact_id = f.contact_id
       AND mi.status = 'sent' AND mi.read_at IS NULL
)
SELECT i, status FROM found
""")


async def mark_read(
    conn: AsyncConnection, receipts: Sequence[tuple[int, str, datetime]]
) -> dict[int, str]:
    """Record (message_id, external contact id, read_at) receipts in one statement, for
    recipients whose status is ``sent`` only; a recipient already read keeps its first time.
    Returns the status of the recipient each receipt named, by position (a receipt naming no
    recipient Nudge has is absent; one whose recipient is not ``sent`` recorded nothing)."""
    result = await conn.execute(
        _MARK_READ,
        {
            "mids": [r[0] for r in receipts],
            "contacts": [r[1] for r in receipts],
            "reads": [r[2] for r in receipts],
        },
    )
    return {int(row.i) - 1: str(row.status) for row in result}
