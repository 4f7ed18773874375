"""How far the ``events`` role has recorded ``nudge.events``: one row per running events
consumer (``events_watermarks``), written by the consumer, read by dispatch before it sends a
message that lists exclusion events."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from workers.recipients import Key
from workers.store.db import Statement

#: A consumer whose row was not written for this long is gone (its unacked events went back
#: to the queue, where the others' watermarks wait for them); its row is left out, and
#: deleted after :data:`FORGET_AFTER_SECONDS`.
LIVE_SECONDS = 10.0
FORGET_AFTER_SECONDS = 3600.0

_RECORD = text("""
INSERT INTO events_watermarks (consumer, recorded_until, beat_at)
VALUES (:consumer, :until, now())
ON CONFLICT (consumer) DO UPDATE
   SET recorded_until = greatest(events_watermarks.recorded_until, excluded.recorded_until),
       beat_at = now()
""")

_FORGET_GONE = text("""
DELETE FROM events_watermarks WHERE beat_at < now() - make_interval(secs => :after)
""")


async def record(conn: AsyncConnection, consumer: str, recorded_until: datetime) -> None:
    """``consumer`` is alive and has recorded every event published before
    ``recorded_until``; rows of consumers gone for long are deleted."""
    await conn.execute(_RECORD, {"consumer": consumer, "until": recorded_until})
    await conn.execute(_FORGET_GONE, {"after": FORGET_AFTER_SECONDS})


async def forget(conn: AsyncConnection, consumer: str) -> None:
    """``consumer`` stopped cleanly: its row no longer holds the watermark back."""
    await conn.execute(
        text("DELETE FROM events_watermarks WHERE consumer = :consumer"), {"consumer": consumer}
    )


# One row per recipient whose message lists exclusion events (none on the common path), with
# the fleet's watermark: null when no events consumer is alive.
_RECORDED_UNTIL = text("""
SELECT w.message_id, w.contact_id,
       (SELECT min(recorded_until) FROM events_watermarks
         WHERE beat_at >= now() - make_interval(secs => :live)) AS recorded_until
  FROM unnest(CAST(:mids AS bigint[]), CAST(:cids AS bigint[])) AS w(message_id, contact_id)
  JOIN messages m ON m.id = w.message_id AND jsonb_array_length(m.exclude_events) > 0
""")


def recorded_until_statement(keys: Sequence[Key]) -> Statement:
    """For each recipient of ``keys`` whose message lists exclusion events, until when the
    live events consumers have recorded every event: read by :func:`recorded_until_from`."""
    return _RECORDED_UNTIL, {
        "mids": [k[0] for k in keys],
        "cids": [k[1] for k in keys],
        "live": LIVE_SECONDS,
    }


def recorded_until_from(rows: Iterable[Any]) -> dict[Key, datetime | None]:
    return {(r.message_id, r.contact_id): r.recorded_until for r in rows}
