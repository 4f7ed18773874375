"""Repository for contacts and what they did (``contact_events``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from psycopg.types.json import Jsonb
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.contract import ContactRef, TrackEvent

_INSERT_NEW = text("""
INSERT INTO contacts (external_id, email, phone, timezone, attributes, subscribed)
SELECT external_id, email, phone, timezone, attributes, coalesce(subscribed, true)
  FROM unnest(CAST(:ids AS text[]), CAST(:emails AS text[]), CAST(:phones AS text[]),
              CAST(:timezones AS text[]), CAST(:attributes AS jsonb[]),
              CAST(:subscribed AS boolean[]))
       AS t(external_id, email, phone, timezone, attributes, subscribed)
 ORDER BY external_id
ON CONFLICT (external_id) DO NOTHING
""")

# Fields a reference leaves out (None) keep their stored value; attributes merge.
_UPDATE = text("""
UPDATE contacts AS c
   SET email = coalesce(t.email, c.email), phone = coalesce(t.phone, c.phone),
       timezone = coalesce(t.timezone, c.timezone), attributes = c.attributes || t.attributes,
       subscribed = coalesce(t.subscribed, c.subscribed), updated_at = now()
  FROM unnest(CAST(:ids AS text[]), CAST(:emails AS text[]), CAST(:phones AS text[]),
              CAST(:timezones AS text[]), CAST(:attributes AS jsonb[]),
              CAST(:subscribed AS boolean[]))
       AS t(external_id, email, phone, timezone, attributes, subscribed)
 WHERE c.external_id = t.external_id
RETURNING c.id, c.external_id
""")


async def upsert(conn: AsyncConnection, refs: Iterable[ContactRef]) -> dict[str, int]:
    """Create or update contacts by external id in two statements; returns their ids."""
    merged: dict[str, ContactRef] = {}
    for ref in refs:  # one row per id: an UPDATE cannot change a row twice
        merged[ref.id] = ref
    ordered = sorted(merged.values(), key=lambda r: r.id)  # a stable lock order
    params = {
        "ids": [r.id for r in ordered],
        "emails": [r.email for r in ordered],
        "phones": [r.phone for r in ordered],
        "timezones": [r.timezone for r in ordered],
        "attributes": [Jsonb(r.attributes) for r in ordered],
        "subscribed": [r.subscribed for r in ordered],
    }
    await conn.execute(_INSERT_NEW, params)
    result = await conn.execute(_UPDATE, params)
    return {row.external_id: row.id for row in result}


_RECORD_EVENTS = text("""
INSERT INTO contact_events (contact_id, name, occurred_at, event_id, data)
SELECT * FROM unnest(CAST(:contact_ids AS bigint[]), CAST(:names AS text[]),
                     CAST(:occurred AS timestamptz[]), CAST(:event_ids AS text[]),
                     CAST(:data AS jsonb[]))
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
""")


async def record_events(conn: AsyncConnection, events: Sequence[tuple[str, TrackEvent]]) -> int:
    """Record ``(event_id, event)`` pairs, creating or updating their contacts; an event id
    seen before is ignored. Returns how many were new."""
    ids = await upsert(conn, (e.contact for _, e in events))
    result = await conn.execute(_RECORD_EVENTS, {
        "contact_ids": [ids[e.contact.id] for _, e in events],
        "names": [e.name for _, e in events],
        "occurred": [e.occurred_at for _, e in events],
        "event_ids": [key for key, _ in events],
        "data": [Jsonb(e.data) for _, e in events],
    })  # fmt: skip
    return len(result.fetchall())
