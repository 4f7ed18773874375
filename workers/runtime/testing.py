"""An in-memory broker for unit tests of the consumer loop, without RabbitMQ.

:class:`InMemoryBroker` stands in for one queue's channel (its :attr:`~InMemoryBroker.inbox`)
and for the publisher (its :attr:`~InMemoryBroker.publisher`), and journals every broker
operation in the order the consumer made it::

    broker = InMemoryBroker()
    consumer = Consumer(handler, broker.inbox, broker.publisher, "tiers", ...)
    await consumer.start()
    await broker.deliver(b"{...}", message_id="m-1")
    await broker.join()  # every delivery acked or given back
    assert broker.journal == [("ack", "m-1")]

Deliveries are handed to the consumer at once, in the caller's task; the broker never
redelivers what was given back. Integration tests use the real RabbitMQ.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.amqp import Incoming, Outgoing
from shared.contract import CONTENT_TYPE
from shared.errors import PublishNotConfirmed, SettleFailed

#: A broker operation and the AMQP message_id it concerned.
Operation = tuple[Literal["publish", "ack", "nack"], str]


@dataclass(eq=False)
class StubMessage:
    """A delivery: what :class:`~shared.amqp.Incoming` reads."""

    body: bytes
    message_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = CONTENT_TYPE
    delivery_mode: int | None = 2


class InMemoryInbox:
    """:class:`~shared.amqp.Inbox` over :class:`InMemoryBroker`."""

    def __init__(self, broker: InMemoryBroker) -> None:
        self._broker = broker

    async def consume(self, queue: str, on_message: Callable[[Incoming], Awaitable[None]]) -> None:
        self._broker.queue = queue
        self._broker.on_message = on_message

    async def cancel(self) -> None:
        self._broker.on_message = None

    async def ack(self, messages: Sequence[Incoming]) -> None:
        for message in messages:
            self._broker.settle("ack", message)

    async def nack(self, message: Incoming) -> None:
        self._broker.settle("nack", message)


class InMemoryPublisher:
    """:class:`~shared.amqp.Publishes` over :class:`InMemoryBroker`: records what is
    published, or refuses it all while the broker's ``refuse_publishes`` is set."""

    def __init__(self, broker: InMemoryBroker) -> None:
        self._broker = broker

    async def publish(self, out: Outgoing) -> None:
        await self.publish_many([out])

    async def publish_many(self, messages: Iterable[Outgoing]) -> None:
        batch = list(messages)
        if self._broker.refuse_publishes:
            raise PublishNotConfirmed(f"{len(batch)} publishes refused by the in-memory broker")
        for out in batch:
            self._broker.published.append(out)
            self._broker.journal.append(("publish", out.message_id))


class InMemoryBroker:
    """One queue's deliveries and the publishes made while handling them."""

    def __init__(self) -> None:
        self.inbox = InMemoryInbox(self)
        self.publisher = InMemoryPublisher(self)
        #: The queue consumed, once the consumer started.
        self.queue: str | None = None
        self.on_message: Callable[[Incoming], Awaitable[None]] | None = None
        #: Every publish, ack and nack, in order.
        self.journal: list[Operation] = []
        self.published: list[Outgoing] = []
        self.delivered: list[StubMessage] = []
        #: Publishes raise :class:`~shared.errors.PublishNotConfirmed` while this is set.
        self.refuse_publishes = False
        #: Acks and nacks raise :class:`~shared.errors.SettleFailed` while this is set (the
        #: channel closed since the delivery).
        self.channel_closed = False
        self._settled: dict[int, str] = {}
        self._changed = asyncio.Event()

    async def deliver(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        content_type: str | None = CONTENT_TYPE,
    ) -> StubMessage:
        """Hand a message to the consumer, as RabbitMQ delivers one."""
        if self.on_message is None:
            raise RuntimeError("nothing consumes the in-memory queue: start the consumer")
        message = StubMessage(body, message_id, dict(headers or {}), content_type)
        self.delivered.append(message)
        await self.on_message(message)
        return message

    def settle(self, operation: Literal["ack", "nack"], message: Incoming) -> None:
        """Record an ack or a nack (called by the inbox)."""
        if self.channel_closed:
            raise SettleFailed(f"{operation} failed: the in-memory channel is closed")
        if id(message) in self._settled:
            raise AssertionError(f"{message.message_id} settled twice")
        self._settled[id(message)] = operation
        self.journal.append((operation, message.message_id or ""))
        self._changed.set()

    @property
    def acked(self) -> list[str | None]:
        """The message ids of the deliveries acked, in delivery order."""
        return [m.message_id for m in self.delivered if self._settled.get(id(m)) == "ack"]

    @property
    def nacked(self) -> list[str | None]:
        """The message ids of the deliveries given back to the queue, in delivery order."""
        return [m.message_id for m in self.delivered if self._settled.get(id(m)) == "nack"]

    async def join(self, within: float = 5.0) -> None:
        """Wait until every delivery was acked or given back; ``TimeoutError`` naming those
        left after ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                while True:
                    self._changed.clear()
                    if all(id(m) in self._settled for m in self.delivered):
                        return
                    await self._changed.wait()
        except TimeoutError:
            left = [m.message_id for m in self.delivered if id(m) not in self._settled]
            raise TimeoutError(f"not settled within {within} s: {left}") from None
