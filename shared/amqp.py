"""The aio-pika adapter used by workers, the CLI and :class:`producer.AsyncProducer`.

aio-pika and aiormq errors are translated here into :mod:`shared.errors`, and nowhere else.
The consumer loop sees RabbitMQ through two small interfaces, :class:`Inbox` (one queue's
deliveries and their acks) and :class:`Publishes` (confirmed publishes): :class:`QueueInbox`
and :class:`Publisher` are the AMQP ones, :mod:`workers.runtime.testing` has in-memory ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    DeliveryMode,
    ExchangeType,
)
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec
from pamqp.frame import marshal
from pamqp.header import ContentHeader

from shared import brokers, delay, frames
from shared.contract import CONTENT_TYPE
from shared.errors import (
    BrokerUnavailable,
    PublishNotConfirmed,
    SettleFailed,
    TopologyMismatch,
)
from shared.topology import DEAD_EXCHANGE, Topology

#: How long to wait for a publisher confirm. Quorum queues confirm after a quorum fsync, which
#: the docs say can take "a few hundred milliseconds" under load.
CONFIRM_TIMEOUT = 30.0

#: Publishes of one :meth:`Publisher.publish_many` in flight before it waits for confirms, and
#: how many it writes at a time (one ``send``).
PUBLISH_WINDOW = 2000
PUBLISH_CHUNK = 200

#: What an operation on a channel raises when the channel or its connection is gone.
_CHANNEL_ERRORS = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
    ConnectionError,
)
_PUBLISH_ERRORS = (*_CHANNEL_ERRORS, asyncio.TimeoutError)


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection over several nodes of one cluster: every connection attempt after
    the first goes to the next address, round the list, so a connection whose node went down
    reconnects to another one (aio-pika's own reconnects always go back to the same URL).

    The hook is aio-pika's (pinned) private ``__connect_transport``, the one place every attempt
    passes through; its channels, consumers and confirms are restored or failed exactly as for a
    single address.
    """

    def __init__(self, url: Any, *, addresses: Sequence[str], start: int = 0, **kwargs: Any):
        super().__init__(url, **kwargs)
        self._addresses = [type(self.url)(a) for a in addresses]
        self._next = start

    async def _RobustConnection__connect_transport(self) -> None:  # noqa: N802 (aio-pika's name)
        # Keep the query parameters (reconnect_interval, heartbeat...) parsed from the first.
        self.url = self._addresses[self._next % len(self._addresses)]
        self._next += 1
        connect_transport = super()._RobustConnection__connect_transport  # type: ignore[misc]
        await connect_transport()


async def connect(url: str, *, name: str = "nudge") -> AbstractRobustConnection:
    """A connection that reconnects by itself, to the next address of ``url`` (comma-separated
    list of the cluster's nodes) when its node goes; raises :class:`BrokerUnavailable` when
    none of them answers."""
    urls = brokers.addresses(url)
    errors = []
    for start, first in enumerate(urls):
        try:
            return await aio_pika.connect_robust(
                first,
                client_properties={"connection_name": name},
                connection_class=FailoverConnection,
                addresses=urls,
                start=start,
            )
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError) as exc:
            errors.append(f"{_where(first)}: {exc}")
    raise BrokerUnavailable(f"cannot connect to RabbitMQ: {'; '.join(errors)}")


def _where(url: str) -> str:
    """host:port of ``url``, without the credentials."""
    parsed = urllib.parse.urlsplit(url)
    return f"{parsed.hostname}:{parsed.port}"


def connection_user(connection: AbstractRobustConnection) -> str | None:
    """The user ``connection`` logged in as (RabbitMQ's default ``guest`` when its URL names
    none)."""
    url: Any = getattr(connection, "url", None)  # aio-pika's Connection has it, not the ABC
    user: str | None = getattr(url, "user", None)
    return user or "guest"


