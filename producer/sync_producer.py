"""The synchronous producer, on pika's BlockingConnection."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from datetime import datetime
from types import TracebackType
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec

from producer.requests import Request, SyncApi, read
from shared import brokers
from shared.contract import CONTENT_TYPE
from shared.errors import BrokerUnavailable, PublishNotConfirmed

#: Publishes in flight before we wait for confirms: bounds memory, keeps the pipe full.
WINDOW = 1000


class Producer(SyncApi):
    """Publishes to Nudge with publisher confirms and ``mandatory`` on every message.

    ``schedule`` returns once the broker confirmed the message into a durable quorum queue;
    ``schedule_many`` pipelines: it publishes up to :data:`WINDOW` messages before waiting for
    their confirms, instead of one round trip each. A message that is not confirmed raises
    :class:`PublishNotConfirmed`; publishing it again with the same idempotency key is safe.
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
        self._pending: dict[int, str] = {}  # delivery tag -> idempotency key
        self._failed: dict[str, str] = {}  # idempotency key -> why
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
        raises :class:`PublishNotConfirmed` naming those that were not."""
        keys: list[str] = []
        try:
            for request in requests:
                self._publish(request)
                keys.append(request.idempotency_key)
                if len(self._pending) >= WINDOW:
                    self._wait_confirms()
            self._wait_confirms()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._reset()
            raise PublishNotConfirmed(f"connection lost while publishing: {exc!r}") from exc
        if self._failed:
            failed, self._failed = self._failed, {}
            detail = "; ".join(f"{k}: {why}" for k, why in list(failed.items())[:5])
            raise PublishNotConfirmed(f"{len(failed)} of {len(keys)} not confirmed ({detail})")
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
            self._next_tag = 1
            self._pending.clear()
            self._returned.clear()
        return self._channel

    def _reset(self) -> None:
        self._pending.clear()
        self.close()

    def _publish(self, request: Request) -> None:
        channel = self._open()
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=request.idempotency_key,
        )
        # The underlying channel only buffers the frames; they go out, and confirms come in,
        # while _wait_confirms pumps the connection.
        channel._impl.basic_publish(
            request.exchange,
            request.routing_key,
            request.body,
            properties=properties,
            mandatory=True,
        )
        self._pending[self._next_tag] = request.idempotency_key
        self._next_tag += 1

    def _wait_confirms(self) -> None:
        deadline = time.monotonic() + self._confirm_timeout
        while self._pending:
            expired = time.monotonic() > deadline
            if expired or self._closed is not None:
                why = self._closed or f"no confirm within {self._confirm_timeout} s"
                for key in self._pending.values():
                    self._failed[key] = why
                self._reset()
                return
            assert self._connection is not None
            self._connection.process_data_events(time_limit=0.05)

    def _on_confirm(self, frame: pika.frame.Method[Any]) -> None:
        method = frame.method
        tags = (
            [t for t in self._pending if t <= method.delivery_tag]
            if method.multiple
            else [method.delivery_tag]
        )
        nacked = isinstance(method, pika.spec.Basic.Nack)
        for tag in tags:
            key = self._pending.pop(tag, None)
            if key is None:
                continue
            if nacked:
                self._failed[key] = "nacked by the broker"
            elif key in self._returned:
                self._returned.discard(key)
                self._failed[key] = "unroutable: run `nudge topology apply`"

    def _on_close(self, _channel: Any, reason: Exception) -> None:
        # e.g. 404 NOT_FOUND when the exchange does not exist: nothing pending will be confirmed
        self._closed = f"channel closed by the broker: {reason}"

    def _on_return(
        self, _channel: Any, _method: Any, properties: pika.BasicProperties, _body: bytes
    ) -> None:
        # RabbitMQ sends basic.return before the basic.ack of an unroutable message.
        if properties.message_id:
            self._returned.add(properties.message_id)
