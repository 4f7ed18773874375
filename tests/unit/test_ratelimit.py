"""The rate limiter spaces sends evenly, whatever the concurrency and however many limiters
draw from one schedule of slots, and lets urgent sends pass the queue."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.errors import ConfigError
from workers.config import Settings
from workers.ratelimit import Limits, LocalSlots, RateLimiter


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


async def test_a_channel_without_a_limit_never_waits() -> None:
    limits = Limits({"email": 10})
    started = time.monotonic()
    for _ in range(100):
        await limits.acquire("webhook", 1)
    assert time.monotonic() - started < 0.1
    for _ in range(6):
        await limits.acquire("email", 1)
    assert 0.45 <= time.monotonic() - started < 0.9


async def test_four_limiters_sharing_one_schedule_send_at_the_limit_together() -> None:
    # four processes' limiters, one fleet-wide schedule: 40 per second in all, not 40 each
    slots = LocalSlots()
    limiters = [RateLimiter(40, slots, channel="email") for _ in range(4)]
    started = time.monotonic()
    times: list[float] = []

    async def one(limiter: RateLimiter) -> None:
        await limiter.acquire()
        times.append(time.monotonic() - started)

    await asyncio.gather(*(one(limiters[i % 4]) for i in range(40)))
    assert 0.9 <= max(times) < 1.4, max(times)
    busiest = max(sum(1 for t in times if s <= t < s + 0.5) for s in times)
    assert busiest <= 21, f"{busiest} permits within half a second"


def test_the_removed_process_count_is_refused_naming_its_replacement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NUDGE_DISPATCH_PROCESSES", "4")
    with pytest.raises(ConfigError, match="NUDGE_DISPATCH_PROCESSES was removed: rate limits"):
        Settings.load()
