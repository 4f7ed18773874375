"""Fuzzing the wire: hypothesis-made bodies, headers and properties (wrong types, missing
fields, huge payloads, invalid UTF-8, absurd delays) published raw, as a service in another
language might, to every exchange a service may use. No worker crashes; every input is either
accepted (stored, then given an outcome) or parked in ``nudge.dead`` with a reason; and the
counts match the workers' own metrics.

Each input carries an ``x-fuzz`` header with its number, so that it can be found in
``nudge.dead`` whatever its ``message_id``. Each exchange a service may publish to has a
:class:`Target` in :data:`TARGETS` (intake, events and receipts today).
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, select

from shared.topology import (
    DEAD_QUEUE,
    EVENT_KEY,
    EVENTS_EXCHANGE,
    EVENTS_QUEUE,
    INTAKE_EXCHANGE,
    INTAKE_QUEUE,
    READ_KEY,
    RECEIPTS_EXCHANGE,
    RECEIPTS_QUEUE,
    SCHEDULE_KEY,
)
from tests.support import Worker, wait_for
from workers.config import Settings
from workers.recipients import ItemStatus
from workers.store import templates
from workers.store.schema import contact_events, message_items, messages

TAG = "x-fuzz"
FINAL = [s.value for s in ItemStatus if s.final]
#: Inputs per example, and examples: a few hundred inputs in all, for CI's sake.
BATCH = 60
EXAMPLES = 5


# ------------------------------------------------------------------ what a service may send

_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def _in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


_times = st.one_of(
    st.floats(-3, 3).map(_in),  # due now or within the test
    st.sampled_from(
        [
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "2030-01-01T00:00:00",  # absurd, naive
            "not a time",
            "",
            "2024-02-30T00:00:00Z",
            "2030-01-01T00:00:00+25:00",
        ]
    ),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.none(),
    st.datetimes(timezones=st.just(UTC)).map(datetime.isoformat),
    st.floats(0, 2**28 + 10).map(_in),  # up to just past the longest delay
)
_names = st.sampled_from(["welcome", "page_viewed", "a.b:c-d_e"]) | st.text(max_size=210)
_contact = st.fixed_dictionaries(
    {"id": st.text(max_size=210)},
    optional={
        "email": st.sampled_from(["a@example.com", "nope"]) | _json,
        "timezone": st.sampled_from(["Europe/Paris", "Mars/Olympus", ""]) | _json,
        "attributes": _json,
        "subscribed": st.sampled_from([True, False, None, "yes"]),
        "extra": _json,
    },
)
_schedule = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 2, "1", None]),
        "contact": _contact | _json,
        "template": _names,
        "channel": st.sampled_from(["webhook", "log", "email", "sms", 7, None]),
        "deliver_at": _times,
    },
    optional={
        "expires_at": _times,
        "exclude_events": st.lists(_names, max_size=60) | _json,
        "exclude_scope": st.sampled_from(["since_scheduled", "ever", "within", "never"]),
        "exclude_within_seconds": st.floats() | st.integers(),
        "category": _names | _json,
        "priority": st.sampled_from(["transactional", "automation", "campaign", "urgent", 1]),
        "data": _json,
        "unknown_field": _json,
    },
)
_event = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 2]),
        "contact": _contact | _json,
        "name": _names,
        "occurred_at": _times,
    },
    optional={"data": _json, "unknown_field": _json},
)
_receipt = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 2]),
        "message_id": st.integers(-5, 2**70) | _json,
        "contact": _contact | _json,
        "read_at": _times,
    },
    optional={"unknown_field": _json},
)


def _dropping(fields: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A document with up to two of its fields missing."""
    return st.builds(
        lambda doc, drop: {k: v for k, v in doc.items() if k not in drop},
        fields,
        st.sets(
            st.sampled_from(
                [
                    "v",
                    "contact",
                    "template",
                    "channel",
                    "deliver_at",
                    "name",
                    "occurred_at",
                    "message_id",
                    "read_at",
                ]
            ),
            max_size=2,
        ),
    )


_HUGE = [
    b"[" * 100_000 + b"]" * 100_000,  # nested past Python's recursion limit, under the size cap
    json.dumps({"v": 1, "data": "x" * 280_000}).encode(),  # over the contract, under the broker
    json.dumps(
        {
            "v": 1,
            "contact": {"id": "big"},
            "template": "welcome",
            "channel": "log",
            "deliver_at": "2020-01-01T00:00:00Z",
            "data": {"blob": "y" * 250_000},
        }
    ).encode(),  # just under it
]


