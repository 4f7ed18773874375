"""One contact's history for ``nudge contact show``: the contact, its recent events, and every
message it was (or is to be) sent, with the outcome, the reason, and the email's opens and
clicks, newest message first, paged by message id."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

from workers.recipients import MessageStatus
from workers.store import tracking

_CONTACT = text("""
SELECT id, external_id, email, phone, timezone, attributes, subscribed, created_at, updated_at
  FROM contacts WHERE external_id = :external_id
""")

_EVENTS = text("""
SELECT name, occurred_at, data FROM contact_events
 WHERE contact_id = :cid ORDER BY occurred_at DESC, id DESC LIMIT :limit
""")

# Recipients with a message_items row, and single messages not yet due (no row yet). Both
# halves are indexed by contact (message_items by contact_id, messages by contact_id).
_MESSAGES = text("""
SELECT * FROM (
    SELECT m.id AS message_id, m.kind, m.name AS campaign, m.idempotency_key, m.template,
           m.channel, m.category, m.priority, m.deliver_at, m.status AS message_status,
           i.status, i.reason, i.attempts, i.failures, i.last_error, i.sent_at, i.read_at,
           i.updated_at, i.template_version
      FROM message_items i JOIN messages m ON m.id = i.message_id
     WHERE i.contact_id = :cid AND i.message_id < :before
    UNION ALL
    SELECT m.id, m.kind, m.name, m.idempotency_key, m.template, m.channel, m.category,
           m.priority, m.deliver_at, m.status, NULL, NULL, 0, 0, NULL, NULL, NULL, NULL, NULL
      FROM messages m
     WHERE m.contact_id = :cid AND m.id < :before
       AND NOT EXISTS (SELECT 1 FROM message_items i
                        WHERE i.message_id = m.id AND i.contact_id = :cid)
) AS h
ORDER BY message_id DESC
LIMIT :limit
""")

#: Larger than any message id: the first page.
FIRST_PAGE = 2**63 - 1


def _pending(message_status: int) -> str:
    """What a message without an outcome for the contact is waiting for."""
    if message_status == MessageStatus.CANCELLED:
        return "cancelled"
    if message_status == MessageStatus.PAUSED:
        return "paused"
    return "scheduled"


def show(
    conn: Connection,
    external_id: str,
    *,
    limit: int,
    before: int = FIRST_PAGE,
    events: int = 10,
) -> dict[str, Any] | None:
    """The contact ``external_id`` with its ``events`` most recent events and up to ``limit``
    of its messages with an id below ``before``, newest first; ``next_before`` is the cursor
    of the next page (None on the last). None when there is no such contact."""
    contact = conn.execute(_CONTACT, {"external_id": external_id}).mappings().first()
    if contact is None:
        return None
    cid = contact["id"]
    recent = conn.execute(_EVENTS, {"cid": cid, "limit": events}).mappings().all()
    rows = [
        dict(r)
        for r in conn.execute(
            _MESSAGES, {"cid": cid, "before": before, "limit": limit + 1}
        ).mappings()
    ]
    more = len(rows) > limit
    rows = rows[:limit]
    engaged = tracking.engagement(conn, ((r["message_id"], cid) for r in rows))
    for r in rows:
        if r["status"] is None:
            r["status"] = _pending(r["message_status"])
        r["message_status"] = MessageStatus(r["message_status"]).name.lower()
        r.update(engaged[(r["message_id"], cid)].as_dict())
    return {
        "contact": dict(contact),
        "events": [dict(e) for e in recent],
        "messages": rows,
        "next_before": rows[-1]["message_id"] if more else None,
    }
