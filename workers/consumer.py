"""The consumer loop shared by every worker role.

Deliveries are decoded (bad input is parked in ``nudge.dead`` at once, with a reason naming the
field), held in memory if they arrived a little early, gathered into batches and handed to the
role's handler, whose :mod:`~workers.outcomes` are mapped to ack / republish / dead-letter.
Acks come only after the handler's Postgres work committed and every republish was confirmed:
a crash at any point leaves the message unacked, and RabbitMQ redelivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, Protocol, TypeVar

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from shared import delay
from shared.amqp import Outgoing, Publisher, ack_many
from shared.errors import BrokerError, InvalidMessage, PublishNotConfirmed, StoreUnavailable
from workers import metrics
from workers.outcomes import Done, Outcome, Reject, Retry

log = structlog.get_logger("nudge.consumer")

T = TypeVar("T")

#: Held messages are released in ticks of this many seconds: a message is handled at most one
#: tick after it falls due, and the messages of one tick make one batch.
HOLD_TICK = 0.02


class Handler(Protocol[T]):
    """A worker role's logic for one queue."""

    queue: str
    #: The delay destination that leads back to ``queue`` (for retries), if any.
    destination: str | None

    def decode(self, message: AbstractIncomingMessage) -> T:
        """Parse a delivery; raise :class:`InvalidMessage` naming the field."""
        ...

    def due_at(self, item: T) -> datetime | None:
        """When the item may be handled; ``None`` means now."""
        ...

    async def handle(self, batch: Sequence[T]) -> Sequence[Outcome]:
        """Handle a batch; one outcome per item, in order."""
        ...


@dataclass
class _Inbound(Generic[T]):
    item: T
    message: AbstractIncomingMessage
    #: Released from the hold: its tick came as a whole, waiting for more adds lateness only.
    held: bool = False


_ACK_ERRORS = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
    ConnectionError,
)


