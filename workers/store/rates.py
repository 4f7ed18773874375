"""The fleet's send slots of each rate-limited channel.

One row per channel holds when its next free slot begins (the generic cell rate algorithm in
its virtual-scheduling form). A dispatch process reserves a span of slots with one statement
and paces its sends inside that span, so however many processes run, their spans never
overlap and the channel's limit holds for the fleet. An idle channel earns no credit: a span
starts no earlier than now, so there is never a burst."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

_RESERVE = text(
    """
    INSERT INTO rate_slots AS s (channel, next_at)
    VALUES (:channel, clock_timestamp() + make_interval(secs => :span))
    ON CONFLICT (channel) DO UPDATE
    SET next_at = greatest(s.next_at, clock_timestamp()) + make_interval(secs => :span)
    RETURNING extract(epoch FROM s.next_at - clock_timestamp())::float8 - :span AS wait
    """
)


async def reserve(conn: AsyncConnection, channel: str, span: float) -> float:
    """Reserve the next ``span`` seconds of ``channel``'s slots; returns the seconds until the
    span begins (zero or less: it begins now). Times are the server's, so the processes'
    clocks need not agree."""
    wait = await conn.scalar(_RESERVE, {"channel": channel, "span": span})
    return float(wait)
