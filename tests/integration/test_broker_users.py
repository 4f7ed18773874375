"""The broker's users: a service may publish what the contract says and nothing else; the
workers run with their own user. Each test creates the users (from shared/topology.py) on its
own vhost through the management API."""

from __future__ import annotations

import asyncio
import secrets
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions
import pytest
from sqlalchemy import Engine, select

from producer import AsyncProducer, Producer, PublishNotConfirmed
from shared import contract, delay, topology
from shared.contract import DueMessage
from tests.support import Management, Worker, final_row, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store.schema import contact_events, contacts, message_items, messages


class Users:
    """AMQP URLs of this test's service and worker users."""

    def __init__(self, settings: Settings, suffix: str, passwords: dict[str, str]) -> None:
        parts = urllib.parse.urlsplit(settings.amqp_url)
        host = f"{parts.hostname}:{parts.port}"

        def url(user: str) -> str:
            name = urllib.parse.quote(user + suffix, safe="")
            password = urllib.parse.quote(passwords[user], safe="")
            return urllib.parse.urlunsplit(parts._replace(netloc=f"{name}:{password}@{host}"))

        self.service = url(topology.SERVICE_USER)
        self.worker = url(topology.WORKER_USER)


@pytest.fixture
def users(settings: Settings, vhost: str, management: Management) -> Iterator[Users]:
    suffix = f"-{vhost}"
    passwords = {u.name: secrets.token_urlsafe(24) for u in topology.users()}
    management.import_users(topology.users_definitions(vhost, passwords, suffix=suffix))
    yield Users(settings, suffix, passwords)
    for u in topology.users():
        management.delete_user(u.name + suffix)


