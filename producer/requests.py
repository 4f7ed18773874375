"""Building validated requests: every producer (sync, async, in-memory) goes through here, so
a bad argument fails in the service, before anything is published, naming the field."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, Unpack

from shared import contract
from shared.contract import ContactRef, ReadReceipt, ScheduleMessage, ScheduleOptions, TrackEvent
from shared.topology import (
    EVENT_KEY,
    EVENTS_EXCHANGE,
    INTAKE_EXCHANGE,
    READ_KEY,
    RECEIPTS_EXCHANGE,
    SCHEDULE_KEY,
)

Contact = str | Mapping[str, Any] | ContactRef


class Request(Protocol):
    """Something a producer publishes: where, what, and under which idempotency key."""

    @property
    def exchange(self) -> str: ...

    @property
    def routing_key(self) -> str: ...

    @property
    def idempotency_key(self) -> str: ...

    @property
    def body(self) -> bytes: ...


@dataclass(frozen=True)
class Scheduled:
    """A validated scheduled message and its idempotency key."""

    message: ScheduleMessage
    idempotency_key: str
    exchange: str = INTAKE_EXCHANGE
    routing_key: str = SCHEDULE_KEY

    @property
    def body(self) -> bytes:
        return contract.encode(self.message)


@dataclass(frozen=True)
class Tracked:
    """A validated event and its event id (the idempotency key)."""

    message: TrackEvent
    idempotency_key: str
    exchange: str = EVENTS_EXCHANGE
    routing_key: str = EVENT_KEY

    @property
    def body(self) -> bytes:
        return contract.encode(self.message)


@dataclass(frozen=True)
class Read:
    """A validated read receipt and its receipt id."""

    message: ReadReceipt
    idempotency_key: str
    exchange: str = RECEIPTS_EXCHANGE
    routing_key: str = READ_KEY

    @property
    def body(self) -> bytes:
        return contract.encode(self.message)


def read(message_id: int, contact: str, *, read_at: datetime | None = None) -> Read:
    """Validate a read receipt: ``contact`` (external id) read message ``message_id`` (the
    ``message_id`` of the webhook payload) at ``read_at`` (default now)."""
    receipt = contract.read_request(message_id, contact, read_at=read_at)
    return Read(receipt, _key(f"read-{message_id}-{contact}-{receipt.read_at.timestamp()}"))


def _key(given: str | None) -> str:
    return contract.idempotency_key(given if given is not None else str(uuid.uuid4()))


def scheduled(
    contact: Contact,
    template: str,
    channel: str,
    *,
    idempotency_key: str | None = None,
    **options: Unpack[ScheduleOptions],
) -> Scheduled:
    """Validate a scheduled message. ``contact`` is the service's user id, or a mapping with
    ``id`` and optional ``email``, ``phone``, ``timezone``, ``attributes``, ``subscribed``.
    ``options`` are those of :class:`~shared.contract.ScheduleOptions`: ``delay`` or
    ``deliver_at``, ``exclude_events`` with ``exclude_scope``/``exclude_within``,
    ``expires_at``, ``category``, ``priority``, ``data``. Without ``idempotency_key`` a random
    one is made: pass your own to make retries safe."""
    message = contract.schedule_request(contact, template, channel, **options)
    return Scheduled(message, _key(idempotency_key))


def tracked(
    contact: Contact,
    event: str,
    *,
    data: Mapping[str, Any] | None = None,
    occurred_at: datetime | None = None,
    event_id: str | None = None,
) -> Tracked:
    """Validate an event: ``contact`` did ``event`` (at ``occurred_at``, default now). Pass
    your own ``event_id`` so that a retried publish records it once."""
    message = contract.track_request(contact, event, data=data, occurred_at=occurred_at)
    return Tracked(message, _key(event_id))


class SyncApi:
    """``schedule`` and ``track`` for producers whose :meth:`publish` is synchronous."""

    def publish(self, requests: Iterable[Request]) -> list[str]:
        """Publish requests; returns their idempotency keys once all were confirmed."""
        raise NotImplementedError

    def schedule(
        self,
        contact: Contact,
        template: str,
        channel: str,
        *,
        idempotency_key: str | None = None,
        **options: Unpack[ScheduleOptions],
    ) -> str:
        """Schedule one message (arguments as :func:`scheduled`); returns its idempotency key
        once the broker confirmed it."""
        request = scheduled(contact, template, channel, idempotency_key=idempotency_key, **options)
        return self.publish([request])[0]

    def schedule_many(self, requests: Iterable[Scheduled]) -> list[str]:
        """Publish many :func:`scheduled` requests, confirms pipelined."""
        return self.publish(requests)

    def track(
        self,
        contact: Contact,
        event: str,
        *,
        data: Mapping[str, Any] | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> str:
        """Record that ``contact`` did ``event`` (arguments as :func:`tracked`); returns the
        event id once confirmed."""
        request = tracked(contact, event, data=data, occurred_at=occurred_at, event_id=event_id)
        return self.publish([request])[0]
