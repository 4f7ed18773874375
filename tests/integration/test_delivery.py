"""A delayed message travels from a service through RabbitMQ and Postgres to a webhook, on
time, once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from producer import Producer, scheduled
from shared import contract, delay
from shared.contract import DueBatch, DueMessage
from shared.topology import DEAD_QUEUE, DUE_QUEUE
from tests.backends import both_backends, waiting_in_delay
from tests.support import (
    Management,
    Worker,
    final_row,
    raw_publish,
    ready_count,
    recipient_row,
    wait_for,
)
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store.schema import message_items, messages


def _items(engine: Engine) -> list[tuple[str, str, int]]:
    with engine.connect() as conn:
        return [
            (r.idempotency_key, r.status, r.attempts)
            for r in conn.execute(
                select(
                    messages.c.idempotency_key, message_items.c.status, message_items.c.attempts
                ).join(message_items, message_items.c.message_id == messages.c.id)
            )
        ]


@both_backends
def test_delays_arrive_in_order_and_less_than_a_second_late(
    settings: Settings, sink: Sink, start_worker: Callable[..., Worker]
) -> None:
    start_worker()
    t0 = datetime.now(UTC) + timedelta(seconds=0.3)
    delays = {"d-9s": 9.0, "d-3s": 3.0, "d-0.5s": 0.5, "d-1.5s": 1.5}
    with Producer(settings.amqp_url) as producer:
        producer.schedule_many(
            scheduled(
                f"c-{key}",
                "reminder",
                "webhook",
                idempotency_key=key,
                deliver_at=t0 + timedelta(seconds=d),
                data={"delay": d},
            )
            for key, d in delays.items()
        )
    wait_for(lambda: len(sink.accepted()) == 4, timeout=20, message="4 webhook calls")
    arrived = sink.accepted()
    assert [r.body["data"]["delay"] for r in arrived] == [0.5, 1.5, 3.0, 9.0]
    for r in arrived:
        lateness = r.at - (t0.timestamp() + r.body["data"]["delay"])
        assert 0 <= lateness < 1.0, f"{r.body['data']['delay']} s delay was {lateness:.3f} s late"
    assert all(r.signature_ok for r in sink.requests)


def _where_it_waits(backend: delay.BackendName, delay_ms: int) -> str:
    """Ladder: the level of the highest bit the ladder carries; plugin: its exchange."""
    if backend == "plugin":
        return delay.PLUGIN_EXCHANGE
    return delay.level_name(delay.levels_visited(delay.ladder_units(delay_ms))[0])


@both_backends
@pytest.mark.parametrize("days", [40, 365], ids=["40-days", "one-year"])
def test_a_long_delay_waits_in_the_delay_not_in_the_due_queue(
    settings: Settings,
    vhost: str,
    management: Management,
    engine: Engine,
    start_worker: Callable[..., Worker],
    delay_backend: delay.BackendName,
    days: int,
) -> None:
    # One year is beyond the plugin's 2**32 ms: uncapped, it would route the message at once.
    start_worker("scheduler")
    wait = timedelta(days=days)
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "renewal", "webhook", delay=wait, idempotency_key="long")
    where = _where_it_waits(delay_backend, int(wait.total_seconds() * 1000))
    if delay_backend == "tiers" and days == 40:
        assert where == "nudge.delay.L21"
    wait_for(
        lambda: waiting_in_delay(management, vhost) == {where: 1},
        timeout=15,
        message=f"the message waiting in {where} alone",
    )
    assert management.queue(vhost, DUE_QUEUE).get("messages", 0) == 0
    if delay_backend == "tiers":
        parked = management.get_messages(vhost, where)[0]
        assert "expiration" not in parked["properties"], "no per-message TTL inside the ladder"
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(messages)) == 1


@both_backends
def test_a_message_the_delay_releases_weeks_early_goes_back_into_the_delay_unsent(
    settings: Settings,
    vhost: str,
    management: Management,
    engine: Engine,
    sink: Sink,
    start_worker: Callable[..., Worker],
    delay_backend: delay.BackendName,
) -> None:
    # 60 days is beyond the plugin's 2**32 ms (49.7 days): it releases the message after 49.7
    # days, and the consumer must send it back for the rest. Here the release is a copy of the
    # due message handed to nudge.due at once, as the plugin (or a ladder cycle) would.
    scheduler = start_worker("scheduler")
    sixty_days = timedelta(days=60)
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "renewal", "webhook", delay=sixty_days, idempotency_key="k60")
    with engine.connect() as conn:
        row = wait_for(
            lambda: conn.execute(select(messages)).first(), timeout=10, message="the stored message"
        )
    where = _where_it_waits(delay_backend, int(sixty_days.total_seconds() * 1000))
    wait_for(
        lambda: waiting_in_delay(management, vhost) == {where: 1},
        timeout=15,
        message=f"the message waiting in {where}",
    )
    scheduler.stop()
    assert row is not None
    due = DueMessage(message_id=row.id, contact_id=row.contact_id, deliver_at=row.deliver_at)
    raw_publish(settings.amqp_url, "", DUE_QUEUE, contract.encode(due))
    start_worker("dispatch")
    wait_for(
        lambda: waiting_in_delay(management, vhost) == {where: 2},
        timeout=15,
        message=f"the early copy back in {where}",
    )
    wait_for(
        lambda: management.queue(vhost, DUE_QUEUE).get("messages", 0) == 0,
        timeout=15,
        message="nudge.due empty (the management API counts every 5 s)",
    )
    assert _items(engine) == [], "not claimed: an early message is only sent back"
    assert sink.requests == []


def test_the_same_request_published_twice_is_stored_and_sent_once(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    start_worker()
    with Producer(settings.amqp_url) as producer:
        for _ in range(3):
            producer.schedule("c-1", "welcome", "webhook", idempotency_key="same-key")
    wait_for(
        lambda: _items(engine) == [("same-key", "sent", 1)], timeout=15, message="one sent row"
    )
    # give any stray duplicate the time to arrive: the due queue must drain first
    wait_for(
        lambda: sink.requests and time.time() - sink.requests[-1].at > 1.0,
        timeout=10,
        message="the sink to go quiet",
    )
    assert len(sink.requests) == 1


def test_the_same_due_message_delivered_twice_calls_the_webhook_once(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    # Store a message (scheduler only), then hand its due message to dispatch twice, as a
    # redelivery after a lost ack would.
    scheduler = start_worker("scheduler")
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", delay=3600, idempotency_key="dup")
    with engine.connect() as conn:
        row = wait_for(
            lambda: conn.execute(select(messages)).first(), timeout=10, message="the stored message"
        )
    scheduler.stop()
    assert row is not None
    due = DueMessage(message_id=row.id, contact_id=row.contact_id, deliver_at=datetime.now(UTC))
    raw_publish(
        settings.amqp_url,
        "nudge.delay.out",
        "0." * delay.LEVELS + "due",
        contract.encode(due),
        copies=2,
    )
    start_worker("dispatch")
    wait_for(lambda: _items(engine) == [("dup", "sent", 1)], timeout=15, message="sent once")
    wait_for(
        lambda: time.time() - sink.requests[-1].at > 1.0, timeout=10, message="the sink to go quiet"
    )
    assert len(sink.requests) == 1


def _stored_ids(engine: Engine, count: int) -> list[tuple[int, int]]:
    query = select(messages.c.id, messages.c.contact_id).order_by(messages.c.id)

    def stored() -> list[tuple[int, int]] | None:
        with engine.connect() as conn:
            rows = [(r.id, r.contact_id) for r in conn.execute(query)]
        return rows if len(rows) == count else None

    found = wait_for(stored, timeout=15, message=f"{count} stored messages")
    assert found is not None
    return found


def test_messages_leaving_the_delay_together_travel_as_one_bundle_each_sent_once(
    settings: Settings,
    vhost: str,
    management: Management,
    sink: Sink,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> None:
    # One scheduler batch (a long batch wait gathers the five), due at the same time: one
    # AMQP message on the ladder instead of five.
    scheduler = start_worker("scheduler", batch_wait_seconds=1.0)
    at = datetime.now(UTC) + timedelta(hours=1)
    with Producer(settings.amqp_url) as producer:
        producer.schedule_many(
            scheduled(f"c-{i}", "welcome", "webhook", idempotency_key=f"b-{i}", deliver_at=at)
            for i in range(5)
        )
    stored = _stored_ids(engine, 5)
    first = delay.level_name(delay.levels_visited(delay.ladder_units(3_590_000))[0])
    wait_for(
        lambda: management.queue(vhost, first).get("messages") == 1,
        timeout=15,
        message=f"one bundle parked in {first}",
    )
    [parked] = management.get_messages(vhost, first)
    bundle = contract.decode_due(parked["payload"].encode(), content_type="application/json")
    assert isinstance(bundle, DueBatch)
    assert [(d.message_id, d.contact_id) for d in bundle.due] == stored
    assert scheduler.metric("nudge_due_batch_size_count") == 1
    scheduler.stop()

    # Due now, and delivered twice (a redelivery after a lost ack): each recipient is sent
    # once, and the bundle is acked once every recipient is settled.
    now = datetime.now(UTC)
    due = DueBatch(due=[d.model_copy(update={"deliver_at": now}) for d in bundle.due])
    raw_publish(
        settings.amqp_url,
        "nudge.delay.out",
        "0." * delay.LEVELS + "due",
        contract.encode(due),
        copies=2,
    )
    start_worker("dispatch")
    wait_for(
        lambda: sorted(_items(engine)) == [(f"b-{i}", "sent", 1) for i in range(5)],
        timeout=15,
        message="five sent rows",
    )
    wait_for(
        lambda: (
            ready_count(settings.amqp_url, DUE_QUEUE) == 0
            and management.queue(vhost, DUE_QUEUE).get("messages_unacknowledged") == 0
        ),
        timeout=15,
        message="both copies acked",
    )
    assert sorted(r.body["contact"]["id"] for r in sink.requests) == [f"c-{i}" for i in range(5)]


def test_a_bundled_recipient_that_cannot_be_sent_is_parked_alone(
    settings: Settings,
    vhost: str,
    management: Management,
    sink: Sink,
    engine: Engine,
    start_worker: Callable[..., Worker],
) -> None:
    scheduler = start_worker("scheduler")
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", delay=3600, idempotency_key="real")
    [(mid, cid)] = _stored_ids(engine, 1)
    scheduler.stop()
    now = datetime.now(UTC)
    unknown = mid + 1000
    bundle = DueBatch(
        due=[
            DueMessage(message_id=mid, contact_id=cid, deliver_at=now),
            DueMessage(message_id=unknown, contact_id=cid, deliver_at=now),
        ]
    )
    raw_publish(
        settings.amqp_url, "nudge.delay.out", "0." * delay.LEVELS + "due", contract.encode(bundle)
    )
    start_worker("dispatch")
    wait_for(lambda: _items(engine) == [("real", "sent", 1)], timeout=15, message="sent")
    wait_for(
        lambda: management.queue(vhost, DEAD_QUEUE).get("messages") == 1,
        timeout=15,
        message="the unknown recipient parked",
    )
    [parked] = management.get_messages(vhost, DEAD_QUEUE)
    assert json.loads(parked["payload"])["message_id"] == unknown, "parked alone"
    assert parked["properties"]["message_id"] == f"due-{unknown}-{cid}-1"
    assert parked["properties"]["headers"]["x-nudge-reason"] == (
        f"due: contact {cid} is not a recipient of message {unknown}"
    )
    wait_for(
        lambda: management.queue(vhost, DUE_QUEUE).get("messages") == 0,
        timeout=15,
        message="the bundle acked",
    )
    assert len(sink.requests) == 1


def test_a_claim_postgres_lost_before_the_send_is_written_at_the_finalise(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    # The claim commits without waiting for the disk. What a Postgres crash between that
    # commit and the WAL flush leaves, played by the receiver: the claimed row is gone when
    # the send completes. The finalise finds nothing claimed, and writes the outcome.
    def lose_the_claim(body: dict[str, Any], n: int) -> tuple[int, dict[str, str]]:
        with engine.begin() as conn:
            conn.execute(message_items.delete())
        return 200, {}

    sink.respond = lose_the_claim
    worker = start_worker()
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="lost")
    row = final_row(engine, "lost")
    assert (row["status"], row["attempts"], row["failures"]) == ("sent", 1, 0)
    assert row["sent_at"] is not None
    with engine.connect() as conn:
        status = conn.scalar(select(messages.c.status).where(messages.c.idempotency_key == "lost"))
    assert status == 3, "the single-recipient message is completed"
    wait_for(lambda: "claims lost by Postgres" in worker.log(), timeout=10, message="the warning")
    wait_for(
        lambda: time.time() - sink.requests[-1].at > 1.0, timeout=10, message="the sink to go quiet"
    )
    assert len(sink.requests) == 1


def test_a_claim_taken_over_by_another_worker_is_not_overwritten_by_the_late_finalise(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    # While the send is in flight the lease runs out and another worker claims the row (the
    # next attempt): the first worker's finalise must leave that claim alone.
    def taken_over(body: dict[str, Any], n: int) -> tuple[int, dict[str, str]]:
        with engine.begin() as conn:
            conn.execute(message_items.update().values(attempts=message_items.c.attempts + 1))
        return 200, {}

    sink.respond = taken_over
    worker = start_worker()
    with Producer(settings.amqp_url) as producer:
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="taken")
    wait_for(
        lambda: worker.metric("nudge_outcomes_total", status="sent") == 1,
        timeout=15,
        message="the first worker's finalise",
    )
    row = recipient_row(engine, "taken")
    assert row is not None
    assert (row["status"], row["attempts"], row["sent_at"]) == ("sending", 2, None)
    assert "claims lost by Postgres" not in worker.log()


def test_an_expired_message_is_recorded_expired_and_never_sent(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    now = datetime.now(UTC)
    with Producer(settings.amqp_url) as producer:
        producer.schedule(
            "c-1",
            "flash_sale",
            "webhook",
            deliver_at=now + timedelta(seconds=1),
            expires_at=now + timedelta(seconds=2),
            idempotency_key="late",
        )
    # no worker runs until after it expired
    wait_for(lambda: datetime.now(UTC) > now + timedelta(seconds=2.2), timeout=5, message="expiry")
    start_worker()
    wait_for(lambda: _items(engine) == [("late", "expired", 1)], timeout=15, message="expired row")
    assert sink.requests == []
