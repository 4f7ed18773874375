"""Read-only SQL for ``nudge status``: recipient outcomes and what is still waiting."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, select

from workers.recipients import ItemStatus
from workers.store.schema import message_items, messages

_WAITING = [ItemStatus.SENDING.value, ItemStatus.DEFERRED.value]


@dataclass(frozen=True)
class Outcomes:
    """Recipients by status, in all and within the recent window."""

    total: dict[str, int]
    recent: dict[str, int]
    #: Recipients given an outcome per second over the recent window.
    rate: float
    #: Messages stored whose recipients have no row yet (waiting in the delay).
    scheduled: int
    #: The oldest ``sending`` claim, if any: a worker may have died mid-send.
    oldest_sending: datetime | None


def outcomes(conn: Connection, window: timedelta) -> Outcomes:
    """Counts by status in one statement each; ``window`` is the "recent" period."""
    since = func.now() - window
    total: dict[str, int] = {}
    recent: dict[str, int] = {}
    rows = conn.execute(
        select(
            message_items.c.status,
            func.count(),
            func.count().filter(message_items.c.updated_at >= since),
        ).group_by(message_items.c.status)
    )
    for status, count, in_window in rows:
        total[status] = count
        recent[status] = in_window
    final = sum(n for s, n in recent.items() if s not in _WAITING)
    scheduled = conn.execute(
        select(func.count())
        .select_from(messages.outerjoin(message_items))
        .where(message_items.c.message_id.is_(None), messages.c.kind != "campaign")
    ).scalar_one()
    oldest = conn.execute(
        select(func.min(message_items.c.claimed_at)).where(
            message_items.c.status == ItemStatus.SENDING.value
        )
    ).scalar_one()
    return Outcomes(total, recent, final / window.total_seconds(), scheduled, oldest)
