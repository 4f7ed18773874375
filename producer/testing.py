"""An in-memory producer for services' own tests: validates exactly like the real ones and
records what would have been published."""

from __future__ import annotations

from collections.abc import Iterable

from producer.requests import Request, SyncApi


class InMemoryProducer(SyncApi):
    """Drop-in for :class:`producer.Producer` in tests; ``published`` holds the requests
    (:class:`~producer.Scheduled` and :class:`~producer.Tracked`) in order."""

    def __init__(self) -> None:
        self.published: list[Request] = []

    def publish(self, requests: Iterable[Request]) -> list[str]:
        batch = list(requests)
        self.published.extend(batch)
        return [r.idempotency_key for r in batch]

    def close(self) -> None:
        return None
