"""The synchronous producer, on pika's BlockingConnection."""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime
from types import TracebackType
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec

from producer.requests import Request, SyncApi, read
from shared import brokers, frames
from shared.errors import BrokerUnavailable, InvalidMessage, PublishNotConfirmed

#: Publishes in flight before we wait for confirms: bounds memory, keeps the pipe full.
WINDOW = 2000
#: Publishes written to the socket together, in one send.
CHUNK = 200


class Producer(SyncApi):
    """Publishes to Nudge with publisher confirms and ``mandatory`` on every message.

    ``schedule`` returns once the broker confirmed the message into a durable quorum queue;
    ``schedule_many`` pipelines: it keeps up to :data:`WINDOW` messages in flight, instead of
    one round trip each, and returns once every one was confirmed. A message that is not
    confirmed raises :class:`PublishNotConfirmed`, naming its key; publishing it again with
    the same idempotency key is safe.
    Not thread-safe: use one per thread.

    ``url`` names the broker user services publish with, ``nudge-service``
    (``amqp://nudge-service:PASSWORD@host:5672/``): it may publish to the intake, events and
    receipts exchanges only, which is all a producer does (no declaration, no consume).
    """

    def __init__(
        self,
        url: str,
        *,
        confirm_timeout: float = 30.0,
        name: str = "nudge-producer",
    ) -> None:
        self._params = brokers.pika_parameters(url, connection_name=name)
        self._confirm_timeout = confirm_timeout
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._next_tag = 1
        #: delivery tag -> idempotency key, oldest first
        self._pending: OrderedDict[int, str] = OrderedDict()
        self._failed: dict[str, str] = {}  # idempotency key -> why
        self._confirmed: list[str] = []
        self._body_max = 0  # the longest body frame the connection accepts
        self._routes: dict[tuple[str, str], bytes] = {}  # marshalled basic.publish methods
        self._returned: set[str] = set()
        self._closed: str | None = None  # why the broker closed our channel

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._connection.close()
        self._connection = None

    def publish(self, requests: Iterable[Request]) -> list[str]:
        """Publish with pipelined confirms; returns the keys once all were confirmed, or
        raises :class:`PublishNotConfirmed` naming those that were not (its ``confirmed``
        holds those that were).

        Up to :data:`WINDOW` publishes are in flight, written :data:`CHUNK` at a time in one
        send each; the broker's (multiple) acks free the window as they come."""
        keys: list[str] = []
        self._failed = {}
        self._confirmed = []
        chunk: list[bytes] = []
        try:
            for request in requests:
                chunk.append(self._frames(request))
                keys.append(request.idempotency_key)
                if len(chunk) >= CHUNK:
                    self._send(chunk)
                    self._wait_confirms(WINDOW - CHUNK)
            self._send(chunk)
            self._wait_confirms(0)
        except (pika.exceptions.AMQPError, OSError) as exc:
            why = f"connection lost while publishing: {exc!r}"
            self._failed.update({key: why for key in self._pending.values()})
            self._reset()
        except BaseException:
            # The caller's requests raised (e.g. InvalidMessage): settle what was written so
            # that the next publish starts with nothing in flight.
            if self._connection is not None:
                with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                    self._send(chunk)
                    self._wait_confirms(0)
            raise
        if self._failed:
            failed, self._failed = self._failed, {}
            raise PublishNotConfirmed.of(failed, self._confirmed, len(keys))
        return keys

    def mark_read(self, message_id: int, contact: str, *, read_at: datetime | None = None) -> str:
        """Record that ``contact`` (external id) read message ``message_id`` (the
        ``message_id`` of the webhook payload); returns the receipt id once confirmed. The
        first receipt of a recipient wins."""
        return self.publish([read(message_id, contact, read_at=read_at)])[0]

    def _open(self) -> Any:
        if self._connection is None or not self._connection.is_open:
            try:
                self._connection = pika.BlockingConnection(self._params)
            except pika.exceptions.AMQPError as exc:
                raise BrokerUnavailable(f"cannot connect to RabbitMQ: {exc!r}") from exc
            channel = self._connection.channel()
            # BlockingChannel.confirm_delivery() waits for each confirm; we register our own
            # callbacks on the underlying channel to pipeline them.
            impl = channel._impl
            ready: list[bool] = []
            impl.confirm_delivery(
                ack_nack_callback=self._on_confirm, callback=lambda _frame: ready.append(True)
            )
            while not ready:
                self._connection.process_data_events(time_limit=0.1)
            impl.add_on_return_callback(self._on_return)
            impl.add_on_close_callback(self._on_close)
            self._closed = None
            self._channel = channel
            self._body_max = self._connection._impl._body_max_length
            self._routes.clear()
            self._next_tag = 1
            self._pending.clear()
            self._returned.clear()
        return self._channel

    def _reset(self) -> None:
        self._pending.clear()
        self.close()

    def _frames(self, request: Request) -> bytes:
        """The frames of one publish, marshalled as ``Channel.basic_publish`` would, its
        delivery tag registered as pending."""
        channel = self._open()
        number = channel.channel_number
        route = (request.exchange, request.routing_key)
        if route not in self._routes:  # the same few routes: marshalled once
            self._routes[route] = frames.publish_method(
                number, request.exchange, request.routing_key, mandatory=True
            )
        try:
            publish = self._routes[route] + frames.content(
                number, request.idempotency_key, request.body, self._body_max
            )
        except ValueError as exc:
            raise InvalidMessage(f"idempotency key: {exc}") from exc
        self._pending[self._next_tag] = request.idempotency_key
        self._next_tag += 1
        return publish

    def _send(self, chunk: list[bytes]) -> None:
        """Write ``chunk``'s publishes in one send (pika writes each frame with a send of its
        own), unless the broker closed the channel: then they are failed by the wait."""
        if chunk and self._closed is None:
            assert self._connection is not None
            self._connection._impl._output_marshaled_frames([b"".join(chunk)])
        chunk.clear()

    def _wait_confirms(self, limit: int) -> None:
        """Read confirms until at most ``limit`` publishes are pending, flushing the writes."""
        if self._connection is None:  # reset by a failure: what was pending is failed already
            return
        deadline = time.monotonic() + self._confirm_timeout
        timer = self._connection.call_later(self._confirm_timeout, lambda: None)  # wakes poll
        try:
            # BlockingConnection's own loop: polls (without spinning) until the writes are
            # flushed and the predicate holds; confirms are handled in _on_confirm meanwhile.
            self._connection._flush_output(
                lambda: (
                    len(self._pending) <= limit
                    or self._closed is not None
                    or time.monotonic() > deadline
                )
            )
        finally:
            if self._connection.is_open:
                self._connection.remove_timeout(timer)
        if len(self._pending) > limit:
            why = self._closed or f"no confirm within {self._confirm_timeout} s"
            for key in self._pending.values():
                self._failed[key] = why
            self._reset()

    def _on_confirm(self, frame: pika.frame.Method[Any]) -> None:
        method = frame.method
        if method.multiple:  # every pending tag up to this one: the oldest are first
            tags = []
            for tag in self._pending:
                if tag > method.delivery_tag:
                    break
                tags.append(tag)
        else:
            tags = [method.delivery_tag]
        nacked = isinstance(method, pika.spec.Basic.Nack)
        for tag in tags:
            key = self._pending.pop(tag, None)
            if key is None:
                continue
            if nacked:
                self._failed[key] = "nacked by the broker"
            elif key in self._returned:
                self._returned.discard(key)
                self._failed[key] = "returned unroutable: run `nudge topology apply`"
            else:
                self._confirmed.append(key)

    def _on_close(self, _channel: Any, reason: Exception) -> None:
        # e.g. 404 NOT_FOUND when the exchange does not exist: nothing pending will be confirmed
        self._closed = f"channel closed by the broker: {reason}"

    def _on_return(
        self, _channel: Any, _method: Any, properties: pika.BasicProperties, _body: bytes
    ) -> None:
        # RabbitMQ sends basic.return before the basic.ack of an unroutable message.
        if properties.message_id:
            self._returned.add(properties.message_id)
