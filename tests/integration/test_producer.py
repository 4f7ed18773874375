"""Producers: confirms and mandatory on every publish; a publish that is not confirmed
raises; many publishes pipeline their confirms."""

from __future__ import annotations

import asyncio
import time

import pika
import pytest

from producer import AsyncProducer, BrokerUnavailable, Producer, PublishNotConfirmed, scheduled
from shared.topology import INTAKE_EXCHANGE, INTAKE_QUEUE, SCHEDULE_KEY
from tests.support import Management, free_port, ready_count
from workers.config import Settings


def test_schedule_many_pipelines_thousands_of_confirmed_publishes(settings: Settings) -> None:
    n = 3000
    requests = [scheduled(f"c-{i}", "welcome", "log", delay=60) for i in range(n)]
    started = time.monotonic()
    with Producer(settings.amqp_url) as producer:
        keys = producer.schedule_many(requests)
    elapsed = time.monotonic() - started
    assert len(set(keys)) == n
    assert ready_count(settings.amqp_url, INTAKE_QUEUE) == n
    print(f"sync producer: {n / elapsed:.0f} confirmed msg/s")


def test_the_async_producer_publishes_with_confirms(settings: Settings) -> None:
    async def publish() -> list[str]:
        async with AsyncProducer(settings.amqp_url) as producer:
            first = await producer.schedule("c-1", "welcome", "log", idempotency_key="a-1")
            rest = await producer.schedule_many(
                scheduled(f"c-{i}", "welcome", "log") for i in range(500)
            )
            return [first, *rest]

    keys = asyncio.run(publish())
    assert keys[0] == "a-1"
    assert ready_count(settings.amqp_url, INTAKE_QUEUE) == 501


def test_an_unroutable_publish_raises_instead_of_vanishing(
    settings: Settings, vhost: str, management: Management
) -> None:
    # Break the route: unbind the intake queue, as a half-applied topology would.
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    connection.channel().queue_unbind(INTAKE_QUEUE, "nudge.intake", "schedule")
    connection.close()
    with (
        Producer(settings.amqp_url) as producer,
        pytest.raises(PublishNotConfirmed, match="unroutable"),
    ):
        producer.schedule("c-1", "welcome", "log")

    async def publish_async() -> None:
        async with AsyncProducer(settings.amqp_url) as producer:
            await producer.schedule("c-1", "welcome", "log")

    with pytest.raises(PublishNotConfirmed, match="unroutable"):
        asyncio.run(publish_async())


def test_a_missing_exchange_raises(settings: Settings) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    connection.channel().exchange_delete("nudge.intake")
    connection.close()
    with (
        Producer(settings.amqp_url) as producer,
        pytest.raises(PublishNotConfirmed, match="NOT_FOUND"),
    ):
        producer.schedule("c-1", "welcome", "log")


def test_no_broker_raises_broker_unavailable() -> None:
    with (
        Producer(f"amqp://guest:guest@127.0.0.1:{free_port()}/") as producer,
        pytest.raises(BrokerUnavailable),
    ):
        producer.schedule("c-1", "welcome", "log")


def test_the_broker_refuses_a_body_above_its_size_cap_at_the_publish(settings: Settings) -> None:
    # max_message_size sits just above the contract's limit: such a body is never queued
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=2, message_id="huge")
        channel.basic_publish(
            INTAKE_EXCHANGE, SCHEDULE_KEY, b"x" * 300_000, properties, mandatory=True
        )  # at the cap: queued
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            channel.basic_publish(
                INTAKE_EXCHANGE, SCHEDULE_KEY, b"x" * 300_001, properties, mandatory=True
            )
        assert info.value.reply_code == 406
        assert "larger than configured max size" in info.value.reply_text
    finally:
        if connection.is_open:
            connection.close()
    assert ready_count(settings.amqp_url, INTAKE_QUEUE) == 1
