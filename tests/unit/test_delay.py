"""The delay ladder's arithmetic, and a simulation of RabbitMQ's topic routing through the
declared topology, over every delay from 0 ms to a year."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import delay, topology

pytestmark = pytest.mark.unit

YEAR_MS = 366 * 24 * 3600 * 1000
TOPO = topology.build("tiers")


def _topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""
    regex = "^" + pattern.replace(".", r"\.").replace("*", r"[^.]+") + "$"
    regex = regex.replace(r"\.#", r"(\.[^.]+)*").replace(r"#\.", r"([^.]+\.)*")
    regex = regex.replace("#", r"[^.]*(\.[^.]+)*")
    return re.match(regex, key) is not None


def _route(exchange: str, key: str) -> list[str]:
    """Queues an exchange delivers ``key`` to, following exchange-to-exchange bindings."""
    out: list[str] = []
    for b in TOPO.bindings:
        if b.source == exchange and _topic_matches(b.routing_key, key):
            if b.destination_type == "queue":
                out.append(b.destination)
            else:
                out += _route(b.destination, key)
    return out


def _journey(delay_ms: int, destination: str = topology.DUE_DESTINATION) -> list[str]:
    """The queues a message visits: each ladder queue dead-letters (keeping the routing key)
    to its x-dead-letter-exchange when its TTL expires."""
    r = delay.route("tiers", destination, delay_ms)
    queues = _route(r.exchange, r.routing_key)
    visited: list[str] = []
    while queues:
        assert len(queues) == 1, f"ambiguous routing {queues}"
        visited.append(queues[0])
        q = TOPO.queue(queues[0])
        if "x-message-ttl" not in q.arguments:
            break
        queues = _route(q.arguments["x-dead-letter-exchange"], r.routing_key)
    return visited


@given(st.integers(min_value=0, max_value=YEAR_MS))
def test_every_delay_up_to_a_year_waits_in_exactly_its_bits_and_then_reaches_nudge_due(
    delay_ms: int,
) -> None:
    units = delay.ladder_units(delay_ms)
    visited = _journey(delay_ms)
    assert visited[-1] == topology.DUE_QUEUE
    ladder = visited[:-1]
    assert ladder == [delay.level_name(n) for n in delay.levels_visited(units)]
    waited = sum(delay.level_ttl_ms(n) for n in delay.levels_visited(units))
    # The ladder never overshoots, and leaves the consumer a bounded hold.
    hold = delay_ms - waited
    assert hold >= min(delay_ms, delay.MARGIN_MS)
    assert hold < (delay.UNIT_MS << delay.HELD_BITS) + delay.MARGIN_MS
    assert hold <= delay.HOLD_LIMIT.total_seconds() * 1000


@given(st.integers(min_value=0, max_value=YEAR_MS))
def test_a_delayed_message_is_published_to_the_level_of_its_highest_bit(delay_ms: int) -> None:
    r = delay.route("tiers", "due", delay_ms)
    units = delay.ladder_units(delay_ms)
    expected = delay.level_name(units.bit_length() - 1) if units else delay.TIERS_OUTPUT_EXCHANGE
    assert r.exchange == expected
    assert r.mandatory
    assert r.routing_key.endswith(".due")
    assert len(r.routing_key.split(".")) == delay.LEVELS + 1


def test_forty_days_waits_in_the_levels_of_its_set_bits() -> None:
    forty_days = 40 * 86400 * 1000
    units = delay.ladder_units(forty_days)
    # 250 ms margin, and the two lowest levels unused: the consumer holds the last 3.25-4.25 s
    assert units == 40 * 86400 - 4
    assert delay.route("tiers", "due", forty_days).exchange == "nudge.delay.L21"
    assert _journey(forty_days)[0] == "nudge.delay.L21"


def test_the_ladder_reaches_beyond_a_year() -> None:
    assert delay.MAX_LADDER_MS > 8 * YEAR_MS


def test_the_plugin_caps_x_delay_where_it_would_deliver_at_once() -> None:
    r = delay.route("plugin", "due", 60 * 86400 * 1000)
    assert r.headers["x-delay"] == 2**32 - 1
    assert r.exchange == "nudge.delay"
    assert not r.mandatory  # the plugin returns every mandatory delayed message


def test_redelay_strips_the_dead_letter_history() -> None:
    headers = {
        "x-death": [{"queue": "nudge.delay.L00"}],
        "x-first-death-queue": "q",
        "x-nudge-reason": "kept",
    }
    assert delay.strip_death(headers) == {"x-nudge-reason": "kept"}


def test_level_queues_are_quorum_queues_dead_lettering_at_least_once() -> None:
    for level in range(delay.LEVELS):
        args = TOPO.queue(delay.level_name(level)).arguments
        assert args["x-queue-type"] == "quorum"
        assert args["x-dead-letter-strategy"] == "at-least-once"
        assert args["x-overflow"] == "reject-publish"
        assert args["x-message-ttl"] == 1000 * 2**level
