"""What the delay loses, Postgres still knows: a recipient still pending well after its time
is published again by the scheduler and sent once (the x-delayed-message plugin drops the
messages whose time passed while its node was down; a purge or a lost node drops any)."""

from __future__ import annotations

from collections.abc import Callable

import pika
from sqlalchemy import Engine

from producer import Producer
from shared.topology import DUE_QUEUE, DUE_TRANSACTIONAL_QUEUE
from tests.support import Worker, final_row, ready_count, recipient_row, wait_for
from workers.config import Settings
from workers.demo.sink import Sink

DUE = (DUE_QUEUE, DUE_TRANSACTIONAL_QUEUE)


def _waiting(settings: Settings) -> int:
    return sum(ready_count(settings.amqp_url, q) for q in DUE)


def _lose_the_due_messages(settings: Settings) -> None:
    """The broker loses what waits in the due queues (no dispatch consumes them meanwhile)."""
    wait_for(lambda: _waiting(settings) >= 1, timeout=30, message="a due message in nudge.due")
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        for q in DUE:
            channel.queue_purge(q)
    finally:
        connection.close()


def _sends(sink: Sink, key: str) -> int:
    return sum(1 for r in sink.requests if r.body.get("message_key") == key)


def test_a_due_message_the_broker_lost_is_published_again_and_sent_once(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    scheduler = start_worker("scheduler", rescue_after_seconds=2)
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-lost", "welcome", "webhook", idempotency_key="lost-1")
    _lose_the_due_messages(settings)
    start_worker("dispatch")
    row = final_row(engine, "lost-1", timeout=30)
    assert row["status"] == "sent", row
    assert _sends(sink, "lost-1") == 1
    assert scheduler.metric("nudge_rescued_total") >= 1


def test_a_retry_the_broker_lost_is_published_again_and_sent_once(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    sink.script(503, 200)  # the first attempt fails: the recipient waits for its retry
    start_worker("scheduler", rescue_after_seconds=2)
    dispatch = start_worker("dispatch", retry_base_seconds=10.0)
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-retry", "welcome", "webhook", idempotency_key="lost-2")

    def deferred() -> bool:
        row = recipient_row(engine, "lost-2")
        return row is not None and row["status"] == "deferred"

    wait_for(deferred, timeout=30, message="the first attempt deferred")
    assert dispatch.stop() == 0  # before the retry (5-10 s away) comes back from the delay
    _lose_the_due_messages(settings)
    start_worker("dispatch", retry_base_seconds=10.0)
    row = final_row(engine, "lost-2", timeout=30)
    assert row["status"] == "sent", row
    assert row["attempts"] == 2, row
    assert _sends(sink, "lost-2") == 2  # the failed attempt and the one that was sent
