"""Per-channel rate limits that hold for the whole fleet of dispatch processes.

A limit of R per second spaces sends 1/R seconds apart (no burst: a provider's "14 per
second" is usually enforced over short windows). The slots are the fleet's: a process
reserves a span of them from :class:`Slots` (Postgres in a worker, so every process draws
from one schedule) and paces its sends inside the span. However many processes run, and
whichever of them has work, together they send at most R per second; nothing is configured
per process. See docs/delivery.md for what this costs.

Within a process, waiters are served in order, except that an urgent one (a transactional
message) is served before every non-urgent one still waiting, so a flood of bulk mail queued
on the limiter does not delay a password reset.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Mapping
from typing import Protocol

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.errors import StoreError
from workers.store import rates
from workers.store.db import autocommit

log = structlog.get_logger("nudge.ratelimit")

#: The longest span of slots a process reserves at once. With every process busy, the fleet
#: reserves about 1 / SPAN_SECONDS times per second per channel, whatever its size; a
#: process that starts sending waits for at most the spans the others reserved before it.
SPAN_SECONDS = 0.25
#: A slot missed by more than this (the event loop was late) goes unused rather than sent
#: late, so late sends never pile onto many of the slots that follow.
LATE_SECONDS = 0.1
#: How long to wait before asking again when Postgres cannot reserve.
RETRY_SECONDS = 0.5


class Slots(Protocol):
    """Where a channel's send slots are reserved."""

    async def reserve(self, channel: str, span: float) -> float:
        """Reserve the next ``span`` seconds of ``channel``'s slots; returns the seconds
        until they begin (zero or less: now)."""
        ...


class LocalSlots:
    """The slots of one process only: for a limiter with nobody to share with (tests)."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}

    async def reserve(self, channel: str, span: float) -> float:
        now = time.monotonic()
        start = max(self._next.get(channel, now), now)
        self._next[channel] = start + span
        return start - now


class StoreSlots:
    """The fleet's slots, in Postgres (``rate_slots``): one statement per reservation."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def reserve(self, channel: str, span: float) -> float:
        async with autocommit(self._engine) as conn:
            return await rates.reserve(conn, channel, span)


class RateLimiter:
    """Releases permits at ``rate`` per second for ``channel``, urgent waiters first."""

    def __init__(self, rate: float, slots: Slots | None = None, *, channel: str = "") -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.channel = channel
        self._slots = slots or LocalSlots()
        self._interval = 1.0 / rate
        self._span_permits = max(1, math.floor(rate * SPAN_SECONDS))
        #: The reserved span in hand: the time of its next free slot and how many are left.
        self._at = 0.0
        self._left = 0
        self._waiters: list[tuple[int, int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._pump: asyncio.Task[None] | None = None

    async def acquire(self, permits: int = 1, *, urgent: bool = False) -> None:
        """Wait until ``permits`` sends may go out."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (0 if urgent else 1, next(self._seq), permits, future))
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._release())
        await future

    async def _release(self) -> None:
        while self._waiters:
            _, _, permits, future = self._waiters[0]
            if future.done():  # its caller was cancelled
                heapq.heappop(self._waiters)
                continue
            now = time.monotonic()
            self._skip_missed(now)
            if self._left < permits:
                # What is left of the span cannot serve the head waiter: it goes unused.
                await self._reserve(permits)
                continue
            if self._at > now:
                # Sleep, then look again: an urgent waiter may have arrived meanwhile.
                await asyncio.sleep(self._at - now)
                continue
            heapq.heappop(self._waiters)
            future.set_result(None)
            # Slot by slot: when the loop was late, the next sends catch up with their slots
            # (the span bounds them); slots missed by more than LATE_SECONDS are skipped.
            self._left -= permits
            self._at += permits * self._interval

    def _skip_missed(self, now: float) -> None:
        late = now - LATE_SECONDS - self._at
        if self._left and late > 0:
            missed = min(self._left, math.ceil(late / self._interval))
            self._left -= missed
            self._at += missed * self._interval

    async def _reserve(self, head: int) -> None:
        """Reserve a span for the head waiter's ``head`` permits and, up to
        :data:`SPAN_SECONDS`, for the others waiting."""
        waiting = sum(p for _, _, p, f in self._waiters if not f.done())
        want = max(head, min(waiting, self._span_permits))
        while True:
            try:
                wait = await self._slots.reserve(self.channel, want * self._interval)
                break
            except StoreError as exc:
                log.warning("rate slots unavailable", channel=self.channel, error=str(exc))
                await asyncio.sleep(RETRY_SECONDS)
        self._at = time.monotonic() + max(0.0, wait)
        self._left = want


class Limits:
    """The rate limiters of a worker process, by channel name; no entry means unlimited.
    ``slots`` is where they reserve: the fleet's (:class:`StoreSlots`) in a worker."""

    def __init__(self, per_second: Mapping[str, float], slots: Slots | None = None) -> None:
        shared = slots or LocalSlots()
        self._limiters = {
            channel: RateLimiter(rate, shared, channel=channel)
            for channel, rate in per_second.items()
        }

    async def acquire(self, channel: str, permits: int, *, urgent: bool = False) -> None:
        limiter = self._limiters.get(channel)
        if limiter is not None:
            await limiter.acquire(permits, urgent=urgent)
