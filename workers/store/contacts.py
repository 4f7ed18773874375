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
RETURNING id, external_id
""")

_IDS = text("""
SELECT id, external_id FROM contacts WHERE external_id = ANY(CAST(:ids AS text[]))
""")

# Fields a reference leaves out (None) keep their stored value; attributes merge. A row
# that would not change is not written: most references repeat what is stored (a contact
# created a moment ago by this very batch), and a rewrite costs a new row version, an entry
# in every index and its WAL.
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
   AND (c.email IS DISTINCT FROM coalesce(t.email, c.email)
        OR c.phone IS DISTINCT FROM coalesce(t.phone, c.phone)
        OR c.timezone IS DISTINCT FROM coalesce(t.timezone, c.timezone)
        OR (c.attributes || t.attributes) <> c.attributes
        OR c.subscribed IS DISTINCT FROM coalesce(t.subscribed, c.subscribed))
""")


def _params(refs: Iterable[ContactRef]) -> dict[str, list[object]]:
    merged: dict[str, ContactRef] = {}
    for ref in refs:  # one row per id, the last wins: an UPDATE cannot change a row twice
        merged[ref.id] = ref
    ordered = sorted(merged.values(), key=lambda r: r.id)  # a stable lock order
    return {
        "ids": [r.id for r in ordered],
        "emails": [r.email for r in ordered],
        "phones": [r.phone for r in ordered],
        "timezones": [r.timezone for r in ordered],
        "attributes": [Jsonb(r.attributes) for r in ordered],
        "subscribed": [r.subscribed for r in ordered],
    }


async def ensure(conn: AsyncConnection, refs: Iterable[ContactRef]) -> dict[str, int]:
    """Create the contacts that do not exist yet (with the fields given); returns the ids of
    all. Existing contacts are left as they are: see :func:`update`."""
    return (await ensure_created(conn, refs))[0]


async def ensure_created(
    conn: AsyncConnection, refs: Iterable[ContactRef]
) -> tuple[dict[str, int], set[str]]:
    """:func:`ensure`, and which external ids it created: those hold the fields given (the
    last reference of each wins, as in :func:`update`)."""
    params = _params(refs)
    ids = {row.external_id: row.id for row in await conn.execute(_INSERT_NEW, params)}
    created = set(ids)
    if rest := [i for i in params["ids"] if i not in created]:
        result = await conn.execute(_IDS, {"ids": rest})
        ids.update((row.external_id, row.id) for row in result)
    return ids, created


async def update(conn: AsyncConnection, refs: Iterable[ContactRef]) -> None:
    """Apply the fields of ``refs`` in order (later ones win). Callers pass only references
    from requests seen for the first time, so a replayed old event cannot undo a newer
    change such as an unsubscribe."""
    params = _params(refs)
    if params["ids"]:
        await conn.execute(_UPDATE, params)


_RECORD_EVENTS = text("""
INSERT INTO contact_events (contact_id, name, occurred_at, event_id, data)
SELECT * FROM unnest(CAST(:contact_ids AS bigint[]), CAST(:names AS text[]),
                     CAST(:occurred AS timestamptz[]), CAST(:event_ids AS text[]),
                     CAST(:data AS jsonb[]))
ON CONFLICT (event_id, occurred_at) DO NOTHING
RETURNING event_id
""")


async def record_events(conn: AsyncConnection, events: Sequence[tuple[str, TrackEvent]]) -> int:
    """Record ``(event_id, event)`` pairs, creating or updating their contacts; an event id
    seen before is ignored, its contact fields too. Returns how many were new."""
    ids = await ensure(conn, (e.contact for _, e in events))
    result = await conn.execute(
        _RECORD_EVENTS,
        {
            "contact_ids": [ids[e.contact.id] for _, e in events],
            "names": [e.name for _, e in events],
            "occurred": [e.occurred_at for _, e in events],
            "event_ids": [key for key, _ in events],
            "data": [Jsonb(e.data) for _, e in events],
        },
    )
    new = {row.event_id for row in result}
    fresh = sorted((e for key, e in events if key in new), key=lambda e: e.occurred_at)
    await update(conn, (e.contact for e in fresh))
    return len(new)


_UNSUBSCRIBE = text("""
UPDATE contacts SET subscribed = false, updated_at = now()
 WHERE external_id = :external_id
RETURNING id
""")

_UNSUBSCRIBED_EVENT = text("""
INSERT INTO contact_events (contact_id, name, occurred_at, event_id, data)
SELECT :contact_id, 'unsubscribed', now(), :event_id, :data
 WHERE NOT EXISTS (SELECT 1 FROM contact_events WHERE event_id = :event_id)
""")


async def unsubscribe(conn: AsyncConnection, external_id: str, message_id: int) -> bool:
    """Unsubscribe a contact (``subscribed`` false: dispatch then suppresses all but
    transactional messages) from a link in ``message_id``, and record an ``unsubscribed``
    event, once per message, for the contact's history. False when there is no such
    contact."""
    row = (await conn.execute(_UNSUBSCRIBE, {"external_id": external_id})).first()
    if row is None:
        return False
    await conn.execute(
        _UNSUBSCRIBED_EVENT,
        {
            "contact_id": row.id,
            "event_id": f"nudge:unsubscribe:{message_id}:{external_id}",
            "data": Jsonb({"message_id": message_id}),
        },
    )
    return True
