"""The facts a dispatch worker checks before sending, fetched for a whole batch in a constant
number of statements, under a per-contact lock so that concurrent workers see each other's
claims (eight workers racing on one contact still send at most N)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from workers.recipients import Event, Key, Sent
from workers.store.db import Statement

_LOCK = text("""
SELECT count(pg_advisory_xact_lock(1, (c % 2147483647)::int))
  FROM unnest(CAST(:cids AS bigint[])) AS c
""")


def lock_statement(contact_ids: Sequence[int]) -> Statement:
    """Serialise this transaction with every other one touching these contacts, taking the
    locks in ascending order so that two batches never deadlock. Released at commit."""
    # unnest yields the array in order: the sort here is the lock order
    return _LOCK, {"cids": sorted(set(contact_ids))}


_EXCLUSIONS = text("""
SELECT DISTINCT ON (w.message_id, w.contact_id) w.message_id, w.contact_id, e.name,
       e.occurred_at
  FROM unnest(CAST(:mids AS bigint[]), CAST(:cids AS bigint[])) AS w(message_id, contact_id)
  JOIN messages m ON m.id = w.message_id AND jsonb_array_length(m.exclude_events) > 0
  JOIN contact_events e
    ON e.contact_id = w.contact_id
   AND e.name = ANY (ARRAY(SELECT jsonb_array_elements_text(m.exclude_events)))
   AND e.occurred_at >= CASE m.exclude_scope
         WHEN 'ever' THEN '-infinity'::timestamptz
         WHEN 'within' THEN now() - make_interval(secs => m.exclude_within_seconds)
         ELSE coalesce(m.exclude_since, m.scheduled_at - make_interval(secs => :buffer))
       END
 ORDER BY w.message_id, w.contact_id, e.occurred_at
""")


def exclusions_statement(keys: Sequence[Key], buffer_seconds: float) -> Statement:
    """For each recipient whose message lists exclusion events, the first such event in its
    scope (since scheduling less ``buffer_seconds``, ever, or within a window); read with
    :func:`exclusions_from`."""
    return _EXCLUSIONS, {
        "mids": [k[0] for k in keys],
        "cids": [k[1] for k in keys],
        "buffer": buffer_seconds,
    }


def exclusions_from(rows: Iterable[Any]) -> dict[Key, Event]:
    return {(r.message_id, r.contact_id): Event(r.name, r.occurred_at) for r in rows}


_INTERACTIONS = text("""
SELECT contact_id, name, max(occurred_at) AS occurred_at
  FROM contact_events
 WHERE contact_id = ANY(CAST(:cids AS bigint[])) AND name = ANY(CAST(:names AS text[]))
   AND occurred_at >= now() - make_interval(secs => :window)
 GROUP BY contact_id, name
""")


def interactions_statement(
    contact_ids: Sequence[int], names: Sequence[str], window_seconds: float
) -> Statement:
    """The latest occurrence of each of ``names`` per contact within the window; read with
    :func:`interactions_from`."""
    return _INTERACTIONS, {
        "cids": list(contact_ids),
        "names": list(names),
        "window": window_seconds,
    }


def interactions_from(rows: Iterable[Any]) -> dict[int, list[Event]]:
    out: dict[int, list[Event]] = defaultdict(list)
    for r in rows:
        out[r.contact_id].append(Event(r.name, r.occurred_at))
    return out


async def interactions(
    conn: AsyncConnection, contact_ids: Sequence[int], names: Sequence[str], window_seconds: float
) -> dict[int, list[Event]]:
    """:func:`interactions_statement`, run."""
    if not contact_ids or not names:
        return defaultdict(list)
    statement = interactions_statement(contact_ids, names, window_seconds)
    return interactions_from(await conn.execute(*statement))


_HISTORY = text("""
SELECT mi.contact_id, coalesce(mi.sent_at, mi.claimed_at) AS at, m.channel, m.category
  FROM message_items mi
  JOIN messages m ON m.id = mi.message_id
 WHERE mi.contact_id = ANY(CAST(:cids AS bigint[]))
   AND ((mi.status = 'sent' AND mi.sent_at >= now() - make_interval(secs => :window))
        OR mi.status = 'sending')
   AND (mi.message_id, mi.contact_id) NOT IN (
         SELECT * FROM unnest(CAST(:mids AS bigint[]), CAST(:kcids AS bigint[])))
""")


def history_statement(
    contact_ids: Sequence[int], window_seconds: float, exclude: Sequence[Key]
) -> Statement:
    """What each contact was sent within the window, plus what other workers are sending to
    it now (their ``sending`` claims), leaving out the recipients of this batch; read with
    :func:`history_from`."""
    return _HISTORY, {
        "cids": sorted(set(contact_ids)),
        "window": window_seconds,
        "mids": [k[0] for k in exclude],
        "kcids": [k[1] for k in exclude],
    }


def history_from(rows: Iterable[Any]) -> dict[int, list[Sent]]:
    out: dict[int, list[Sent]] = defaultdict(list)
    for r in rows:
        out[r.contact_id].append(Sent(r.at, r.channel, r.category))
    return out


async def history(
    conn: AsyncConnection, contact_ids: Sequence[int], window_seconds: float, exclude: Sequence[Key]
) -> dict[int, list[Sent]]:
    """:func:`history_statement`, run."""
    if not contact_ids:
        return defaultdict(list)
    return history_from(
        await conn.execute(*history_statement(contact_ids, window_seconds, exclude))
    )
