"""A channel's rate limit holds however many deliveries run at once, and transactional
messages do not wait behind bulk work."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Engine, func, select

from producer import Producer, scheduled
from shared.topology import INTAKE_QUEUE
from tests.support import Worker, ready_count, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store.schema import message_items


def test_a_rate_limit_of_20_per_second_holds_over_200_messages_at_the_receiver(
    settings: Settings, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    n, rate = 200, 20.0
    # four batches in flight, each up to 500 messages: the limit is per channel, not per batch
    start_worker(concurrency=4, rate_limits={"webhook": rate}, claim_lease_seconds=60.0)
    with Producer(settings.amqp_url) as producer:
        producer.schedule_many(
            scheduled(f"c-{i}", "welcome", "webhook", idempotency_key=f"r-{i}") for i in range(n)
        )
    wait_for(lambda: len(sink.accepted()) == n, timeout=40, message=f"{n} deliveries")
    times = sorted(r.at for r in sink.accepted())
    span = times[-1] - times[0]
    expected = (n - 1) / rate  # 9.95 s
    assert expected * 0.95 <= span <= expected * 1.25, f"{n} messages took {span:.2f} s"
    # no second holds noticeably more than the limit
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= rate + 2, f"{busiest} messages within one second"


def test_a_transactional_message_arrives_within_a_second_during_a_flood_of_bulk_messages(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    bulk = 4000
    # The bulk goes out through the log channel at 250/s: about sixteen seconds of backlog in
    # nudge.due. Without a queue of its own, the transactional message would wait behind it.
    start_worker(concurrency=2, rate_limits={"log": 250.0}, claim_lease_seconds=60.0)
    with Producer(settings.amqp_url) as producer:
        producer.schedule_many(
            scheduled(
                f"bulk-{i}", "welcome", "log", idempotency_key=f"bulk-{i}", priority="automation"
            )
            for i in range(bulk)
        )

        def sent() -> int:
            with engine.connect() as conn:
                count = conn.scalar(
                    select(func.count())
                    .select_from(message_items)
                    .where(message_items.c.status == "sent")
                )
            return count or 0

        wait_for(
            lambda: ready_count(settings.amqp_url, INTAKE_QUEUE) == 0 and sent() >= 500,
            timeout=60,
            message="the flood stored and sending",
        )
        backlog = bulk - sent()
        published = time.time()
        producer.schedule(
            "vip", "welcome", "webhook", idempotency_key="reset-password", priority="transactional"
        )
    [arrived] = wait_for(sink.accepted, timeout=30, message="the transactional message")
    assert backlog > 1000, "the flood was over before the transactional message: proves nothing"
    assert arrived.at - published < 1.0, f"arrived after {arrived.at - published:.2f} s"
    assert sent() < bulk, "the bulk should still be going out"