class Consumer(Generic[T]):
    """Consumes one queue with ``concurrency`` batches in flight."""

    def __init__(
        self,
        handler: Handler[T],
        channel: AbstractChannel,
        publisher: Publisher,
        backend: delay.BackendName,
        *,
        concurrency: int,
        batch_size: int,
        batch_wait: float,
    ) -> None:
        self.handler = handler
        self._channel = channel
        self._publisher = publisher
        self._backend = backend
        self._concurrency = concurrency
        self._batch_size = batch_size
        self._batch_wait = batch_wait
        self._ready: asyncio.Queue[_Inbound[T]] = asyncio.Queue()
        #: Early messages by the tick they fall due in; one timer per tick releases them
        #: together, so they are handled as one batch.
        self._held: dict[int, list[_Inbound[T]]] = {}
        self._held_count = 0
        self._busy = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._stopping = False
        self.last_activity = time.monotonic()

    @property
    def idle(self) -> bool:
        """Nothing held, queued or being handled."""
        return not self._held and self._ready.empty() and self._busy == 0

    async def start(self) -> None:
        # A passive declare, not ensure=False: the robust channel restores only the queues it
        # declared, and with them their consumers, after RabbitMQ comes back.
        self._queue = await self._channel.get_queue(self.handler.queue, ensure=True)
        self._tasks = [
            asyncio.create_task(self._batches(), name=f"batch-{i}")
            for i in range(self._concurrency)
        ]
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop consuming, finish what was received (held messages included), then return."""
        self._stopping = True
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(*_ACK_ERRORS):
                await self._queue.cancel(self._tag)
        deadline = time.monotonic() + grace
        while not self.idle and time.monotonic() < deadline:  # noqa: ASYNC110 (cheap poll)
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.last_activity = time.monotonic()
        metrics.received.labels(self.handler.queue).inc()
        try:
            item = self.handler.decode(message)
        except InvalidMessage as exc:
            await self._settle(message, Reject(exc.reason))
            return
        due = self.handler.due_at(item)
        wait = (due - datetime.now(UTC)).total_seconds() if due else 0.0
        if wait <= 0:
            self._ready.put_nowait(_Inbound(item, message))
        elif wait * 1000 > delay.HOLD_LIMIT.total_seconds() * 1000 or self._stopping:
            # Too early to hold (the plugin caps x-delay at ~49.7 days, a re-delay may be
            # long): back into the delay for the rest.
            await self._settle(message, Retry(int(wait * 1000)))
        else:
            # Rounded up to a tick: never before it is due, at most one tick late.
            tick = math.ceil((time.time() + wait) / HOLD_TICK)
            bucket = self._held.get(tick)
            if bucket is None:
                bucket = self._held[tick] = []
                asyncio.get_running_loop().call_later(
                    tick * HOLD_TICK - time.time(), self._release, tick
                )
            bucket.append(_Inbound(item, message))
            self._held_count += 1
            metrics.held.labels(self.handler.queue).set(self._held_count)

    def _release(self, tick: int) -> None:
        bucket = self._held.pop(tick, [])
        self._held_count -= len(bucket)
        metrics.held.labels(self.handler.queue).set(self._held_count)
        for inbound in bucket:
            inbound.held = True
            self._ready.put_nowait(inbound)

    async def _batches(self) -> None:
        while True:
            first = await self._ready.get()
            self._busy += 1
            try:
                batch = [first]
                deadline = time.monotonic() + self._batch_wait
                while len(batch) < self._batch_size:
                    try:
                        batch.append(self._ready.get_nowait())
                        continue
                    except asyncio.QueueEmpty:
                        pass
                    if batch[-1].held:
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._ready.get(), remaining))
                    except TimeoutError:
                        break
                await self._handle(batch)
            finally:
                self._busy -= 1
                self.last_activity = time.monotonic()

    async def _handle(self, batch: list[_Inbound[T]]) -> None:
        metrics.batch_size.labels(self.handler.queue).observe(len(batch))
        backoff = 0.5
        while True:
            try:
                outcomes = await self.handler.handle([b.item for b in batch])
                break
            except (StoreUnavailable, BrokerError) as exc:
                # Postgres or RabbitMQ is restarting or unreachable: keep the messages
                # (unacked) and try again, rather than burning their delivery count.
                metrics.store_unavailable.labels(self.handler.queue).inc()
                if self._stopping:  # give the messages back; another worker will take them
                    await asyncio.gather(*(self._nack(b.message) for b in batch))
                    return
                log.warning(
                    "infrastructure unavailable, retrying batch",
                    error=str(exc),
                    size=len(batch),
                    retry_in=backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:
                if len(batch) > 1:  # find the poison message: the others go through
                    for inbound in batch:
                        await self._handle([inbound])
                    return
                log.exception(
                    "handler crashed; message returned to the queue",
                    queue=self.handler.queue,
                    message_id=batch[0].message.message_id,
                )
                await self._nack(batch[0].message)
                return
        await self._settle_batch([b.message for b in batch], outcomes)

    async def _settle_batch(
        self, batch: Sequence[AbstractIncomingMessage], outcomes: Sequence[Outcome]
    ) -> None:
        """Map a batch's outcomes to broker operations with one burst of republishes (retries
        and rejects together, confirmed before anything is acked) and one burst of acks."""
        outgoing: list[Outgoing] = []
        published: list[AbstractIncomingMessage] = []
        acks: list[AbstractIncomingMessage] = []
        for message, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Retry):
                outgoing.append(self._retry(message, outcome))
                published.append(message)
                metrics.retries.labels(self.handler.queue).inc()
            elif isinstance(outcome, Reject):
                outgoing.append(self._parked(message, outcome.reason))
                published.append(message)
            else:
                assert isinstance(outcome, Done)
                acks.append(message)
        if outgoing:
            try:
                await self._publisher.publish_many(outgoing)
                acks += published
            except PublishNotConfirmed as exc:
                # Handled again on redelivery; the claims in Postgres make that harmless.
                log.warning("republish not confirmed; messages returned to the queue",
                            error=str(exc), count=len(published))  # fmt: skip
                await asyncio.gather(*(self._nack(m) for m in published))
        try:
            await ack_many(acks)
        except _ACK_ERRORS as exc:
            log.info("ack failed, messages will be redelivered", error=repr(exc))

    def _retry(self, message: AbstractIncomingMessage, outcome: Retry) -> Outgoing:
        if self.handler.destination is None:
            raise RuntimeError(f"{self.handler.queue} cannot retry: no destination")
        return Publisher.delayed(
            self._backend,
            self.handler.destination,
            outcome.delay_ms,
            outcome.body if outcome.body is not None else message.body,
            outcome.message_id or message.message_id or "",
            message.headers,
        )

    def _parked(self, message: AbstractIncomingMessage, reason: str) -> Outgoing:
        field = reason.split(":", 1)[0]
        metrics.dead_lettered.labels(self.handler.queue, field).inc()
        log.warning("rejected to nudge.dead", queue=self.handler.queue, reason=reason,
                    message_id=message.message_id)  # fmt: skip
        return Publisher.parked(
            message.body, message.message_id, reason, self.handler.queue, message.headers
        )

    async def _settle(self, message: AbstractIncomingMessage, outcome: Outcome) -> None:
        await self._settle_batch([message], [outcome])

    async def _nack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.nack(requeue=True)
        except _ACK_ERRORS as exc:
            log.info("nack failed, message will be redelivered", error=repr(exc))
