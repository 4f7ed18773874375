"""A message that lists exclusion events is not sent before the events role has recorded
every event published before it fell due: ``nudge.events`` and ``nudge.due`` have no order
between them, and the user who upgraded a second before the trial reminder must not get it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, select

from producer import Producer
from tests.support import Worker, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store.schema import message_items, messages


def outcome(engine: Engine, key: str) -> tuple[str, str | None] | None:
    """(status, reason) of the recipient of the message ``key``."""
    with engine.connect() as conn:
        row = conn.execute(
            select(message_items.c.status, message_items.c.reason)
            .join(messages, message_items.c.message_id == messages.c.id)
            .where(messages.c.idempotency_key == key)
        ).first()
        return None if row is None else (row.status, row.reason)


def has(engine: Engine, key: str, status: str, reason: str) -> Callable[[], bool]:
    def check() -> bool:
        got = outcome(engine, key)
        return got is not None and got[0] == status and reason in (got[1] or "")

    return check


def at(moment: datetime) -> Callable[[], bool]:
    return lambda: datetime.now(UTC) >= moment


def test_an_event_published_just_before_the_due_time_excludes_though_the_events_role_was_down(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    start_worker("events").stop()
    start_worker("scheduler", "dispatch", events_wait_seconds=60)
    due = datetime.now(UTC) + timedelta(seconds=3)
    with Producer(settings.amqp_url) as producer:
        producer.schedule(
            "u-1",
            "trial_end",
            "webhook",
            deliver_at=due,
            idempotency_key="trial",
            exclude_events=["upgrade_subscription"],
        )
        wait_for(at(due - timedelta(milliseconds=200)), timeout=10, interval=0.005)
        producer.track("u-1", "upgrade_subscription", event_id="ev-1")
    published = datetime.now(UTC)
    wait_for(
        has(engine, "trial", "deferred", "events_behind: no events consumer is running"),
        timeout=20,
        message="the reminder waiting for the events role",
    )
    wait_for(at(published + timedelta(seconds=5)), timeout=10, message="5 s")
    start_worker("events")
    wait_for(
        has(engine, "trial", "excluded", "excluded: upgrade_subscription at "),
        timeout=30,
        message="the reminder excluded",
    )
    assert sink.requests == []


def test_past_the_wait_the_recipient_is_deferred_with_the_reason_then_excluded(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    start_worker("scheduler", "dispatch", events_wait_seconds=1)
    with Producer(settings.amqp_url) as producer:
        producer.schedule(
            "u-2",
            "trial_end",
            "webhook",
            delay=1,
            idempotency_key="trial",
            exclude_events=["upgrade_subscription"],
        )
        producer.track("u-2", "upgrade_subscription", event_id="ev-2")
    wait_for(
        has(engine, "trial", "deferred", "not sent after waiting 1s"),
        timeout=20,
        message="the reminder deferred past the wait",
    )
    start_worker("events")
    wait_for(
        has(engine, "trial", "excluded", "excluded: upgrade_subscription at "),
        timeout=30,
        message="the reminder excluded once the event is recorded",
    )
    assert sink.requests == []


def test_a_message_without_exclusion_events_does_not_wait_for_the_events_role(
    settings: Settings, sink: Sink, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    start_worker("scheduler", "dispatch")
    with Producer(settings.amqp_url) as producer:
        producer.schedule("u-3", "welcome", "webhook", idempotency_key="welcome")
    wait_for(has(engine, "welcome", "sent", ""), timeout=20, message="the welcome sent")