async def declare(connection: AbstractRobustConnection, topology: Topology) -> None:
    """Declare every exchange, queue and binding of ``topology``; idempotent."""
    channel = await connection.channel()
    try:
        exchanges: dict[str, AbstractExchange] = {}
        for ex in topology.exchanges:
            try:
                exchanges[ex.name] = await channel.declare_exchange(
                    ex.name, ExchangeType(ex.type), durable=ex.durable, arguments=ex.arguments
                )
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise TopologyMismatch(f"exchange {ex.name}: {exc}") from exc
        queues = {}
        for q in topology.queues:
            try:
                queues[q.name] = await channel.declare_queue(
                    q.name, durable=q.durable, arguments=q.arguments
                )
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise TopologyMismatch(
                    f"queue {q.name} exists with other arguments ({exc}); delete it or "
                    "use the arguments in shared/topology.py"
                ) from exc
        for b in topology.bindings:
            if b.destination_type == "queue":
                await queues[b.destination].bind(exchanges[b.source], b.routing_key)
            else:
                await exchanges[b.destination].bind(exchanges[b.source], b.routing_key)
    except aiormq.exceptions.AMQPError as exc:
        raise BrokerUnavailable(f"declaring the topology failed: {exc}") from exc
    finally:
        if not channel.is_closed:
            await channel.close()


async def resolve_backend(
    configured: Literal["auto", "plugin", "tiers"], url: str
) -> delay.BackendName:
    """The delay backend to use: ``configured`` unless it is ``auto``, which asks the broker."""
    if configured == "auto":
        return await detect_backend(url)
    return configured