def _bodies(doc: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    encoded = _dropping(doc).map(lambda d: json.dumps(d).encode())
    return st.one_of(
        encoded,
        encoded,
        encoded,
        encoded.map(lambda b: b[: len(b) // 2] + b"\xff\xfe" + b[len(b) // 2 :]),  # bad UTF-8
        st.binary(max_size=500),
        _json.map(lambda v: json.dumps(v).encode()),
        st.sampled_from(_HUGE),
    )


_headers = st.dictionaries(
    st.sampled_from(["x-delay", "x-death", "x-nudge-reason", "x-first-death-reason"])
    | st.text(min_size=1, max_size=20).filter(lambda k: k != TAG),
    # pika encodes no floats and no integers beyond 64 bits
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=50)
    | st.binary(max_size=50)
    | st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    max_size=4,
)
_properties = st.fixed_dictionaries(
    {
        "content_type": st.sampled_from(
            [
                None,
                "application/json",
                "application/json",
                "text/plain",
                "",
                "application/json; charset=utf-8",
            ]
        ),
        "content_encoding": st.sampled_from([None, None, "gzip"]),
        "delivery_mode": st.sampled_from([1, 2]),
        "priority": st.sampled_from([None, 0, 9, 255]),
        "type": st.sampled_from([None, "schedule", "x" * 200]),
        "expiration": st.sampled_from([None] * 10 + ["1", "60000"]),
        "message_id": st.sampled_from(["ok"] * 8 + ["missing", "empty", "long", "unicode"]),
    }
)


@dataclass(frozen=True, repr=False)
class Target:
    """An exchange a service may publish to, and how to tell what its worker accepted."""

    name: str
    exchange: str
    routing_key: str
    queue: str
    bodies: st.SearchStrategy[bytes]
    #: The AMQP message ids of this run that the worker stored.
    stored: Callable[[Connection, str], set[str]]

    def __repr__(self) -> str:
        return self.name


def _stored_messages(conn: Connection, prefix: str) -> set[str]:
    q = select(messages.c.idempotency_key).where(messages.c.idempotency_key.like(f"{prefix}%"))
    return set(conn.scalars(q))


def _stored_receipts(conn: Connection, prefix: str) -> set[str]:
    """Receipts record a read time on a recipient, not their own id: none of this run's can
    name a recipient that exists (the run's contacts are its own), so every one is parked."""
    return set()


def _stored_events(conn: Connection, prefix: str) -> set[str]:
    q = select(contact_events.c.event_id).where(contact_events.c.event_id.like(f"{prefix}%"))
    return set(conn.scalars(q))


TARGETS = [
    Target(
        "intake", INTAKE_EXCHANGE, SCHEDULE_KEY, INTAKE_QUEUE, _bodies(_schedule), _stored_messages
    ),
    Target("events", EVENTS_EXCHANGE, EVENT_KEY, EVENTS_QUEUE, _bodies(_event), _stored_events),
    Target(
        "receipts",
        RECEIPTS_EXCHANGE,
        READ_KEY,
        RECEIPTS_QUEUE,
        _bodies(_receipt),
        _stored_receipts,
    ),
]


@dataclass(frozen=True, repr=False)
class WireInput:
    target: Target
    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]

    def __repr__(self) -> str:  # hypothesis prints failing examples: keep huge bodies short
        body = self.body if len(self.body) <= 300 else self.body[:300] + b"..."
        return f"WireInput({self.target.name}, {body!r}, {self.headers!r}, {self.properties!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


_inputs = st.builds(WireInput, st.sampled_from(TARGETS), st.none(), _headers, _properties).flatmap(
    lambda i: i.target.bodies.map(lambda b: WireInput(i.target, b, i.headers, i.properties))
)


class Batch(list[WireInput]):
    """The inputs of one example. Its repr is a summary (hypothesis warns about long ones); the
    assertion that fails names the inputs concerned."""

    def __repr__(self) -> str:
        return f"Batch({len(self)} inputs)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


# ------------------------------------------------------------------ publishing and accounting


@dataclass(repr=False)
class Ledger:
    """Every input published so far and where it ended."""

    run: str
    published: dict[int, WireInput]
    message_ids: dict[int, str]
    parked: dict[int, dict[str, Any]]  # number -> headers of its parked copy
    parked_later: list[dict[str, Any]]  # parked copies of due messages (stored inputs' outcome)

    def __repr__(self) -> str:
        return f"Ledger({self.run}: {len(self.published)} published, {len(self.parked)} parked)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def message_id(self, n: int, kind: str) -> str | None:
        return {
            "ok": f"{self.run}-{n}",
            "missing": None,
            "empty": "",
            "long": f"{self.run}-{n}-" + "l" * 200,
            "unicode": f"{self.run}-{n}-é✓",
        }[kind]


def _publish(amqp_url: str, ledger: Ledger, batch: list[WireInput]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for wire in batch:
            n = len(ledger.published)
            props = dict(wire.properties)
            mid = ledger.message_id(n, props.pop("message_id"))
            channel.basic_publish(
                wire.target.exchange,
                wire.target.routing_key,
                wire.body,
                pika.BasicProperties(message_id=mid, headers={**wire.headers, TAG: n}, **props),
                mandatory=True,
            )
            ledger.published[n] = wire
            if mid:
                ledger.message_ids[n] = mid
    finally:
        connection.close()


def _drain_dead(amqp_url: str, ledger: Ledger) -> None:
    """Move what ``nudge.dead`` holds into the ledger."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        while True:
            method, props, _body = channel.basic_get(DEAD_QUEUE, auto_ack=True)
            if method is None:
                return
            headers = dict(props.headers or {})
            if TAG in headers:
                ledger.parked[int(headers[TAG])] = headers
            else:
                ledger.parked_later.append({**headers, "message_id": props.message_id})
    finally:
        connection.close()


def _reason(headers: dict[str, Any]) -> str:
    return str(headers.get("x-nudge-reason") or headers.get("x-first-death-reason") or "")


def _accounted(amqp_url: str, engine: Engine, ledger: Ledger) -> dict[int, str]:
    """Where each published input is: ``stored`` or ``parked``."""
    _drain_dead(amqp_url, ledger)
    where = {n: "parked" for n in ledger.parked}
    by_id = {mid: n for n, mid in ledger.message_ids.items()}
    with engine.connect() as conn:
        for target in TARGETS:
            for mid in target.stored(conn, f"{ledger.run}-"):
                n = by_id[mid]
                assert n not in where, f"input {n} both stored and parked: {ledger.parked[n]}"
                assert ledger.published[n].target is target
                where[n] = "stored"
    return where


def _unfinished(engine: Engine, ledger: Ledger) -> list[str]:
    """Stored messages already due without a final outcome or a parked due message."""
    parked_due = {
        str(h["message_id"]).split("-")[1]
        for h in ledger.parked_later
        if str(h.get("message_id", "")).startswith("due-")
    }
    query = (
        select(messages.c.idempotency_key, messages.c.id, message_items.c.status)
        .select_from(messages.outerjoin(message_items))
        .where(
            messages.c.idempotency_key.like(f"{ledger.run}-%"),
            messages.c.deliver_at < datetime.now(UTC) - timedelta(seconds=3),
        )
    )
    with engine.connect() as conn:
        return [
            f"{key}: {status}"
            for key, mid, status in conn.execute(query)
            if status not in FINAL and str(mid) not in parked_due
        ]


@pytest.fixture
def fuzz_worker(engine: Engine, start_worker: Callable[..., Worker]) -> Worker:
    with engine.begin() as conn:
        templates.add(conn, "welcome", "Hello", "Welcome", None)
    return start_worker("scheduler", "dispatch", "events", "receipts")


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(f"fz{uuid.uuid4().hex[:8]}", {}, {}, {}, [])


@hsettings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # shrinking against real servers takes too long
    suppress_health_check=list(HealthCheck),
)
@given(batch=st.lists(_inputs, min_size=BATCH, max_size=BATCH).map(Batch))
def test_every_fuzzed_input_is_accepted_with_an_outcome_or_parked_with_a_reason(
    settings: Settings, engine: Engine, fuzz_worker: Worker, ledger: Ledger, batch: Batch
) -> None:
    _publish(settings.amqp_url, ledger, batch)
    where: dict[int, str] = {}

    def accounted() -> bool:
        where.update(_accounted(settings.amqp_url, engine, ledger))
        return where.keys() == ledger.published.keys()

    try:
        wait_for(accounted, timeout=60, interval=0.3)
    except AssertionError:
        lost = {n: ledger.published[n] for n in ledger.published.keys() - where.keys()}
        raise AssertionError(f"neither stored nor parked after 60 s: {lost}") from None
    unreasoned = {n: h for n, h in ledger.parked.items() if not _reason(h)}
    assert not unreasoned, f"parked without a reason: {unreasoned}"
    wait_for(
        lambda: not _unfinished(engine, ledger),
        timeout=30,
        interval=0.5,
        message="an outcome for every stored message already due",
    )
    assert fuzz_worker.process is not None
    assert fuzz_worker.process.poll() is None, f"the worker died:\n{fuzz_worker.log()}"
    # The worker's own count of what it parked matches what reached nudge.dead with its reason
    # (the broker parks, with x-first-death-reason, what expired before a worker saw it).
    by_worker = sum(
        1
        for h in itertools.chain(ledger.parked.values(), ledger.parked_later)
        if "x-nudge-source-queue" in h
    )
    assert fuzz_worker.metric("nudge_dead_lettered_total") == by_worker
    assert sum(1 for w in where.values() if w == "stored") + len(ledger.parked) == len(
        ledger.published
    )
