"""The consumer loop shared by every worker role.

Deliveries are decoded (bad input is parked in ``nudge.dead`` at once, with a reason naming the
field), held in memory if they arrived a little early, gathered into batches and handed to the
role's handler, whose :mod:`~workers.runtime.outcomes` are mapped to ack / republish / dead-letter.
Acks come only after the handler's Postgres work committed and every republish was confirmed:
a crash at any point leaves the message unacked, and RabbitMQ redelivers it.

A delivery may carry several items (a :class:`Bundle`: the scheduler's ``DueBatch``). Each is
held, batched and handled on its own; one that must travel again (a retry, a rejection) goes
alone, with its own body; the delivery is acked once every item is settled, or given back to
the queue whole when one could not be (its items already done are found done again).

Headers are trusted only when a worker set them: on the queues services feed
(:data:`~shared.topology.SERVICE_QUEUES`) every ``x-nudge-*`` header is dropped before the
message is handled, so what a worker republishes or parks carries no header a service forged.

A message whose handler keeps raising is parked by the worker, with a reason naming the error
class and its source queue, on its ``max_tries``-th try: before the work queue's
``x-delivery-limit`` parks it without either. Tries are counted across redeliveries (RabbitMQ's
``x-delivery-count``, read only on a delivery flagged ``redelivered``) and across the
republishes of an item sent on alone out of its bundle (:data:`TRIES_HEADER`).

The loop sees RabbitMQ through :class:`~shared.amqp.Inbox` and :class:`~shared.amqp.Publishes`
only: :mod:`workers.runtime.testing` runs it against an in-memory broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar, cast

import structlog

from shared import delay
from shared.amqp import Inbox, Incoming, Outgoing, Publisher, Publishes
from shared.errors import (
    BrokerError,
    InvalidMessage,
    PublishNotConfirmed,
    SettleFailed,
    StoreUnavailable,
)
from shared.topology import DELIVERY_LIMIT, SERVICE_QUEUES
from workers.runtime import metrics
from workers.runtime.outcomes import Done, Outcome, Reject, Retry

log = structlog.get_logger("nudge.consumer")

T = TypeVar("T")

#: Held messages are released in ticks of this many seconds: a message is handled at most one
#: tick after it falls due, and the messages of one tick make one batch.
HOLD_TICK = 0.02
#: A held tick released this late, or released messages waiting this long for a batch task,
#: are logged (at most once every WARN_EVERY seconds per consumer).
LATE = 0.1
WARN_EVERY = 10.0
#: A batch that found Postgres or RabbitMQ unavailable is tried again after this many seconds,
#: doubling up to :data:`UNAVAILABLE_MAX_WAIT`.
UNAVAILABLE_FIRST_WAIT = 0.5
UNAVAILABLE_MAX_WAIT = 10.0
#: A worker's headers start with this; on a service's message they are dropped.
NUDGE_HEADER_PREFIX = "x-nudge-"
#: How many times an item crashed its handler before, carried when it is republished alone.
TRIES_HEADER = "x-nudge-tries"
#: Tries before a crashing message is parked, by default: below the queues' delivery limit.
DEFAULT_MAX_TRIES = 5
assert DEFAULT_MAX_TRIES < DELIVERY_LIMIT


@dataclass(frozen=True)
class Bundle(Generic[T]):
    """Several items decoded from one delivery, with how each travels alone."""

    items: Sequence[T]
    #: An item's own body and AMQP message_id, for a retry or a rejection of it alone.
    body: Callable[[T], bytes]
    message_id: Callable[[T], str]


class Handler(Protocol[T]):
    """A worker role's logic for one queue."""

    queue: str
    #: The delay destination that leads back to ``queue`` (for retries), if any.
    destination: str | None

    def decode(self, message: Incoming) -> T | Bundle[T]:
        """Parse a delivery; raise :class:`InvalidMessage` naming the field."""
        ...

    def due_at(self, item: T) -> datetime | None:
        """When the item may be handled; ``None`` means now."""
        ...

    async def handle(self, batch: Sequence[T]) -> Sequence[Outcome]:
        """Handle a batch; one outcome per item, in order."""
        ...


@dataclass(eq=False)
class _Delivery:
    """One AMQP delivery and how many of its items are not settled yet."""

    message: Incoming
    pending: int
    #: The delivery's headers that a worker may carry on: see :func:`trusted_headers`.
    headers: dict[str, Any]
    #: Tries that crashed the handler before this delivery: see :func:`tries_before`.
    tries: int
    #: An item could not be settled (a republish not confirmed, a worker stopping): the
    #: delivery goes back to the queue instead of being acked.
    give_back: bool = False


