"""The delay ladder's arithmetic, and a simulation of RabbitMQ's topic routing through the
declared topology, over every delay from 0 ms to a year."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import contract, delay, topology
from shared.contract import DueBatch
from shared.errors import InvalidMessage
from workers.roles.scheduler import SchedulerHandler
from workers.store.messages import StoredMessage

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


@given(
    st.sampled_from(["tiers", "plugin"]),
    st.lists(st.integers(min_value=0, max_value=YEAR_MS), min_size=1, max_size=600),
)
def test_due_messages_are_bundled_only_with_those_leaving_the_delay_with_them(
    backend: delay.BackendName, delays: list[int]
) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    stored = [
        StoredMessage(i + 1, 100 + i, now + timedelta(milliseconds=ms), f"k{i}")
        for i, ms in enumerate(delays)
    ]
    handler = SchedulerHandler(cast(Any, None), cast(Any, None), backend)
    out = handler._due(stored, {s.idempotency_key: "automation" for s in stored}, now)
    seen: list[int] = []
    for o in out:
        due = contract.decode_due(o.body, content_type=contract.CONTENT_TYPE)
        items = due.due if isinstance(due, DueBatch) else [due]
        seen += [d.message_id for d in items]
        waits = [delay.delay_until(d.deliver_at, now) for d in items]
        assert len({delay.leaves_with(backend, w) for w in waits}) == 1
        # published with the smallest delay: it leaves the delay before any of its items is
        # due, and each waits in the consumer's hold less than the hold allows
        cap = delay.PLUGIN_MAX_DELAY_MS if backend == "plugin" else YEAR_MS
        assert o.headers["x-delay"] == min(*waits, cap)
        if backend == "tiers":
            leaves = delay.ladder_units(min(waits)) * delay.UNIT_MS
            assert all(
                0 < w - leaves < delay.HOLD_LIMIT.total_seconds() * 1000
                for w in waits
                if w > delay.MARGIN_MS
            )
        assert len(items) <= contract.MAX_DUE_BATCH
        if len(items) == 1:
            assert o.message_id == f"due-{items[0].message_id}-{items[0].contact_id}-1"
    assert sorted(seen) == [s.id for s in stored], "every message exactly once"
    groups = {delay.leaves_with(backend, ms) for ms in delays}
    assert len(out) >= len(groups)
    assert len(out) <= len(groups) + len(delays) // contract.MAX_DUE_BATCH


def test_a_bundle_that_is_not_valid_names_the_recipient_and_field() -> None:
    body = json.dumps(
        {
            "v": 1,
            "due": [
                {"message_id": 1, "contact_id": 2, "deliver_at": "2026-01-01T00:00:00Z"},
                {"message_id": 1, "contact_id": 0, "deliver_at": "2026-01-01T00:00:00Z"},
            ],
        }
    ).encode()
    with pytest.raises(InvalidMessage, match=r"^due\.1\.contact_id: Input should be greater"):
        contract.decode_due(body, content_type=contract.CONTENT_TYPE)
    single = json.dumps({"v": 1, "message_id": 1, "contact_id": 2}).encode()
    with pytest.raises(InvalidMessage, match=r"^deliver_at: Field required"):
        contract.decode_due(single, content_type=contract.CONTENT_TYPE)
