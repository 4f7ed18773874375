"""Repository for email opens and clicks (``message_opens``, ``message_clicks``): written by
the web role, read by ``nudge message show``, ``campaign status`` and ``contact show``.

A token names a (message, contact) pair; an open or a click is recorded only for a pair that
has a ``message_items`` row (a recipient that was sent something), never for made-up ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection

Key = tuple[int, int]

_OPEN = text("""
INSERT INTO message_opens AS o (message_id, contact_id)
SELECT message_id, contact_id FROM message_items
 WHERE message_id = :mid AND contact_id = :cid
ON CONFLICT (message_id, contact_id) DO UPDATE SET opens = o.opens + 1
RETURNING o.opens = 1 AS first
""")

_CLICK = text("""
INSERT INTO message_clicks (message_id, contact_id, url)
SELECT message_id, contact_id, :url FROM message_items
 WHERE message_id = :mid AND contact_id = :cid
RETURNING id
""")


async def record_open(conn: AsyncConnection, message_id: int, contact_id: int) -> bool | None:
    """Count an open of the pixel; True for the recipient's first, None when there is no
    such recipient."""
    row = (await conn.execute(_OPEN, {"mid": message_id, "cid": contact_id})).first()
    return None if row is None else bool(row.first)


async def record_click(conn: AsyncConnection, message_id: int, contact_id: int, url: str) -> bool:
    """Record a click on ``url``; False when there is no such recipient."""
    result = await conn.execute(_CLICK, {"mid": message_id, "cid": contact_id, "url": url})
    return result.first() is not None


@dataclass
class Engagement:
    """What one recipient did with an email."""

    first_opened_at: datetime | None = None
    opens: int = 0
    #: ``(url, clicked_at)``, oldest first.
    clicks: list[tuple[str, datetime]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "first_opened_at": self.first_opened_at,
            "opens": self.opens,
            "clicks": [{"url": url, "at": at} for url, at in self.clicks],
        }


_OPENS_OF = text("""
SELECT o.message_id, o.contact_id, o.first_opened_at, o.opens
  FROM message_opens o
  JOIN unnest(CAST(:mids AS bigint[]), CAST(:cids AS bigint[])) AS t(message_id, contact_id)
    ON t.message_id = o.message_id AND t.contact_id = o.contact_id
""")

_CLICKS_OF = text("""
SELECT c.message_id, c.contact_id, c.url, c.clicked_at
  FROM message_clicks c
  JOIN unnest(CAST(:mids AS bigint[]), CAST(:cids AS bigint[])) AS t(message_id, contact_id)
    ON t.message_id = c.message_id AND t.contact_id = c.contact_id
 ORDER BY c.id
""")


def engagement(conn: Connection, keys: Iterable[Key]) -> dict[Key, Engagement]:
    """Opens and clicks of each (message id, contact id) of ``keys`` (those without any get
    an empty :class:`Engagement`)."""
    wanted = sorted(set(keys))
    out = {k: Engagement() for k in wanted}
    if not wanted:
        return out
    params = {"mids": [k[0] for k in wanted], "cids": [k[1] for k in wanted]}
    for r in conn.execute(_OPENS_OF, params):
        e = out[(r.message_id, r.contact_id)]
        e.first_opened_at, e.opens = r.first_opened_at, r.opens
    for r in conn.execute(_CLICKS_OF, params):
        out[(r.message_id, r.contact_id)].clicks.append((r.url, r.clicked_at))
    return out


_COUNTS = text("""
SELECT (SELECT count(*) FROM message_opens WHERE message_id = :id) AS opened,
       (SELECT count(DISTINCT contact_id) FROM message_clicks WHERE message_id = :id) AS clicked,
       (SELECT count(*) FROM message_clicks WHERE message_id = :id) AS clicks
""")


def counts(conn: Connection, message_id: int) -> dict[str, int]:
    """Recipients of a message who opened it, who clicked, and clicks in all."""
    row = conn.execute(_COUNTS, {"id": message_id}).one()
    return {"opened": int(row.opened), "clicked": int(row.clicked), "clicks": int(row.clicks)}
