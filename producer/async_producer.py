"""The asyncio producer, on aio-pika."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Unpack

from aio_pika.abc import AbstractRobustConnection

from producer.requests import Contact, Request, Scheduled, read, scheduled, tracked
from shared import amqp
from shared.contract import ScheduleOptions
from shared.errors import InvalidMessage


class AsyncProducer:
    """The asyncio twin of :class:`producer.Producer`: confirms and ``mandatory`` on every
    publish, a window of confirms in flight in :meth:`publish` (see
    :meth:`shared.amqp.Publisher.publish_many`), reconnects by itself. ``url`` names
    the ``nudge-service`` user, as for :class:`producer.Producer`."""

    def __init__(self, url: str, *, name: str = "nudge-producer") -> None:
        self._url = url
        self._name = name
        self._connection: AbstractRobustConnection | None = None
        self._publisher: amqp.Publisher | None = None

    async def __aenter__(self) -> AsyncProducer:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _open(self) -> amqp.Publisher:
        if self._publisher is None:
            self._connection = await amqp.connect(self._url, name=self._name)
            self._publisher = await amqp.Publisher.open(self._connection)
        return self._publisher

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()
        if self._connection is not None:
            await self._connection.close()
        self._publisher = self._connection = None

    async def publish(self, requests: Iterable[Request]) -> list[str]:
        """Publish all with pipelined confirms; returns the keys once every one was confirmed,
        or raises :class:`~shared.errors.PublishNotConfirmed` naming those that were not."""
        publisher = await self._open()
        # Every request is taken (validated, by a generator) before anything is sent, and
        # kept only as its key, route and body: a batch of requests kept alive whole would
        # make each of the garbage collector's full passes longer.
        keys: list[str] = []
        routes: list[tuple[str, str, bool]] = []
        bodies: list[bytes] = []
        known: dict[tuple[str, str, bool], tuple[str, str, bool]] = {}  # one tuple per route
        too_large: InvalidMessage | None = None  # raised once every request was taken
        for r in requests:
            route = (r.exchange, r.routing_key, True)
            routes.append(known.setdefault(route, route))
            keys.append(r.idempotency_key)
            try:
                bodies.append(r.body)
            except InvalidMessage as exc:
                too_large = too_large or exc
                bodies.append(b"")
        if too_large is not None:
            raise too_large
        await publisher.publish_plain(keys, routes, bodies)
        return keys

    async def schedule(
        self,
        contact: Contact,
        template: str,
        channel: str,
        *,
        idempotency_key: str | None = None,
        **options: Unpack[ScheduleOptions],
    ) -> str:
        """Schedule one message (arguments as :func:`producer.scheduled`); returns its
        idempotency key once confirmed."""
        request = scheduled(contact, template, channel, idempotency_key=idempotency_key, **options)
        return (await self.publish([request]))[0]

    async def schedule_many(self, requests: Iterable[Scheduled]) -> list[str]:
        """Publish many :func:`producer.scheduled` requests, confirms awaited together."""
        return await self.publish(requests)

    async def track(
        self,
        contact: Contact,
        event: str,
        *,
        data: Mapping[str, Any] | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> str:
        """Record that ``contact`` did ``event``; returns the event id once confirmed."""
        request = tracked(contact, event, data=data, occurred_at=occurred_at, event_id=event_id)
        return (await self.publish([request]))[0]

    async def mark_read(
        self, message_id: int, contact: str, *, read_at: datetime | None = None
    ) -> str:
        """Record that ``contact`` read message ``message_id``; returns the receipt id once
        confirmed. The first receipt of a recipient wins."""
        return (await self.publish([read(message_id, contact, read_at=read_at)]))[0]
