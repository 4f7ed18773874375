"""Producers: confirms and mandatory on every publish; a publish that is not confirmed
raises; many publishes pipeline their confirms."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pika
import pytest

from producer import (
    AsyncProducer,
    BrokerUnavailable,
    InvalidMessage,
    Producer,
    PublishNotConfirmed,
    Scheduled,
    scheduled,
)
from producer.sync_producer import WINDOW
from shared.contract import MAX_BODY_BYTES
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


def test_the_async_producer_sends_nothing_of_a_batch_with_a_request_it_refuses(
    settings: Settings,
) -> None:
    # Request 500's body is over the size limit and request 1000 has no valid channel: the
    # error is the first the requests raise (the channel's), and no request is sent.
    def requests() -> Iterator[Scheduled]:
        for i in range(1000):
            data = {"blob": "x" * MAX_BODY_BYTES} if i == 500 else {}
            yield scheduled(f"c-{i}", "welcome", "log", data=data)
        yield scheduled("c-1000", "welcome", "pigeon")

    async def publish() -> str:
        async with AsyncProducer(settings.amqp_url) as producer:
            with pytest.raises(InvalidMessage) as refused:
                await producer.schedule_many(requests())
            assert ready_count(settings.amqp_url, INTAKE_QUEUE) == 0
            return refused.value.reason

    assert asyncio.run(publish()).startswith("channel: ")

    async def publish_oversized() -> str:
        async with AsyncProducer(settings.amqp_url) as producer:
            with pytest.raises(InvalidMessage) as refused:
                await producer.schedule_many(itertools.islice(requests(), 1000))
            await producer.schedule("c-after", "welcome", "log")
            return refused.value.reason

    assert asyncio.run(publish_oversized()).startswith("body: ")
    assert ready_count(settings.amqp_url, INTAKE_QUEUE) == 1


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


@pytest.mark.parametrize("n", [1, WINDOW])  # WINDOW: the failure comes in the window's wait
def test_a_missing_exchange_raises(settings: Settings, n: int) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    connection.channel().exchange_delete("nudge.intake")
    connection.close()
    requests = [scheduled(f"c-{i}", "welcome", "log") for i in range(n)]
    with (
        Producer(settings.amqp_url) as producer,
        pytest.raises(PublishNotConfirmed, match="NOT_FOUND") as refused,
    ):
        producer.schedule_many(requests)
    assert set(refused.value.failed) == {r.idempotency_key for r in requests}


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


@dataclass(frozen=True)
class _Raw:
    """A request to any route of the intake exchange (the producers' Request protocol)."""

    routing_key: str
    idempotency_key: str
    exchange: str = INTAKE_EXCHANGE
    body: bytes = b"{}"


def _ids_in(amqp_url: str, queue: str) -> set[str]:
    """The message ids in ``queue``, taken out of it."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        ids: set[str] = set()
        while True:
            method, properties, _ = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return ids
            ids.add(properties.message_id)
    finally:
        connection.close()


@pytest.mark.parametrize("kind", ["Producer", "AsyncProducer"])
def test_a_pipelined_publish_names_each_nacked_or_unroutable_key_and_confirms_only_the_rest(
    settings: Settings, kind: str
) -> None:
    # A queue that holds 5 and nacks the publishes beyond (reject-publish), bound beside the
    # intake queue; some publishes go to a routing key bound to nothing.
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = connection.channel()
    channel.queue_declare(
        "capped", durable=True, arguments={"x-max-length": 5, "x-overflow": "reject-publish"}
    )
    channel.queue_bind("capped", INTAKE_EXCHANGE, "capped")
    connection.close()
    batch: list[_Raw] = []
    for i in range(1200):  # more than a window: the failures sit among many confirmed
        route = {300: "capped", 700: "nowhere", 1100: "nowhere"}.get(i, SCHEDULE_KEY)
        if 500 <= i < 510:
            route = "capped"
        batch.append(_Raw(route, f"k-{i}"))

    def publish() -> None:
        if kind == "Producer":
            with Producer(settings.amqp_url) as producer:
                producer.publish(batch)
            return

        async def publish_async() -> None:
            async with AsyncProducer(settings.amqp_url) as producer:
                await producer.publish(batch)

        asyncio.run(publish_async())

    with pytest.raises(PublishNotConfirmed) as refused:
        publish()

    error = refused.value
    queued = _ids_in(settings.amqp_url, INTAKE_QUEUE) | _ids_in(settings.amqp_url, "capped")
    capped = {f"k-{i}" for i in [300, *range(500, 510)]}
    assert len(queued) == 1200 - 2 - 6
    # every key is either confirmed and queued, or named as failed with its reason
    assert set(error.confirmed) == queued
    assert set(error.failed) == {f"k-{i}" for i in range(1200)} - queued
    assert {k for k, why in error.failed.items() if "unroutable" in why} == {"k-700", "k-1100"}
    nacked = {k for k, why in error.failed.items() if "nacked" in why}
    assert len(nacked) == 6
    assert nacked <= capped
    assert "k-700" in str(error)
    assert "8 of 1200 not confirmed" in str(error)
