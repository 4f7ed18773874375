"""Delays: "deliver at T", through RabbitMQ, with two interchangeable backends.

**tiers** (default, plugin-free) is the binary ladder of NServiceBus v2 that Celery 5.5 copied:
level ``n`` is a topic exchange plus a quorum queue whose ``x-message-ttl`` is ``2**n`` seconds
and which dead-letters (at-least-once) to level ``n-1``; level 0 dead-letters to the output
exchange. The delay in whole units is written in binary in the routing key, one word per
level, then the destination: a message waits only in the levels whose bit is set and is
published straight to the level of its highest bit.

The ladder counts whole seconds, like Celery's; unlike Celery we do not truncate. The ladder
carries ``floor((delay - margin) / 1 s)`` seconds, so the message leaves it between ``margin``
and ``margin + 1 s`` early minus the hops' own latency, and the consumer holds it for the rest
(:data:`HOLD_LIMIT` bounds that wait). Lateness is then the consumer's timer, not the ladder's.

**plugin** publishes to an ``x-delayed-message`` exchange with the ``x-delay`` header. The
plugin routes any delay above ``2**32 - 1`` ms at once, so we cap ``x-delay`` there and the
consumer re-delays what is still early. It does not support ``mandatory``.

Never put an AMQP ``expiration`` on a message inside the ladder (dead-lettering removes it and
a shorter one would cut the delay), and strip ``x-death`` / ``x-first-death-*`` before every
re-delay: RabbitMQ drops a message that reaches the same queue twice by dead-lettering.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

#: Number of ladder levels; level n holds 2**n units.
LEVELS = 28
#: One ladder unit.
UNIT_MS = 1000
#: How early, at least, a message leaves the ladder, to absorb the hops' latency (measured at
#: 5-20 ms per hop on a small node).
MARGIN_MS = 250
#: The ladder's lowest levels that are never used: the consumer holds the remainder instead,
#: which saves RabbitMQ a quorum hop and a dead-lettering per set bit (its costliest work).
HELD_BITS = 2
#: A consumer holds a message that arrives at most this early; earlier ones are re-delayed.
HOLD_LIMIT = timedelta(milliseconds=(UNIT_MS << HELD_BITS) + MARGIN_MS + 1000)
#: The longest delay the ladder can carry.
MAX_LADDER_MS = (2**LEVELS - 1) * UNIT_MS
#: The plugin delivers at once any ``x-delay`` above this.
PLUGIN_MAX_DELAY_MS = 2**32 - 1

#: Headers RabbitMQ adds on dead-lettering; a re-delayed message must not carry them.
DEATH_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)

BackendName = Literal["plugin", "tiers"]

PLUGIN_EXCHANGE = "nudge.delay"
TIERS_OUTPUT_EXCHANGE = "nudge.delay.out"


def level_name(level: int) -> str:
    """Exchange and queue name of ladder level ``level``."""
    return f"nudge.delay.L{level:02d}"


def level_ttl_ms(level: int) -> int:
    """How long a message waits in level ``level``."""
    return (1 << level) * UNIT_MS


def ladder_units(delay_ms: int) -> int:
    """Whole units the ladder carries for ``delay_ms``; the rest is the consumer's hold."""
    units = min(max(0, delay_ms - MARGIN_MS) // UNIT_MS, (1 << LEVELS) - 1)
    return units >> HELD_BITS << HELD_BITS


def levels_visited(units: int) -> list[int]:
    """The levels a message with ``units`` waits in, highest first."""
    return [n for n in range(LEVELS - 1, -1, -1) if units >> n & 1]


def tiers_routing_key(units: int, destination: str) -> str:
    """``units`` as :data:`LEVELS` binary words, most significant first, then ``destination``."""
    return ".".join(format(units, f"0{LEVELS}b")) + "." + destination


def level_binding_key(level: int, bit: Literal["0", "1"]) -> str:
    """Topic pattern matching keys whose word for ``level`` is ``bit``."""
    return ".".join(["*"] * (LEVELS - 1 - level) + [bit, "#"])


@dataclass(frozen=True)
class Route:
    """Where and how to publish a delayed message."""

    exchange: str
    routing_key: str
    headers: dict[str, Any]
    mandatory: bool


def route(backend: BackendName, destination: str, delay_ms: int) -> Route:
    """The publish that makes a message reach queue ``destination`` after ``delay_ms``."""
    delay_ms = max(0, delay_ms)
    if backend == "plugin":
        # The plugin cannot know whether a queue will exist when the message is due, so it
        # returns every mandatory delayed message: publish without mandatory.
        return Route(
            PLUGIN_EXCHANGE,
            destination,
            {"x-delay": min(delay_ms, PLUGIN_MAX_DELAY_MS)},
            mandatory=False,
        )
    units = ladder_units(delay_ms)
    key = tiers_routing_key(units, destination)
    exchange = level_name(units.bit_length() - 1) if units else TIERS_OUTPUT_EXCHANGE
    return Route(exchange, key, {"x-delay": delay_ms}, mandatory=True)


def leaves_with(backend: BackendName, delay_ms: int) -> int:
    """Delays with the same value here leave the delay together, so their messages can travel
    as one (a :class:`~shared.contract.DueBatch` published with the smallest of the delays):
    on the ladder, the whole units it carries; with the plugin, the second. Each message then
    waits in the consumer's hold for the rest, less than :data:`HOLD_LIMIT`."""
    delay_ms = max(0, delay_ms)
    return ladder_units(delay_ms) if backend == "tiers" else delay_ms // UNIT_MS


def delay_until(deliver_at: datetime, now: datetime) -> int:
    """Milliseconds from ``now`` to ``deliver_at``, never negative."""
    return max(0, round((deliver_at - now).total_seconds() * 1000))


def strip_death(headers: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``headers`` without the dead-lettering history (see the module docstring)."""
    return {k: v for k, v in (headers or {}).items() if k not in DEATH_HEADERS}