async def detect_backend(url: str) -> delay.BackendName:
    """``plugin`` when the broker knows the ``x-delayed-message`` exchange type, else ``tiers``.

    Declaring an unknown exchange type is a connection error (503 COMMAND_INVALID), so the
    probe uses a connection of its own.
    """
    connection = None
    errors = []
    for address in brokers.addresses(url):
        try:
            connection = await aio_pika.connect(
                address, client_properties={"connection_name": "nudge-probe"}
            )
            break
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError) as exc:
            errors.append(f"{_where(address)}: {exc}")
    if connection is None:
        raise BrokerUnavailable(f"cannot connect to RabbitMQ: {'; '.join(errors)}")
    quiet = [logging.getLogger(name) for name in ("aiormq", "aio_pika")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # the expected 503 would be logged as a crash
        logger.setLevel(logging.CRITICAL + 1)
    try:
        channel = await connection.channel()
        probe = await channel.declare_exchange(
            "nudge.delay.probe",
            ExchangeType.X_DELAYED_MESSAGE,
            auto_delete=True,
            arguments={"x-delayed-type": "direct"},
        )
        await probe.delete()
        return "plugin"
    except aiormq.exceptions.AMQPError:
        return "tiers"
    finally:
        if not connection.is_closed:
            await connection.close()
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


@dataclass(frozen=True)
class Outgoing:
    """One message to publish."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    headers: Mapping[str, Any] = field(default_factory=dict)
    mandatory: bool = True
    priority: int | None = None


class Publishes(Protocol):
    """Confirmed publishes: what the consumer loop needs of a publisher."""

    async def publish(self, out: Outgoing) -> None:
        """Publish one message; raises :class:`PublishNotConfirmed` unless confirmed."""
        ...

    async def publish_many(self, messages: Iterable[Outgoing]) -> None:
        """Publish all; raises :class:`PublishNotConfirmed` unless every one was confirmed."""
        ...


class Publisher:
    """Publishes with confirms and ``mandatory`` on its own channel; pipelines many publishes.

    ``mandatory`` only means something with confirms: a returned message raises instead of
    being confirmed as if delivered (RabbitMQ confirms unroutable messages at once).

    What it parks in ``nudge.dead`` carries the connection's user as its AMQP ``user_id``:
    RabbitMQ refuses a ``user_id`` other than the publishing connection's user (unless that
    user has the ``impersonator`` tag, which Nudge's users never have), so a parked message
    whose ``user_id`` is a worker user was published by a worker, not forged by a service.
    """

    def __init__(self, channel: AbstractChannel, user_id: str | None = None) -> None:
        self._channel = channel
        self._exchanges: dict[str, AbstractExchange] = {}
        self.user_id = user_id

    @classmethod
    async def open(cls, connection: AbstractRobustConnection) -> Publisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel, connection_user(connection))

    async def close(self) -> None:
        if not self._channel.is_closed:
            await self._channel.close()

    async def _exchange(self, name: str) -> AbstractExchange:
        if name not in self._exchanges:
            self._exchanges[name] = await self._channel.get_exchange(name, ensure=False)
        return self._exchanges[name]

    async def publish(self, out: Outgoing) -> None:
        """Publish one message; raises :class:`PublishNotConfirmed` unless confirmed."""
        message = aio_pika.Message(
            out.body,
            content_type=CONTENT_TYPE,
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=out.message_id,
            headers=dict(out.headers),
            user_id=self.user_id if out.exchange == DEAD_EXCHANGE else None,
        )
        try:
            exchange = await self._exchange(out.exchange)
            await exchange.publish(
                message, out.routing_key, mandatory=out.mandatory, timeout=CONFIRM_TIMEOUT
            )
        except aio_pika.exceptions.PublishError as exc:
            raise PublishNotConfirmed(
                f"returned unroutable by {out.exchange!r} with key {out.routing_key!r}: "
                "run `nudge topology apply`"
            ) from exc
        except _PUBLISH_ERRORS as exc:
            raise PublishNotConfirmed(
                f"publish to {out.exchange!r} not confirmed: {exc!r}"
            ) from exc

    async def publish_many(self, messages: Iterable[Outgoing]) -> None:
        """Publish all with pipelined confirms; raises :class:`PublishNotConfirmed` naming the
        message ids that were not confirmed (and why) once every one has settled.

        Up to :data:`PUBLISH_WINDOW` publishes are in flight, written :data:`PUBLISH_CHUNK` at
        a time in one ``send`` (aiormq's ``basic_publish`` writes each message on its own
        while it holds the channel lock). Their delivery tags and confirmations are registered
        in the aiormq channel as ``basic_publish`` registers them, one :class:`_Chunk` standing
        for a chunk's, so acks (multiple or not), nacks and returns settle them; see
        :class:`_Confirms`.
        """
        ids: list[str] = []
        routes: list[tuple[str, str, bool]] = []
        bodies: list[bytes] = []
        special: dict[int, Outgoing] = {}  # beyond what shared.frames marshals
        for out in messages:
            if out.headers or out.exchange == DEAD_EXCHANGE:
                special[len(ids)] = out
            ids.append(out.message_id)
            routes.append((out.exchange, out.routing_key, out.mandatory))
            bodies.append(out.body)
        await self._publish_all(ids, routes, bodies, special)

    async def publish_plain(
        self, ids: list[str], routes: list[tuple[str, str, bool]], bodies: list[bytes]
    ) -> None:
        """:meth:`publish_many` of messages without headers, given as lists: each one's
        message id, (exchange, routing key, mandatory) and body. What a service publishes,
        without an :class:`Outgoing` per message."""
        await self._publish_all(ids, routes, bodies, {})

    async def _publish_all(
        self,
        ids: list[str],
        routes: list[tuple[str, str, bool]],
        bodies: list[bytes],
        special: Mapping[int, Outgoing],
    ) -> None:
        if not ids:
            return
        confirms = _Confirms(ids, routes)
        try:
            channel: Any = await self._channel.get_underlay_channel()
            _settle_acks_at_once(channel)
            for start in range(0, len(ids), PUBLISH_CHUNK):
                await confirms.wait(channel, PUBLISH_WINDOW - PUBLISH_CHUNK)
                stop = min(start + PUBLISH_CHUNK, len(ids))
                await _write_publishes(
                    channel, confirms, bodies, special, start, stop, self.user_id
                )
            await confirms.wait(channel, 0)
        except _PUBLISH_ERRORS as exc:
            confirms.fail_pending(f"not confirmed: {exc!r}")
        finally:
            confirms.forget()
        if confirms.failed:
            raise PublishNotConfirmed.of(confirms.failed, confirms.confirmed(), len(ids))

    @staticmethod
    def delayed(
        backend: delay.BackendName,
        destination: str,
        delay_ms: int,
        body: bytes,
        message_id: str,
        headers: Mapping[str, Any] | None = None,
    ) -> Outgoing:
        """The :class:`Outgoing` for a delayed publish, without dead-lettering history."""
        r = delay.route(backend, destination, delay_ms)
        return Outgoing(
            r.exchange,
            r.routing_key,
            body,
            message_id,
            {**delay.strip_death(dict(headers or {})), **r.headers},
            mandatory=r.mandatory,
        )

    @staticmethod
    def parked(
        body: bytes,
        message_id: str | None,
        reason: str,
        source_queue: str,
        headers: Mapping[str, Any] | None = None,
    ) -> Outgoing:
        """The :class:`Outgoing` that parks a message in ``nudge.dead`` with the reason it was
        rejected."""
        return Outgoing(
            DEAD_EXCHANGE,
            source_queue,
            body,
            message_id or "",
            {
                **delay.strip_death(dict(headers or {})),
                "x-nudge-reason": reason[:1000],
                "x-nudge-source-queue": source_queue,
            },
        )

    async def dead_letter(
        self,
        body: bytes,
        message_id: str | None,
        reason: str,
        source_queue: str,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Park a message in ``nudge.dead`` with the reason it was rejected."""
        await self.publish(self.parked(body, message_id, reason, source_queue, headers))


def _settle_acks_at_once(channel: Any) -> None:
    """Make the aiormq ``channel`` settle a multiple ack's confirmations as it reads it.

    aiormq schedules one callback per confirmation still registered below the ack's tag, for
    every ack frame: with thousands in flight and acks arriving faster than the callbacks run,
    each confirmation costs four or five callbacks, more than the publish itself.
    This settles each once, as it reads the frame: the tags a multiple ack covers are those
    above the previous multiple ack's, up to its own, so it looks up only those (not every
    confirmation registered). A :meth:`Publisher.publish_many` confirmation (a
    :class:`_Chunk`) is settled in place, any other with the channel's own
    ``_confirm_delivery``. Installed once per underlying channel (a robust channel gets a new
    one after a reconnection).
    """
    if getattr(channel, "_nudge_acks", False):
        return
    floor = [0]  # every tag up to this one was settled by a multiple ack

    async def on_confirm_frame(frame: spec.Basic.Ack | spec.Basic.Nack) -> None:
        confirmations = channel.confirmations
        last = frame.delivery_tag
        if last not in confirmations:
            logging.getLogger(__name__).error("unexpected confirmation %r from broker", frame)
            return
        if getattr(frame, "multiple", False):
            tags: Iterable[int] = range(floor[0] + 1, last + 1)
            floor[0] = max(floor[0], last)
        else:
            tags = (last,)
        nacked = isinstance(frame, spec.Basic.Nack)
        touched: set[_Confirms] = set()
        for tag in tags:
            entry = confirmations.get(tag)
            if entry is None:
                continue
            if entry.__class__ is not _Chunk:  # aiormq's own, or a returned message's
                channel._confirm_delivery(tag, frame)
                continue
            del confirmations[tag]
            confirms = entry.confirms
            index = tag - entry.offset
            if confirms.state[index] == _PENDING:
                if nacked:
                    confirms.fail(index, "nacked by the broker")
                else:
                    confirms.state[index] = _CONFIRMED
                    confirms.pending -= 1
            touched.add(confirms)
        for confirms in touched:
            confirms.wake()

    channel._on_confirm_frame = on_confirm_frame
    channel._nudge_acks = True


#: What :class:`_Confirms` knows of each publish of its batch.
_PENDING, _CONFIRMED, _FAILED = 0, 1, 2


class _Chunk:
    """Stands in the aiormq channel's ``confirmations`` for each publish of one written chunk,
    where ``basic_publish`` puts a future: the delivery tag less ``offset`` is the publish's
    index in the batch. One plain object per chunk, settled by :func:`_settle_acks_at_once`;
    aiormq calls it only when the broker returns a message."""

    __slots__ = ("_channel", "confirms", "offset")

    def __init__(self, confirms: _Confirms, offset: int, channel: Any) -> None:
        self.confirms = confirms
        self.offset = offset
        self._channel = channel

    def done(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def set_result(self, message: object) -> None:
        """A returned publish, on a channel without ``on_return_raises``."""
        self._returned(message)

    def set_exception(self, exc: BaseException) -> None:
        """A returned publish: aiormq found its tag by message id, as for its own."""
        self._returned(getattr(exc, "message", None))

    def _returned(self, message: Any) -> None:
        properties = getattr(getattr(message, "header", None), "properties", None)
        tag = self._channel.message_id_delivery_tag.get(getattr(properties, "message_id", None))
        if tag is None:
            return
        confirms = self.confirms
        index = tag - self.offset
        if 0 <= index < confirms.written and confirms.state[index] == _PENDING:
            exchange, routing_key, _ = confirms.routes[index]
            confirms.fail(
                index,
                f"returned unroutable by {exchange!r} with key {routing_key!r}: "
                "run `nudge topology apply`",
            )
            confirms.wake()


class _Confirms:
    """The confirms of one :meth:`Publisher.publish_many`, as plain lists indexed like the
    batch: each publish's message id, route and state (pending, confirmed, failed), how many
    are pending, which failed and why, and a waiter woken when the pending fall to a limit."""

    def __init__(self, ids: list[str], routes: list[tuple[str, str, bool]]) -> None:
        self.ids = ids
        self.routes = routes
        self.state = bytearray(len(ids))  # all _PENDING
        self.pending = 0  # written and not settled
        self.written = 0  # ids[:written] were put on the write queue
        self.failed: dict[str, str] = {}  # message id -> why
        self._chunks: list[tuple[Any, _Chunk, int, int]] = []  # channel, chunk, first tag, n
        self._limit = 0
        self._waiter: asyncio.Future[None] | None = None

    def register(self, channel: Any, start: int, stop: int) -> None:
        """Take the channel's next delivery tags for ``ids[start:stop]``, as ``basic_publish``
        takes one for each message, with one :class:`_Chunk` standing for them all."""
        first = channel.delivery_tag + 1
        channel.delivery_tag += stop - start
        tags = range(first, first + stop - start)
        chunk = _Chunk(self, first - start, channel)
        channel.confirmations.update(dict.fromkeys(tags, chunk))
        channel.message_id_delivery_tag.update(zip(self.ids[start:stop], tags, strict=True))
        self._chunks.append((channel, chunk, first, stop - start))
        self.pending += stop - start
        self.written = stop

    def fail(self, index: int, why: str) -> None:
        if self.state[index] == _PENDING and index < self.written:
            self.pending -= 1
        self.state[index] = _FAILED
        self.failed[self.ids[index]] = why

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and self.pending <= self._limit and not waiter.done():
            waiter.set_result(None)

    async def wait(self, channel: Any, limit: int) -> None:
        """Until at most ``limit`` are pending; raises when the channel closes first or no
        confirm comes within :data:`CONFIRM_TIMEOUT`."""
        if self.pending <= limit:
            return
        self._limit = limit
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        closing = channel.closing
        try:
            await asyncio.wait(
                (waiter, closing), timeout=CONFIRM_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self._waiter = None
            if not closing.done():
                closing.cancel()  # an observer of its own: cancelling it leaves the channel be
        if self.pending <= limit:
            return
        if closing.done():
            raise aio_pika.exceptions.ChannelInvalidStateError(
                f"channel closed: {closing.exception() if not closing.cancelled() else ''}"
            )
        raise TimeoutError(f"no confirm within {CONFIRM_TIMEOUT} s")

    def fail_pending(self, why: str) -> None:
        """Count every publish still pending (or not yet written) as failed, for ``why``."""
        state = self.state
        for index in range(len(state)):
            if state[index] == _PENDING:
                self.fail(index, why)

    def confirmed(self) -> list[str]:
        """The message ids the broker confirmed."""
        state = self.state
        return [self.ids[i] for i in range(self.written) if state[i] == _CONFIRMED]

    def forget(self) -> None:
        """Drop what the channels still hold of this batch (after a failure, and the ids)."""
        for channel, chunk, first, n in self._chunks:
            confirmations = channel.confirmations
            ids = channel.message_id_delivery_tag
            start = first - chunk.offset
            for tag, message_id in zip(
                range(first, first + n), self.ids[start : start + n], strict=True
            ):
                if confirmations.get(tag) is chunk:
                    del confirmations[tag]
                if ids.get(message_id) == tag:
                    del ids[message_id]
        self._chunks.clear()


async def _write_publishes(
    channel: Any,
    confirms: _Confirms,
    bodies: Sequence[bytes],
    special: Mapping[int, Outgoing],
    start: int,
    stop: int,
    user_id: str | None,
) -> None:
    """Put the publishes ``start:stop`` of the batch on the connection's write queue as one
    frame burst, registering their confirmations (see :meth:`Publisher.publish_many`);
    ``special`` holds those with headers or parked, which pamqp marshals (what goes to
    ``nudge.dead`` carries ``user_id``)."""
    impl: Any = channel  # aiormq.Channel: its confirm bookkeeping is not in the abstract type
    if impl.is_closed:
        raise aio_pika.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    number = impl.number
    methods: dict[tuple[str, str, bool], bytes] = {}  # the same few routes, marshalled once
    max_body = impl.max_content_size
    ids, routes = confirms.ids, confirms.routes
    parts: list[bytes] = []
    content = frames.content
    async with impl.lock:
        for index in range(start, stop):
            route = routes[index]
            method = methods.get(route)
            if method is None:
                exchange, routing_key, mandatory = route
                method = methods[route] = frames.publish_method(
                    number, exchange, routing_key, mandatory=mandatory
                )
            parts.append(method)
            out = special.get(index) if special else None
            if out is None:
                parts.append(content(number, ids[index], bodies[index], max_body))
                continue
            properties = spec.Basic.Properties(
                content_type=CONTENT_TYPE,
                delivery_mode=int(DeliveryMode.PERSISTENT),
                message_id=out.message_id,
                headers=dict(out.headers),
                user_id=user_id if out.exchange == DEAD_EXCHANGE else None,
            )
            parts.append(marshal(ContentHeader(0, len(out.body), properties), number))
            parts.extend(marshal(part, number) for part in impl._split_body(out.body))
        # Only once every frame is built (marshalling can raise): the delivery tags must
        # match what the broker receives.
        confirms.register(impl, start, stop)
        await impl.write_queue.put(ChannelFrame(payload=b"".join(parts), should_close=False))


async def ack_many(messages: Iterable[AbstractIncomingMessage | Delivery]) -> None:
    """Acknowledge deliveries with one write per channel instead of one per message.

    Raises :class:`SettleFailed` when the channel closed since delivery (RabbitMQ then
    redelivers).
    """
    acks: dict[int, tuple[Any, list[Any]]] = {}
    try:
        for message in messages:
            if message.delivery_tag is None:
                continue
            channel: Any = message.channel  # raises ChannelInvalidStateError when closed
            frame = spec.Basic.Ack(delivery_tag=message.delivery_tag)
            acks.setdefault(id(channel), (channel, []))[1].append(frame)
        for channel, frames in acks.values():
            await channel.write_queue.put(ChannelFrame.marshall(channel.number, frames))
    except _CHANNEL_ERRORS as exc:
        raise SettleFailed(f"ack failed: {exc!r}") from exc


class Incoming(Protocol):
    """A delivery as the consumer loop and the roles read it (aio-pika's messages are one)."""

    @property
    def body(self) -> bytes: ...

    @property
    def content_type(self) -> str | None: ...

    @property
    def message_id(self) -> str | None: ...

    @property
    def delivery_mode(self) -> int | None: ...

    @property
    def headers(self) -> Mapping[str, Any]: ...

    @property
    def redelivered(self) -> bool | None:
        """Set by RabbitMQ when the delivery was made before (its ``x-delivery-count`` header
        is then the broker's, not the publisher's)."""
        ...


class Inbox(Protocol):
    """One queue's deliveries, as the consumer loop takes and settles them."""

    async def consume(self, queue: str, on_message: Callable[[Incoming], Awaitable[None]]) -> None:
        """Start handing ``queue``'s deliveries to ``on_message``, one call each."""
        ...

    async def cancel(self) -> None:
        """Stop the deliveries; those already made stay to be settled."""
        ...

    async def ack(self, messages: Sequence[Incoming]) -> None:
        """Settle deliveries as done; raises :class:`SettleFailed` (RabbitMQ redelivers)."""
        ...

    async def nack(self, message: Incoming) -> None:
        """Give a delivery back to its queue; raises :class:`SettleFailed` (RabbitMQ
        redelivers it all the same)."""
        ...


class Delivery:
    """A delivery as the consumer loop reads it (an :class:`Incoming`), straight from aiormq's
    ``DeliveredMessage``: aio-pika's ``IncomingMessage`` copies some twenty properties into
    attributes through a guarded ``__setattr__`` and runs the callback in a task of its own,
    which costs more CPU per delivery than the rest of its way from the socket."""

    __slots__ = ("_message",)

    def __init__(self, message: DeliveredMessage) -> None:
        self._message = message

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def content_type(self) -> str | None:
        return self._message.header.properties.content_type

    @property
    def message_id(self) -> str | None:
        return self._message.header.properties.message_id

    @property
    def delivery_mode(self) -> int | None:
        return self._message.header.properties.delivery_mode

    @property
    def headers(self) -> Mapping[str, Any]:
        return self._message.header.properties.headers or {}

    @property
    def redelivered(self) -> bool | None:
        return self._message.redelivered

    @property
    def delivery_tag(self) -> int | None:
        return self._message.delivery_tag

    @property
    def channel(self) -> Any:
        """The aiormq channel it came on; raises ``ChannelInvalidStateError`` once closed (its
        delivery tag means nothing on another)."""
        channel = self._message.channel
        if channel.is_closed:
            raise aio_pika.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        return channel


class _DeliveryQueue(aio_pika.RobustQueue):
    """A robust queue whose consumers are handed :class:`Delivery` objects in aiormq's task
    for the delivery; restored after a reconnection as aio-pika restores its own."""

    async def consume(  # type: ignore[override]  # takes a callback of Delivery
        self,
        callback: Callable[[Delivery], Awaitable[None]],
        no_ack: bool = False,
        exclusive: bool = False,
        arguments: Any = None,
        consumer_tag: Any = None,
        timeout: Any = None,  # noqa: ASYNC109 (aio-pika's signature)
        robust: bool = True,
    ) -> str:
        async def deliver(message: DeliveredMessage) -> None:
            await callback(Delivery(message))

        channel = await self.channel.get_underlay_channel()
        result = await channel.basic_consume(
            queue=self.name,
            consumer_callback=deliver,
            exclusive=exclusive,
            no_ack=no_ack,
            arguments=arguments,
            consumer_tag=consumer_tag,
            timeout=timeout,
        )
        if result.consumer_tag is None:
            raise RuntimeError(f"consuming {self.name}: no consumer tag")
        if robust:  # what RobustQueue.restore consumes again with
            self._consumers[result.consumer_tag] = dict(
                callback=callback, no_ack=no_ack, exclusive=exclusive, arguments=arguments
            )
        return str(result.consumer_tag)


class QueueInbox:
    """:class:`Inbox` on an aio-pika channel (one per consumed queue: its prefetch is the
    queue's); its deliveries are :class:`Delivery` objects."""

    def __init__(self, channel: AbstractChannel) -> None:
        # The queue object get_queue makes: its consumers get Delivery objects.
        cast(Any, channel).QUEUE_CLASS = _DeliveryQueue
        self._channel = channel
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None

    async def consume(self, queue: str, on_message: Callable[[Incoming], Awaitable[None]]) -> None:
        try:
            # A passive declare, not ensure=False: the robust channel restores only the queues
            # it declared, and with them their consumers, after RabbitMQ comes back.
            self._queue = await self._channel.get_queue(queue, ensure=True)
            self._tag = await cast(_DeliveryQueue, self._queue).consume(on_message)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise TopologyMismatch(
                f"queue {queue} does not exist: run `nudge topology apply`"
            ) from exc
        except _CHANNEL_ERRORS as exc:
            raise BrokerUnavailable(f"cannot consume {queue}: {exc!r}") from exc

    async def cancel(self) -> None:
        if self._queue is None or self._tag is None:
            return
        try:
            await self._queue.cancel(self._tag)
        except _CHANNEL_ERRORS as exc:
            raise BrokerUnavailable(f"cancelling the consumer failed: {exc!r}") from exc

    async def ack(self, messages: Sequence[Incoming]) -> None:
        # Only ever given the messages it delivered, which are Delivery objects.
        await ack_many(cast(Sequence[Delivery], messages))

    async def nack(self, message: Incoming) -> None:
        delivery = cast(Delivery, message)
        try:
            await delivery.channel.basic_nack(delivery.delivery_tag, requeue=True)
        except _CHANNEL_ERRORS as exc:
            raise SettleFailed(f"nack failed: {exc!r}") from exc


async def queue_depths(
    connection: AbstractRobustConnection, names: Sequence[str]
) -> dict[str, int]:
    """Ready messages per queue (passive declare); raises :class:`BrokerError`."""
    try:
        channel = await connection.channel()
    except _CHANNEL_ERRORS as exc:
        raise BrokerUnavailable(f"cannot open a channel: {exc!r}") from exc
    try:
        depths = {}
        for name in names:
            q = await channel.declare_queue(name, passive=True)
            depths[name] = q.declaration_result.message_count or 0
        return depths
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise TopologyMismatch(f"a queue of {list(names)} does not exist: {exc}") from exc
    except _CHANNEL_ERRORS as exc:
        raise BrokerUnavailable(f"queue depths unavailable: {exc!r}") from exc
    finally:
        with contextlib.suppress(*_CHANNEL_ERRORS):  # a closed connection closed it
            if not channel.is_closed:
                await channel.close()
