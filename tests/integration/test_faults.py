"""Killing a worker at any instant loses nothing; bad input is parked, named and counted, and
never crashes or loops a worker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from sqlalchemy import Engine, select

from producer import Producer, scheduled
from shared.topology import DEAD_QUEUE, INTAKE_EXCHANGE, SCHEDULE_KEY
from tests.support import Management, Worker, raw_publish, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store.schema import message_items, messages


def _outcomes(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.scalars(select(message_items.c.status)))


def test_a_worker_killed_mid_delivery_and_restarted_leaves_every_message_one_outcome(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    n = 150
    sink.latency = 0.05  # a slow API, so the kill lands mid-delivery
    first = start_worker(concurrency=4)
    with Producer(settings.amqp_url) as producer:
        producer.schedule_many(
            scheduled(f"c-{i}", "welcome", "webhook", idempotency_key=f"k-{i}") for i in range(n)
        )
    wait_for(lambda: len(sink.requests) >= n // 4, timeout=30, message="some deliveries")
    first.kill()
    in_flight_at_kill = len(sink.requests)
    assert in_flight_at_kill < n, "the kill came too late to prove anything"
    start_worker(concurrency=4)
    wait_for(lambda: _outcomes(engine).get("sent", 0) == n, timeout=60, message=f"{n} sent rows")
    with engine.connect() as conn:
        assert (
            conn.scalar(select(message_items.c.message_id).where(message_items.c.status != "sent"))
            is None
        )
        assert len(list(conn.execute(select(messages.c.id)))) == n
    assert len(sink.accepted()) == n
    # Only what was in flight when the worker died may arrive twice, and always with the
    # same Idempotency-Key, so the receiver drops it.
    assert sink.duplicates() <= 4 * 500
    keys = Counter(r.idempotency_key for r in sink.requests)
    assert all(r.body["idempotency_key"] == r.idempotency_key for r in sink.requests)
    assert sum(c - 1 for c in keys.values()) == sink.duplicates()


def _raw_publish(
    settings: Settings, body: bytes, message_id: str | None, content_type: str = "application/json"
) -> None:
    raw_publish(
        settings.amqp_url,
        INTAKE_EXCHANGE,
        SCHEDULE_KEY,
        body,
        message_id=message_id,
        content_type=content_type,
    )


def test_invalid_raw_input_is_parked_in_nudge_dead_with_a_reason_naming_the_field(
    settings: Settings,
    vhost: str,
    management: Management,
    sink: Sink,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> None:
    worker = start_worker()
    _raw_publish(settings, b"\xff{not json", "bad-json")
    _raw_publish(
        settings,
        b'{"v": 1, "contact": {"id": "42"}, "template": "t", '
        b'"channel": "sms", "deliver_at": "2030-01-01T00:00:00Z"}',
        "bad-channel",
    )
    _raw_publish(
        settings,
        b'{"v": 1, "contact": {"id": "42"}, "template": "t", '
        b'"channel": "log", "deliver_at": "2030-01-01T00:00:00Z"}',
        None,
    )
    _raw_publish(settings, b"<xml/>", "bad-type", content_type="text/xml")
    wait_for(
        lambda: management.queue(vhost, DEAD_QUEUE).get("messages") == 4,
        timeout=20,
        message="4 parked messages",
    )
    parked = {
        m["properties"].get("message_id", ""): m["properties"]["headers"]
        for m in management.get_messages(vhost, DEAD_QUEUE)
    }
    assert parked["bad-json"]["x-nudge-reason"].startswith("body: not valid UTF-8 JSON")
    assert parked["bad-channel"]["x-nudge-reason"].startswith("channel: Input should be")
    # aio-pika gives a message without message_id a random one when it is parked
    assert [
        h["x-nudge-reason"]
        for k, h in parked.items()
        if k not in ("bad-json", "bad-channel", "bad-type")
    ] == ["message_id: required, it is the idempotency key"]
    assert parked["bad-type"]["x-nudge-reason"].startswith("content_type:")
    assert all(h["x-nudge-source-queue"] == "nudge.intake" for h in parked.values())
    assert worker.metric("nudge_dead_lettered_total", queue="nudge.intake") == 4
    # the worker is still alive and serving
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="after")
    wait_for(lambda: len(sink.accepted()) == 1, timeout=15, message="a good message after")
    assert worker.process is not None
    assert worker.process.poll() is None
    assert _outcomes(engine) == Counter({"sent": 1})


def test_a_message_that_crashes_its_handler_is_parked_after_the_delivery_limit(
    settings: Settings,
    vhost: str,
    management: Management,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> None:
    # A due message for a message id that does not exist is rejected with a reason...
    import json

    body = json.dumps(
        {"v": 1, "message_id": 999, "contact_id": 999, "deliver_at": "2020-01-01T00:00:00Z"}
    ).encode()
    raw_publish(settings.amqp_url, "nudge.delay.out", "0." * 28 + "due", body, message_id="ghost")
    start_worker("dispatch")
    wait_for(
        lambda: management.queue(vhost, DEAD_QUEUE).get("messages") == 1,
        timeout=20,
        message="the parked ghost",
    )
    headers = management.get_messages(vhost, DEAD_QUEUE)[0]["properties"]["headers"]
    assert headers["x-nudge-reason"] == "due: contact 999 is not a recipient of message 999"
    assert _outcomes(engine) == Counter()


def test_a_due_message_for_a_destination_nobody_consumes_is_parked_not_retried_forever(
    settings: Settings, vhost: str, management: Management
) -> None:
    # one second in level 0, then out to a destination without a binding
    raw_publish(
        settings.amqp_url, "nudge.delay.L00", "0." * 27 + "1.nowhere", b"{}", message_id="lost"
    )
    wait_for(
        lambda: management.queue(vhost, DEAD_QUEUE).get("messages") == 1,
        timeout=20,
        message="the message parked in nudge.dead",
    )
    assert management.queue(vhost, "nudge.delay.L00").get("messages", 0) == 0
