"""An in-memory producer for services' own tests: validates exactly like the real ones and
records what would have been published."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from producer.requests import Scheduled, scheduled
from shared.contract import ContactRef, Priority


class InMemoryProducer:
    """Drop-in for :class:`producer.Producer` in tests; ``published`` holds the requests."""

    def __init__(self) -> None:
        self.published: list[Scheduled] = []

    def schedule(
        self,
        contact: str | Mapping[str, Any] | ContactRef,
        template: str,
        channel: str,
        *,
        delay: timedelta | float | None = None,
        deliver_at: datetime | None = None,
        exclude_events: Sequence[str] = (),
        expires_at: datetime | None = None,
        idempotency_key: str | None = None,
        data: Mapping[str, Any] | None = None,
        category: str | None = None,
        priority: str = Priority.AUTOMATION,
    ) -> str:
        request = scheduled(
            contact,
            template,
            channel,
            delay=delay,
            deliver_at=deliver_at,
            exclude_events=exclude_events,
            expires_at=expires_at,
            idempotency_key=idempotency_key,
            data=data,
            category=category,
            priority=priority,
        )
        return self.schedule_many([request])[0]

    def schedule_many(self, requests: Iterable[Scheduled]) -> list[str]:
        batch = list(requests)
        self.published.extend(batch)
        return [r.idempotency_key for r in batch]

    def close(self) -> None:
        return None