def _refusal(url: str, exchange: str, routing_key: str, body: bytes) -> str:
    """Publish as a service in another language would (confirms, mandatory); returns the
    broker's reply when it closes the channel, or fails if the publish went through."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(content_type=contract.CONTENT_TYPE, delivery_mode=2)
        try:
            channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            return f"{exc.reply_code} {exc.reply_text}"
        raise AssertionError(f"the broker accepted a publish to {exchange!r} ({routing_key!r})")
    finally:
        if connection.is_open:
            connection.close()


def _sent_to(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(contacts.c.external_id, message_items.c.status).join(
                message_items, message_items.c.contact_id == contacts.c.id
            )
        )
        return {r.external_id: r.status for r in rows}


def test_the_service_user_cannot_publish_to_the_ladder_due_dead_or_control_and_nothing_is_sent(
    settings: Settings,
    users: Users,
    engine: Engine,
    management: Management,
    vhost: str,
    sink: Sink,
    start_worker: Callable[..., Worker],
) -> None:
    start_worker("scheduler", "dispatch", amqp_url=users.worker)
    with Producer(users.service) as producer:
        producer.schedule("victim", "reminder", "webhook", idempotency_key="real", delay=3600)
    stored_id = wait_for(
        lambda: _stored_message(engine, "real"), message="the real message to be stored"
    )
    with engine.begin() as conn:
        other = conn.execute(
            contacts.insert().values(external_id="intruder").returning(contacts.c.id)
        ).scalar_one()
    # A due message that would send the victim's message to another contact, at once.
    forged = contract.encode(
        DueMessage(message_id=stored_id, contact_id=other, deliver_at=datetime.now(UTC))
    )
    due_key = delay.tiers_routing_key(0, topology.DUE_DESTINATION)
    targets = [
        (delay.level_name(2), delay.tiers_routing_key(4, topology.DUE_DESTINATION)),
        (delay.TIERS_OUTPUT_EXCHANGE, due_key),
        ("", topology.DUE_QUEUE),  # the default exchange, straight into the queue
        ("", topology.DUE_TRANSACTIONAL_QUEUE),
        (topology.DEAD_EXCHANGE, topology.DUE_QUEUE),
        (topology.CONTROL_EXCHANGE, ""),
        (topology.BATCHES_EXCHANGE, topology.BATCH_KEY),
        (topology.PLAN_EXCHANGE, topology.PLAN_KEY),
    ]
    for exchange, key in targets:
        reply = _refusal(users.service, exchange, key, forged)
        assert reply.startswith("403 ACCESS_REFUSED"), (exchange, reply)
        assert (exchange or "amq.default") in reply
    # Our own producer says why, too.
    with Producer(users.service) as producer, pytest.raises(PublishNotConfirmed) as refused:
        producer.publish([_Raw(topology.DEAD_EXCHANGE, "", forged)])
    assert "ACCESS_REFUSED" in str(refused.value)
    # A message published after the forgeries is delivered: had any of them got through, it
    # would have been handled before this one.
    with Producer(users.service) as producer:
        producer.schedule("bystander", "reminder", "webhook", idempotency_key="after")
    assert final_row(engine, "after")["status"] == "sent"
    assert [r.body["contact"]["id"] for r in sink.accepted()] == ["bystander"]
    assert _sent_to(engine) == {"bystander": "sent"}
    queues = management.queues(vhost)
    for name in (topology.DUE_QUEUE, topology.DUE_TRANSACTIONAL_QUEUE, topology.DEAD_QUEUE):
        assert queues[name].get("messages", 0) == 0, name


def test_the_service_user_cannot_read_or_declare(users: Users) -> None:
    actions: list[Callable[[Any], object]] = [
        lambda ch: ch.basic_get(topology.DUE_QUEUE),
        lambda ch: ch.basic_get(topology.DEAD_QUEUE),
        lambda ch: ch.queue_declare("nudge.mine", durable=True),
        lambda ch: ch.queue_purge(topology.DUE_QUEUE),
        lambda ch: ch.exchange_delete(topology.INTAKE_EXCHANGE),
    ]
    for action in actions:
        connection = pika.BlockingConnection(pika.URLParameters(users.service))
        try:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                action(connection.channel())
            assert refused.value.reply_code == 403
        finally:
            if connection.is_open:
                connection.close()


def test_the_service_user_schedules_tracks_and_reports_reads_with_both_producers(
    settings: Settings,
    users: Users,
    engine: Engine,
    sink: Sink,
    start_worker: Callable[..., Worker],
) -> None:
    start_worker("scheduler", "dispatch", "events", "receipts", amqp_url=users.worker)
    with Producer(users.service) as producer:
        producer.track("c-1", "signed_up", event_id="ev-sync")
        producer.schedule("c-1", "welcome", "webhook", idempotency_key="sync")

    async def publish_async() -> None:
        async with AsyncProducer(users.service) as producer:
            await producer.track("c-2", "signed_up", event_id="ev-async")
            await producer.schedule("c-2", "welcome", "webhook", idempotency_key="async")

    asyncio.run(publish_async())
    for key in ("sync", "async"):
        assert final_row(engine, key)["status"] == "sent"
    wait_for(lambda: _events(engine) == {"ev-sync", "ev-async"}, message="both events")
    message_id = next(
        r.body["message_id"] for r in sink.accepted() if r.body["contact"]["id"] == "c-1"
    )
    read_at = datetime.now(UTC) - timedelta(seconds=5)
    with Producer(users.service) as producer:
        producer.mark_read(message_id, "c-1", read_at=read_at)
    read = wait_for(lambda: final_row(engine, "sync")["read_at"], message="the read receipt")
    assert read == read_at


class _Raw:
    """A request our producer publishes as is."""

    def __init__(self, exchange: str, routing_key: str, body: bytes) -> None:
        self.exchange, self.routing_key, self.body = exchange, routing_key, body
        self.idempotency_key = "raw-1"


def _stored_message(engine: Engine, key: str) -> int | None:
    with engine.connect() as conn:
        found: int | None = conn.execute(
            select(messages.c.id).where(messages.c.idempotency_key == key)
        ).scalar()
    return found


def _events(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(contact_events.c.event_id)).scalars())
