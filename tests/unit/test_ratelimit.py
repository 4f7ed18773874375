"""The rate limiter spaces sends evenly, whatever the concurrency, and lets urgent sends pass
the queue."""

from __future__ import annotations

import asyncio
import time

from workers.ratelimit import Limits, RateLimiter


async def test_fifty_concurrent_acquires_at_a_hundred_per_second_take_half_a_second() -> None:
    limiter = RateLimiter(100)
    started = time.monotonic()
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        times.append(time.monotonic() - started)

    await asyncio.gather(*(one() for _ in range(50)))
    assert 0.45 <= max(times) < 0.9, max(times)
    assert min(times) < 0.05


async def test_an_urgent_acquire_overtakes_the_waiting_bulk() -> None:
    limiter = RateLimiter(20)
    order: list[str] = []

    async def one(name: str, urgent: bool) -> None:
        await limiter.acquire(urgent=urgent)
        order.append(name)

    bulk = [asyncio.create_task(one(f"bulk-{i}", False)) for i in range(10)]
    await asyncio.sleep(0.01)
    await one("urgent", True)
    await asyncio.gather(*bulk)
    assert order.index("urgent") <= 2, order


async def test_a_channel_without_a_limit_never_waits_and_processes_share_the_limit() -> None:
    limits = Limits({"email": 40}, processes=4)  # 10 per second in this process
    started = time.monotonic()
    for _ in range(100):
        await limits.acquire("webhook", 1)
    assert time.monotonic() - started < 0.1
    for _ in range(6):
        await limits.acquire("email", 1)
    assert 0.45 <= time.monotonic() - started < 0.9