@dataclass(eq=False)
class _Inbound(Generic[T]):
    item: T
    delivery: _Delivery
    bundle: Bundle[T] | None = None
    #: Released from the hold: its tick came as a whole, waiting for more adds lateness only.
    held: bool = False
    #: When it was put in the ready queue (monotonic).
    ready_at: float = 0.0
    #: Tries that crashed the handler, this one included; carried by a republish of it alone.
    tries: int = 0

    @property
    def message(self) -> Incoming:
        return self.delivery.message

    @property
    def body(self) -> bytes:
        return self.bundle.body(self.item) if self.bundle else self.message.body

    @property
    def message_id(self) -> str | None:
        return self.bundle.message_id(self.item) if self.bundle else self.message.message_id


class Consumer(Generic[T]):
    """Consumes one queue with ``concurrency`` batches in flight."""

    def __init__(
        self,
        handler: Handler[T],
        inbox: Inbox,
        publisher: Publishes,
        backend: delay.BackendName,
        *,
        concurrency: int,
        batch_size: int,
        batch_wait: float,
        max_tries: int = DEFAULT_MAX_TRIES,
    ) -> None:
        if not 1 <= max_tries < DELIVERY_LIMIT:
            raise ValueError(f"max_tries: {max_tries} is not between 1 and {DELIVERY_LIMIT - 1}")
        self.handler = handler
        self._max_tries = max_tries
        self._inbox = inbox
        self._publisher = publisher
        self._backend = backend
        self._concurrency = concurrency
        self._batch_size = batch_size
        self._batch_wait = batch_wait
        self._ready: asyncio.Queue[_Inbound[T]] = asyncio.Queue()
        self._gathering = asyncio.Lock()
        self._warned = -math.inf
        #: Early messages by the tick they fall due in; one timer per tick releases them
        #: together, so they are handled as one batch.
        self._held: dict[int, list[_Inbound[T]]] = {}
        self._held_count = 0
        self._busy = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.last_activity = time.monotonic()
        # Per delivery: the labelled children looked up once.
        self._received = metrics.received.labels(handler.queue)
        self._held_gauge = metrics.held.labels(handler.queue)

    @property
    def idle(self) -> bool:
        """Nothing held, queued or being handled."""
        return not self._held and self._ready.empty() and self._busy == 0

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._batches(), name=f"batch-{i}")
            for i in range(self._concurrency)
        ]
        await self._inbox.consume(self.handler.queue, self._on_message)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop consuming, finish what was received (held messages included), then return."""
        self._stopping = True
        with contextlib.suppress(BrokerError):  # the connection is gone: nothing to cancel
            await self._inbox.cancel()
        deadline = time.monotonic() + grace
        while not self.idle and time.monotonic() < deadline:  # noqa: ASYNC110 (cheap poll)
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # what a stuck one holds stays unacked: RabbitMQ redelivers it
            done, _ = await asyncio.wait(self._tasks, timeout=5.0)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: a crash was logged where it happened

    async def _on_message(self, message: Incoming) -> None:
        self.last_activity = time.monotonic()
        self._received.inc()
        headers = trusted_headers(self.handler.queue, message.headers)
        tries = tries_before(message, headers)
        try:
            decoded = self.handler.decode(message)
        except InvalidMessage as exc:
            await self._settle_batch(
                [_Inbound(None, _Delivery(message, 1, headers, tries))], [Reject(exc.reason)]
            )
            return
        bundle = decoded if isinstance(decoded, Bundle) else None
        items: Sequence[T] = bundle.items if bundle else [cast(T, decoded)]
        delivery = _Delivery(message, len(items), headers, tries)
        early: list[_Inbound[T]] = []
        retries: list[Outcome] = []
        now = datetime.now(UTC)
        for item in items:
            inbound = _Inbound(item, delivery, bundle)
            due = self.handler.due_at(item)
            wait = (due - now).total_seconds() if due else 0.0
            if wait <= 0:
                inbound.ready_at = time.monotonic()
                self._ready.put_nowait(inbound)
            elif wait * 1000 > delay.HOLD_LIMIT.total_seconds() * 1000 or self._stopping:
                # Too early to hold (the plugin caps x-delay at ~49.7 days, a re-delay may be
                # long): back into the delay for the rest.
                early.append(inbound)
                retries.append(Retry(int(wait * 1000)))
            else:
                self._hold(inbound, wait)
        if early:
            await self._settle_batch(early, retries)

    def _hold(self, inbound: _Inbound[T], wait: float) -> None:
        # Rounded up to a tick: never before it is due, at most one tick late.
        tick = math.ceil((time.time() + wait) / HOLD_TICK)
        bucket = self._held.get(tick)
        if bucket is None:
            bucket = self._held[tick] = []
            asyncio.get_running_loop().call_later(
                tick * HOLD_TICK - time.time(), self._release, tick
            )
        bucket.append(inbound)
        self._held_count += 1
        self._held_gauge.set(self._held_count)

    def _release(self, tick: int) -> None:
        now = time.time()
        lag = max(0.0, now - tick * HOLD_TICK)
        metrics.release_lag.labels(self.handler.queue).observe(lag)
        if lag > LATE and self._may_warn():
            log.warning(
                "held messages released late: the process is starved or its loop busy",
                queue=self.handler.queue,
                lag_ms=round(lag * 1000),
            )
        bucket = self._held.pop(tick, [])
        self._held_count -= len(bucket)
        self._held_gauge.set(self._held_count)
        ready_at = time.monotonic()
        for inbound in bucket:
            inbound.held = True
            inbound.ready_at = ready_at
            self._ready.put_nowait(inbound)

    async def _batches(self) -> None:
        while True:
            # One task fills its batch at a time while the others handle theirs: two tasks
            # waiting on the queue together would deal the messages out between them.
            async with self._gathering:
                first = await self._ready.get()
                self._busy += 1
                try:
                    batch = await self._gather(first)
                except BaseException:
                    self._busy -= 1
                    raise
            waited = time.monotonic() - first.ready_at
            metrics.wait_for_batch.labels(self.handler.queue).observe(waited)
            if first.held and waited > LATE and self._may_warn():
                log.warning(
                    "due messages waited for a free batch task",
                    queue=self.handler.queue,
                    waited_ms=round(waited * 1000),
                    concurrency=self._concurrency,
                )
            try:
                await self._handle(batch)
            finally:
                self._busy -= 1
                self.last_activity = time.monotonic()

    def _may_warn(self) -> bool:
        """At most one lateness warning per consumer every :data:`WARN_EVERY` seconds."""
        now = time.monotonic()
        if now - self._warned < WARN_EVERY:
            return False
        self._warned = now
        return True

    async def _gather(self, first: _Inbound[T]) -> list[_Inbound[T]]:
        """``first`` and what follows it within the batch wait, up to the batch size; a
        released tick is handled at once, as a whole."""
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
        return batch

    async def _handle(self, batch: list[_Inbound[T]]) -> None:
        metrics.batch_size.labels(self.handler.queue).observe(len(batch))
        backoff = UNAVAILABLE_FIRST_WAIT
        while True:
            try:
                outcomes = await self.handler.handle([b.item for b in batch])
                break
            except (StoreUnavailable, BrokerError) as exc:
                # Postgres or RabbitMQ is restarting or unreachable: keep the messages
                # (unacked) and try again, rather than burning their delivery count.
                metrics.store_unavailable.labels(self.handler.queue).inc()
                if self._stopping:  # give the messages back; another worker will take them
                    await self._give_back(batch)
                    return
                log.warning(
                    "infrastructure unavailable, retrying batch",
                    error=str(exc),
                    size=len(batch),
                    retry_in=backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, UNAVAILABLE_MAX_WAIT)
            except Exception as exc:
                if len(batch) > 1:  # find the poison message: the others go through
                    for inbound in batch:
                        await self._handle([inbound])
                    return
                inbound = batch[0]
                inbound.tries = inbound.delivery.tries + 1
                if inbound.tries >= self._max_tries:
                    log.exception(
                        "handler crashed on every try; message parked",
                        queue=self.handler.queue,
                        message_id=inbound.message_id,
                        tries=inbound.tries,
                    )
                    reason = (
                        f"crash: {type(exc).__name__} raised by the {self.handler.queue} "
                        f"handler on each of {inbound.tries} tries: {exc}"
                    )
                    await self._settle_batch(batch, [Reject(reason)])
                    return
                if inbound.bundle is not None and self.handler.destination is not None:
                    # Out of its bundle, alone: the queue's delivery limit parks it after
                    # a few crashes without taking the bundle's other items along.
                    log.exception(
                        "handler crashed; item sent on alone",
                        queue=self.handler.queue,
                        message_id=inbound.message_id,
                    )
                    await self._settle_batch(batch, [Retry(0)])
                    return
                log.exception(
                    "handler crashed; message returned to the queue",
                    queue=self.handler.queue,
                    message_id=inbound.message_id,
                )
                await self._give_back(batch)
                return
        await self._settle_batch(batch, outcomes)

    async def _settle_batch(
        self, batch: Sequence[_Inbound[Any]], outcomes: Sequence[Outcome]
    ) -> None:
        """Map a batch's outcomes to broker operations with one burst of republishes (retries
        and rejects together, confirmed before anything is acked) and one burst of acks."""
        outgoing: list[Outgoing] = []
        published: list[_Inbound[Any]] = []
        settled: list[_Inbound[Any]] = []
        for inbound, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Retry):
                outgoing.append(self._retry(inbound, outcome))
                published.append(inbound)
                metrics.retries.labels(self.handler.queue).inc()
            elif isinstance(outcome, Reject):
                outgoing.append(self._parked(inbound, outcome.reason))
                published.append(inbound)
            else:
                assert isinstance(outcome, Done)
                settled.append(inbound)
        if outgoing:
            try:
                await self._publisher.publish_many(outgoing)
            except PublishNotConfirmed as exc:
                # Handled again on redelivery; the claims in Postgres make that harmless.
                log.warning(
                    "republish not confirmed; messages returned to the queue",
                    error=str(exc),
                    count=len(published),
                )
                for inbound in published:
                    inbound.delivery.give_back = True
            settled += published
        await self._finish(settled)

    async def _give_back(self, batch: Sequence[_Inbound[Any]]) -> None:
        """Return these items' deliveries to the queue (once all their items are settled)."""
        for inbound in batch:
            inbound.delivery.give_back = True
        await self._finish(batch)

    async def _finish(self, settled: Sequence[_Inbound[Any]]) -> None:
        """Count items settled; ack each delivery whose items are all settled, or return it to
        the queue if one of them could not be."""
        acks: list[Incoming] = []
        for inbound in settled:
            delivery = inbound.delivery
            delivery.pending -= 1
            if delivery.pending == 0:
                if delivery.give_back:
                    await self._nack(delivery.message)
                else:
                    acks.append(delivery.message)
        if not acks:
            return
        try:
            await self._inbox.ack(acks)
        except SettleFailed as exc:
            log.info("ack failed, messages will be redelivered", error=str(exc))

    def _retry(self, inbound: _Inbound[Any], outcome: Retry) -> Outgoing:
        if self.handler.destination is None:
            raise RuntimeError(f"{self.handler.queue} cannot retry: no destination")
        headers = {k: v for k, v in inbound.delivery.headers.items() if k != TRIES_HEADER}
        if inbound.tries:  # sent on alone after a crash: the tries so far travel with it
            headers[TRIES_HEADER] = inbound.tries
        return Publisher.delayed(
            self._backend,
            self.handler.destination,
            outcome.delay_ms,
            outcome.body if outcome.body is not None else inbound.body,
            outcome.message_id or inbound.message_id or "",
            headers,
        )

    def _parked(self, inbound: _Inbound[Any], reason: str) -> Outgoing:
        metrics.dead_lettered.labels(self.handler.queue, metrics.reason_label(reason)).inc()
        log.warning(
            "rejected to nudge.dead",
            queue=self.handler.queue,
            reason=reason,
            message_id=inbound.message_id,
        )
        return Publisher.parked(
            inbound.body, inbound.message_id, reason, self.handler.queue, inbound.delivery.headers
        )

    async def _nack(self, message: Incoming) -> None:
        try:
            await self._inbox.nack(message)
        except SettleFailed as exc:
            log.info("nack failed, message will be redelivered", error=str(exc))


def trusted_headers(queue: str, headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """``headers`` without the ``x-nudge-*`` ones when ``queue`` is fed by services: only a
    worker's headers say why a message was parked or how often it crashed."""
    if queue not in SERVICE_QUEUES:
        return dict(headers or {})
    return {
        k: v for k, v in (headers or {}).items() if not k.lower().startswith(NUDGE_HEADER_PREFIX)
    }


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def tries_before(message: Incoming, headers: Mapping[str, Any]) -> int:
    """How many tries crashed before this delivery: the worker's :data:`TRIES_HEADER` (from
    ``headers`` as :func:`trusted_headers` left them) plus RabbitMQ's ``x-delivery-count``
    when the delivery is flagged ``redelivered`` (on a first delivery that header is the
    publisher's)."""
    tries = _count(headers.get(TRIES_HEADER))
    if message.redelivered:
        tries += _count(message.headers.get("x-delivery-count"))
    return tries
