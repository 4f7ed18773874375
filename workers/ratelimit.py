"""Per-channel rate limits, shared by every concurrent delivery of a worker process.

A limit of R per second spaces sends 1/R seconds apart (no burst: a provider's "14 per
second" is usually enforced over short windows). Waiters are served in order, except that an
urgent one (a transactional message) is served before every non-urgent one still waiting, so a
flood of bulk mail queued on the limiter does not delay a password reset.

Across processes the limit is divided: each dispatch process takes ``R / N``, where ``N`` is
``NUDGE_DISPATCH_PROCESSES`` (see docs/delivery.md for why, and what it costs).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Mapping


class RateLimiter:
    """Releases permits at ``rate`` per second, urgent waiters first."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._interval = 1.0 / rate
        self._next = 0.0
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
            now = time.monotonic()
            if self._next > now:
                # Sleep, then look again: an urgent waiter may have arrived meanwhile.
                await asyncio.sleep(self._next - now)
                continue
            _, _, permits, future = heapq.heappop(self._waiters)
            if future.done():  # its caller was cancelled
                continue
            future.set_result(None)
            self._next = max(self._next, now) + permits * self._interval


class Limits:
    """The rate limiters of a worker process, by channel name; no entry means unlimited."""

    def __init__(self, per_second: Mapping[str, float], processes: int = 1) -> None:
        self._limiters = {
            channel: RateLimiter(rate / processes) for channel, rate in per_second.items()
        }

    async def acquire(self, channel: str, permits: int, *, urgent: bool = False) -> None:
        limiter = self._limiters.get(channel)
        if limiter is not None:
            await limiter.acquire(permits, urgent=urgent)
