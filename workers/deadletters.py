"""``nudge.dead``: what was parked, why, and putting it back.

Two kinds of message end here. Those a worker parked (invalid input, an unknown template, a
due message for no message, a handler that raised on every try) carry ``x-nudge-reason`` and
``x-nudge-source-queue``, and the worker's user as their AMQP ``user_id``. Those RabbitMQ
parked (``delivery_limit``, ``expired``, ``maxlen``) carry its ``x-death`` history, and
whatever headers their publisher set. A message counts as a worker's only when its
``user_id`` is a worker user (RabbitMQ refuses a publish whose ``user_id`` is not the
publishing connection's user) and it has no ``x-death``: only then are its reason and source
queue read from ``x-nudge-*`` headers, which a service could have set.

Replaying publishes a worker's parked message back to the queue it came from, when that is one
of Nudge's work queues (confirmed, without its dead-lettering history, which would otherwise
get it dropped as a cycle), then removes it from ``nudge.dead``. Anything else is refused and
left parked.

Browsing takes messages without acknowledging them and gives them back by closing the channel,
so several operators can look at once; it speaks pika, and pika's errors become
:class:`~shared.errors.BrokerError` here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions

from shared import brokers, delay
from shared.errors import BrokerError, BrokerUnavailable, PublishNotConfirmed
from shared.topology import DEAD_QUEUE, WORK_QUEUES, WORKER_USER

#: Headers a replay removes besides the dead-lettering history.
_OUR_HEADERS = ("x-nudge-reason", "x-nudge-source-queue", "x-nudge-tries", "x-delivery-count")


@dataclass(frozen=True)
class DeadLetter:
    """One parked message."""

    message_id: str
    source_queue: str
    reason: str
    headers: dict[str, Any]
    body: bytes
    #: Published to ``nudge.dead`` by a worker (see the module's docstring): only such a
    #: message's reason and source queue are the worker's, and only it may be replayed.
    by_worker: bool = False

    @property
    def replay_refusal(self) -> str | None:
        """Why a replay leaves this message parked; ``None`` when it may be replayed."""
        if not self.by_worker:
            return "not parked by a Nudge worker, so its reason and source queue are unproven"
        if self.source_queue not in WORK_QUEUES:
            return f"its source queue {self.source_queue!r} is not one of Nudge's work queues"
        return None

    def describe(self, max_body: int | None = None) -> dict[str, Any]:
        """A JSON-friendly view of any body the broker can hold: the body as JSON when it is
        JSON nested at most :data:`MAX_VIEW_DEPTH` deep, else as text (bytes that are not
        UTF-8 replaced); with ``max_body``, a longer body is shown as its first ``max_body``
        bytes of text and ``body_bytes`` says how long it is."""
        view: dict[str, Any] = {
            "message_id": self.message_id,
            "source_queue": self.source_queue,
            "reason": self.reason,
            "headers": {k: _plain(v) for k, v in self.headers.items()},
        }
        if max_body is not None and len(self.body) > max_body:
            view["body"] = self.body[:max_body].decode(errors="replace")
            view["body_bytes"] = len(self.body)
        else:
            view["body"] = body_view(self.body)
        return view


#: Parked JSON nested deeper than this is shown as text: printing it back as JSON would
#: recurse as deep (``[[[[...`` parked by a worker made the listing crash).
MAX_VIEW_DEPTH = 64


def body_view(body: bytes) -> Any:
    """``body`` as JSON when it is JSON and not nested too deeply, else as text."""
    try:
        parsed: Any = json.loads(body)
    except (ValueError, RecursionError):
        return body.decode(errors="replace")
    stack = [(parsed, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_VIEW_DEPTH:
            return body.decode(errors="replace")
        if isinstance(value, dict):
            stack += ((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack += ((v, depth + 1) for v in value)
    return parsed


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def worker_users(amqp_url: str) -> frozenset[str]:
    """The users whose parked messages are a worker's: Nudge's worker user and the user of
    ``amqp_url`` (the CLI connects with the workers' settings)."""
    user = pika.URLParameters(amqp_url).credentials
    return frozenset({WORKER_USER, getattr(user, "username", WORKER_USER)})


def _parse(properties: pika.BasicProperties, body: bytes, workers: frozenset[str]) -> DeadLetter:
    headers: dict[str, Any] = dict(properties.headers or {})
    by_worker = (
        properties.user_id in workers and "x-death" not in headers and "x-nudge-reason" in headers
    )
    if by_worker:
        source = _text(headers.get("x-nudge-source-queue"))
        reason = _text(headers["x-nudge-reason"])
    else:
        deaths = headers.get("x-death") or [{}]
        last = deaths[0] if isinstance(deaths, list) and deaths else {}
        # The broker writes x-last-death-* at every dead-lettering; x-first-death-* only when
        # absent, so a publisher may have set those.
        source = _text(headers.get("x-last-death-queue") or last.get("queue"))
        why = _text(headers.get("x-last-death-reason") or last.get("reason")) or "unknown"
        reason = f"{why}: parked by RabbitMQ from {source}"
        if why == "delivery_limit":
            reason += " after crashing its consumer on every delivery (x-delivery-limit)"
        if "x-death" not in headers:
            source = ""
            reason = (
                f"unknown: published to nudge.dead by {properties.user_id or 'an unnamed user'}, "
                "not by a Nudge worker"
            )
    return DeadLetter(properties.message_id or "", source, reason, headers, body, by_worker)


@contextmanager
def _channel(amqp_url: str) -> Iterator[Any]:
    try:
        connection = pika.BlockingConnection(brokers.pika_parameters(amqp_url))
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailable(f"cannot connect to RabbitMQ: {exc!r}") from exc
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        yield channel
    except pika.exceptions.UnroutableError as exc:
        raise PublishNotConfirmed("replay: the source queue no longer exists") from exc
    except pika.exceptions.NackError as exc:
        raise PublishNotConfirmed("replay: RabbitMQ refused the message") from exc
    except pika.exceptions.AMQPError as exc:
        raise BrokerError(f"nudge.dead: {exc!r}") from exc
    finally:
        if connection.is_open:
            # closing returns every message taken but not acknowledged
            connection.close()


def _take(channel: Any, limit: int, workers: frozenset[str]) -> Iterator[tuple[int, DeadLetter]]:
    for _ in range(limit):
        method, properties, body = channel.basic_get(DEAD_QUEUE, auto_ack=False)
        if method is None:
            return
        yield method.delivery_tag, _parse(properties, body, workers)


def browse(amqp_url: str, limit: int = 1000) -> list[DeadLetter]:
    """Up to ``limit`` parked messages, oldest first; they stay parked."""
    with _channel(amqp_url) as channel:
        return [letter for _, letter in _take(channel, limit, worker_users(amqp_url))]


def _settle(
    amqp_url: str,
    wanted: Callable[[DeadLetter], bool],
    replay: bool,
    limit: int,
    refused: list[tuple[DeadLetter, str]] | None = None,
) -> list[DeadLetter]:
    done: list[DeadLetter] = []
    with _channel(amqp_url) as channel:
        for tag, letter in list(_take(channel, limit, worker_users(amqp_url))):
            if not wanted(letter):
                continue
            if replay:
                refusal = letter.replay_refusal
                if refusal is not None:  # left parked
                    if refused is not None:
                        refused.append((letter, refusal))
                    continue
                headers = {
                    k: v
                    for k, v in delay.strip_death(letter.headers).items()
                    if k not in _OUR_HEADERS
                }
                channel.basic_publish(
                    "",  # the default exchange routes to the queue of that name
                    letter.source_queue,
                    letter.body,
                    pika.BasicProperties(
                        content_type="application/json",
                        delivery_mode=2,
                        message_id=letter.message_id or None,
                        headers={**headers, "x-nudge-replayed": 1},
                    ),
                    mandatory=True,
                )
            channel.basic_ack(tag)
            done.append(letter)
    return done


@dataclass(frozen=True)
class Replayed:
    """What a replay did: the messages put back, and those left parked with why."""

    replayed: list[DeadLetter]
    refused: list[tuple[DeadLetter, str]]


def replay(amqp_url: str, message_ids: set[str] | None, limit: int = 100_000) -> Replayed:
    """Put parked messages back on their source queues (all when ``message_ids`` is
    ``None``): only those a worker parked from one of Nudge's work queues; the others are
    refused and stay parked. Published with confirms before they leave nudge.dead."""
    refused: list[tuple[DeadLetter, str]] = []
    done = _settle(
        amqp_url,
        lambda d: message_ids is None or d.message_id in message_ids,
        True,
        limit,
        refused,
    )
    return Replayed(done, refused)


def purge(amqp_url: str, message_ids: set[str] | None, limit: int = 100_000) -> list[DeadLetter]:
    """Delete parked messages (all when ``message_ids`` is ``None``); returns those deleted."""
    return _settle(
        amqp_url, lambda d: message_ids is None or d.message_id in message_ids, False, limit
    )
