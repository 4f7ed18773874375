"""Fuzzing the wire: hypothesis-made bodies, headers and properties (wrong types, missing
fields, NUL characters, NaN, numbers beyond 64 bits, invalid UTF-8, absurd delays, forged
``x-nudge-*`` headers, bodies over the contract's limit and over the broker's) published raw,
as a service in another language might, to every exchange a service may use. No worker
crashes; every input is either accepted (stored exactly as sent, then given an outcome),
parked in ``nudge.dead`` with the reason and source queue a worker wrote (the broker's own
reason only for an expiry: a ``delivery_limit`` parking is a crash loop, a failure), or, over
the broker's ``max_message_size``, refused by the broker itself; and the workers' count of
what they parked matches ``nudge.dead``. A forged due message naming a contact that is not the
message's recipient sends that contact nothing and is parked by dispatch with the reason that
names the pair.

Hypothesis draws the 1,000 inputs up front, one per example from its seed (it cannot draw a
thousand in one example), then they are published in one go and judged together, against one
worker process per role: each check waits once for the whole run, not once per input. Each
input carries an ``x-fuzz`` header with its number, so that it can be found in ``nudge.dead``
whatever its ``message_id``. Each exchange a service may publish to has a :class:`Target` in
:data:`TARGETS` (intake, events and receipts today). The run prints its hypothesis seed;
``NUDGE_FUZZ_SEED`` replays it.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pytest
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, select

from shared.contract import DueMessage, due_message_id
from shared.topology import (
    DEAD_QUEUE,
    DUE_QUEUE,
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
from workers.demo.sink import Sink
from workers.recipients import ItemStatus
from workers.store import templates
from workers.store.schema import contact_events, contacts, message_items, messages

TAG = "x-fuzz"
FINAL = [s.value for s in ItemStatus if s.final]
#: Inputs per run.
INPUTS = 1_000
#: The roles that consume what a service publishes, and dispatch (due messages of stored inputs),
#: with the queue each consumes.
ROLES = {
    "scheduler": INTAKE_QUEUE,
    "dispatch": DUE_QUEUE,
    "events": EVENTS_QUEUE,
    "receipts": RECEIPTS_QUEUE,
}
SEED = int(os.environ.get("NUDGE_FUZZ_SEED", random.randrange(1_000_000)))
#: What every forged ``x-nudge-*`` header value starts with: a parked input whose reason or
#: source queue carries it was parked on the strength of its own headers.
FORGED = "forged-by-fuzz"
#: The broker's ``max_message_size`` (infra/rabbitmq/rabbitmq.conf): it refuses larger bodies.
BROKER_MAX = 300_000


# ------------------------------------------------------------------ what a service may send

_hostile = st.sampled_from(
    [
        "a\x00b",  # NUL: Postgres stores no NUL in text or jsonb
        "\x00",
        float("nan"),  # json.dumps writes NaN and Infinity, which JSON does not have
        float("inf"),
        float("-inf"),
        2**63,  # just past bigint
        -(2**63) - 1,
        10**400,  # past any float
    ]
)
_json: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | _hostile
    | st.text(max_size=10).map(lambda t: t + "\x00"),
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
_names = st.sampled_from(["welcome", "page_viewed", "a.b:c-d_e", "welcome\x00"]) | st.text(
    max_size=210
)
_contact = st.fixed_dictionaries(
    {"id": st.text(max_size=210) | st.sampled_from(["nul\x00id", "\x00"])},
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
        "exclude_within_seconds": st.floats() | st.integers() | _hostile,
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
    json.dumps({"v": 1, "data": "z" * (BROKER_MAX + 10_000)}).encode(),  # over the broker's
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


_header_keys = st.sampled_from(
    [
        "x-delay",
        "x-death",
        "x-first-death-reason",
        "x-nudge-reason",
        "x-nudge-source-queue",
        "x-nudge-attempt",
    ]
) | st.text(min_size=1, max_size=20).filter(lambda k: k != TAG and not k.startswith("x-nudge-"))
_headers = st.dictionaries(
    _header_keys,
    # pika encodes no floats and no integers beyond 64 bits
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=50)
    | st.binary(max_size=50)
    | st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    max_size=4,
).map(  # a forged x-nudge-* value is recognisable wherever it ends up
    lambda h: {k: f"{FORGED} {v!r}" if k.startswith("x-nudge-") else v for k, v in h.items()}
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
    #: What the worker stored of this run, by AMQP message id: the fields a service sent.
    stored: Callable[[Connection, str], dict[str, dict[str, Any]]]
    #: The same fields, as the input's body gave them.
    sent: Callable[[dict[str, Any]], dict[str, Any]]

    def __repr__(self) -> str:
        return self.name


def _time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _stored_messages(conn: Connection, prefix: str) -> dict[str, dict[str, Any]]:
    q = (
        select(
            messages.c.idempotency_key,
            contacts.c.external_id,
            messages.c.template,
            messages.c.channel,
            messages.c.category,
            messages.c.data,
            messages.c.deliver_at,
            messages.c.expires_at,
        )
        .select_from(messages.join(contacts, contacts.c.id == messages.c.contact_id))
        .where(messages.c.idempotency_key.like(f"{prefix}%"))
    )
    return {
        row.idempotency_key: {k: v for k, v in row._mapping.items() if k != "idempotency_key"}
        for row in conn.execute(q)
    }


def _sent_message(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "external_id": doc["contact"]["id"],
        "template": doc["template"],
        "channel": doc["channel"],
        "category": doc.get("category"),
        "data": doc.get("data", {}),
        "deliver_at": _time(doc["deliver_at"]),
        "expires_at": _time(doc.get("expires_at")),
    }


def _stored_receipts(conn: Connection, prefix: str) -> dict[str, dict[str, Any]]:
    """Receipts record a read time on a recipient, not their own id: none of this run's can
    name a recipient that exists (the run's contacts are its own), so every one is parked."""
    return {}


def _stored_events(conn: Connection, prefix: str) -> dict[str, dict[str, Any]]:
    q = (
        select(
            contact_events.c.event_id,
            contacts.c.external_id,
            contact_events.c.name,
            contact_events.c.data,
            contact_events.c.occurred_at,
        )
        .select_from(contact_events.join(contacts, contacts.c.id == contact_events.c.contact_id))
        .where(contact_events.c.event_id.like(f"{prefix}%"))
    )
    return {
        row.event_id: {k: v for k, v in row._mapping.items() if k != "event_id"}
        for row in conn.execute(q)
    }


def _sent_event(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "external_id": doc["contact"]["id"],
        "name": doc["name"],
        "data": doc.get("data", {}),
        "occurred_at": _time(doc["occurred_at"]),
    }


TARGETS = [
    Target(
        "intake",
        INTAKE_EXCHANGE,
        SCHEDULE_KEY,
        INTAKE_QUEUE,
        _bodies(_schedule),
        _stored_messages,
        _sent_message,
    ),
    Target(
        "events",
        EVENTS_EXCHANGE,
        EVENT_KEY,
        EVENTS_QUEUE,
        _bodies(_event),
        _stored_events,
        _sent_event,
    ),
    Target(
        "receipts",
        RECEIPTS_EXCHANGE,
        READ_KEY,
        RECEIPTS_QUEUE,
        _bodies(_receipt),
        _stored_receipts,
        lambda doc: {},
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


_hostile_inputs = st.builds(
    WireInput, st.sampled_from(TARGETS), st.none(), _headers, _properties
).flatmap(lambda i: i.target.bodies.map(lambda b: WireInput(i.target, b, i.headers, i.properties)))

# Well-formed inputs, so that acceptance is exercised too: what was stored must equal what was
# sent, and the messages due during the run must get their outcome.
_ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.@", min_size=1, max_size=40)
_plain = st.dictionaries(
    st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10),
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=30),
    max_size=4,
)
_good_schedule = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "contact": st.fixed_dictionaries({"id": _ids}),
        "template": st.just("welcome"),
        "channel": st.sampled_from(["webhook", "log"]),
        "deliver_at": st.floats(-3, 3).map(_in),
    },
    optional={"data": _plain, "category": st.sampled_from(["news", "billing"])},
)
_good_event = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "contact": st.fixed_dictionaries({"id": _ids}),
        "name": st.sampled_from(["page_viewed", "upgraded"]),
        "occurred_at": st.floats(-60, 0).map(_in),
    },
    optional={"data": _plain},
)
_good_properties = {"content_type": "application/json", "delivery_mode": 2, "message_id": "ok"}
_well_formed = st.one_of(
    _good_schedule.map(
        lambda d: WireInput(TARGETS[0], json.dumps(d).encode(), {}, _good_properties)
    ),
    _good_event.map(lambda d: WireInput(TARGETS[1], json.dumps(d).encode(), {}, _good_properties)),
)
#: About one input in five is well-formed.
_inputs = st.one_of(
    _hostile_inputs, _hostile_inputs, _hostile_inputs, _hostile_inputs, _well_formed
)


# ------------------------------------------------------------------ publishing and accounting


@dataclass(repr=False)
class Ledger:
    """Every input published so far and where it ended."""

    run: str
    published: dict[int, WireInput]
    message_ids: dict[int, str]
    parked: dict[int, dict[str, Any]]  # number -> headers of its parked copy
    parked_later: list[dict[str, Any]]  # parked copies of due messages (stored inputs' outcome)
    refused: set[int]  # refused by the broker itself (over its max_message_size)

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


def _generate(count: int) -> list[WireInput]:
    """``count`` inputs drawn by hypothesis from :data:`SEED`, one per example (a list of a
    hundred in one example overruns hypothesis's budget per example: it then ran two examples
    where ten were asked). No shrinking: the assertions name the inputs concerned."""
    drawn: list[WireInput] = []

    @seed(SEED)
    @hsettings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(wire=_inputs)
    def draw(wire: WireInput) -> None:
        drawn.append(wire)

    draw()
    return drawn


def _publish(amqp_url: str, ledger: Ledger, batch: list[WireInput]) -> None:
    """Publish ``batch`` on one channel with confirms (about a millisecond each on a local
    broker); a body over the broker's limit goes on a channel of its own, which the broker
    closes: it is recorded as refused."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for wire in batch:
            n = len(ledger.published)
            props = dict(wire.properties)
            mid = ledger.message_id(n, props.pop("message_id"))
            properties = pika.BasicProperties(
                message_id=mid, headers={**wire.headers, TAG: n}, **props
            )
            ledger.published[n] = wire
            if mid:
                ledger.message_ids[n] = mid
            if len(wire.body) > BROKER_MAX:
                alone = connection.channel()
                alone.confirm_delivery()
                with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="max size"):
                    alone.basic_publish(
                        wire.target.exchange, wire.target.routing_key, wire.body, properties
                    )
                ledger.refused.add(n)
                continue
            channel.basic_publish(
                wire.target.exchange,
                wire.target.routing_key,
                wire.body,
                properties,
                mandatory=True,
            )
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


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def _deaths(headers: dict[str, Any]) -> set[tuple[str, str]]:
    """The (reason, queue) of each dead-lettering the broker recorded in ``x-death`` (a table
    per death: what an input forges there is not a table). A worker's parked copy has none."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return set()
    return {(_text(d.get("reason")), _text(d.get("queue"))) for d in deaths if isinstance(d, dict)}


def _unreasoned(wire: WireInput, headers: dict[str, Any]) -> str | None:
    """Why the parked copy ``headers`` of ``wire`` does not prove a worker parked it for a
    reason; None when it does. The broker parks on its own only what expired unseen: a
    ``delivery_limit`` means a worker crashed on it again and again."""
    deaths = _deaths(headers)
    if deaths:
        if deaths == {("expired", wire.target.queue)} and wire.properties.get("expiration"):
            return None
        return f"parked by the broker {sorted(deaths)}, not by a worker"
    reason = _text(headers.get("x-nudge-reason"))
    source = _text(headers.get("x-nudge-source-queue"))
    if not reason or FORGED in reason:
        return f"no reason a worker wrote: {reason!r}"
    if source != wire.target.queue or FORGED in source:
        return f"source queue {source!r}, not {wire.target.queue}"
    return None


def _accounted(amqp_url: str, engine: Engine, ledger: Ledger) -> dict[int, str]:
    """Where each published input is: ``stored``, ``parked`` or ``refused``."""
    _drain_dead(amqp_url, ledger)
    where = {n: "parked" for n in ledger.parked} | {n: "refused" for n in ledger.refused}
    by_id = {mid: n for n, mid in ledger.message_ids.items()}
    with engine.connect() as conn:
        for target in TARGETS:
            for mid in target.stored(conn, f"{ledger.run}-"):
                n = by_id[mid]
                assert n not in where, f"input {n} both stored and {where[n]}"
                assert ledger.published[n].target is target
                where[n] = "stored"
    return where


def _altered(engine: Engine, ledger: Ledger) -> dict[int, tuple[dict[str, Any], dict[str, Any]]]:
    """The stored inputs whose stored fields differ from what their body said: (sent, stored)."""
    by_id = {mid: n for n, mid in ledger.message_ids.items()}
    altered = {}
    with engine.connect() as conn:
        for target in TARGETS:
            for mid, stored in target.stored(conn, f"{ledger.run}-").items():
                n = by_id[mid]
                sent = target.sent(json.loads(ledger.published[n].body))
                if sent != stored:
                    altered[n] = (sent, stored)
    return altered


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
def fuzz_fleet(engine: Engine, start_worker: Callable[..., Worker]) -> dict[str, Worker]:
    """One worker process per role, so that the roles share the machine's cores; started
    together, then each waited for."""
    with engine.begin() as conn:
        templates.add(conn, "welcome", "Hello", "Welcome", None)
    fleet = {role: start_worker(role, wait=False) for role in ROLES}
    for role, worker in fleet.items():
        wait_for(
            lambda w=worker, q=ROLES[role]: w.consuming([q]),  # type: ignore[misc]
            timeout=60,
            message=f"the {role} worker to consume {ROLES[role]}",
        )
    return fleet


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(f"fz{uuid.uuid4().hex[:8]}", {}, {}, {}, [], set())


def _alive(fleet: dict[str, Worker]) -> dict[str, str]:
    """The log of each worker that died."""
    return {
        role: w.log()
        for role, w in fleet.items()
        if w.process is None or w.process.poll() is not None
    }


@pytest.mark.timeout(600)  # 1,000 inputs against the real servers, on a busy machine
def test_every_fuzzed_input_is_accepted_with_an_outcome_or_parked_with_a_reason(
    settings: Settings, engine: Engine, fuzz_fleet: dict[str, Worker], ledger: Ledger
) -> None:
    print(f"fuzz seed {SEED} (NUDGE_FUZZ_SEED={SEED} replays it)")
    replay = f"(NUDGE_FUZZ_SEED={SEED} replays this run)"
    inputs = _generate(INPUTS)
    assert len(inputs) == INPUTS, f"hypothesis drew {len(inputs)} inputs, not {INPUTS}"
    started = time.monotonic()
    _publish(settings.amqp_url, ledger, inputs)
    where: dict[int, str] = {}

    def accounted() -> bool:
        where.update(_accounted(settings.amqp_url, engine, ledger))
        return where.keys() == ledger.published.keys()

    try:
        wait_for(accounted, timeout=180, interval=1.0)
    except AssertionError:
        lost = {n: ledger.published[n] for n in ledger.published.keys() - where.keys()}
        raise AssertionError(f"neither stored nor parked after 180 s {replay}: {lost}") from None
    tally = Counter(where.values())
    print(f"{len(where)} inputs: {dict(tally)} in {time.monotonic() - started:.0f} s")
    refused = {n for n, w in ledger.published.items() if len(w.body) > BROKER_MAX}
    assert ledger.refused == refused, f"the broker refused {ledger.refused}, not {refused}"
    unreasoned = {
        n: (why, ledger.published[n], h)
        for n, h in ledger.parked.items()
        if (why := _unreasoned(ledger.published[n], h))
    }
    assert not unreasoned, f"parked without a worker's reason {replay}: {unreasoned}"
    altered = _altered(engine, ledger)
    assert not altered, f"stored otherwise than sent {replay}: {altered}"
    wait_for(
        lambda: not _unfinished(engine, ledger),
        timeout=60,
        interval=1.0,
        message=f"an outcome for every stored message already due {replay}",
    )
    assert not _alive(fuzz_fleet), f"workers died {replay}: {_alive(fuzz_fleet)}"
    # Due messages of stored inputs that a worker parked (e.g. expired) count with the inputs.
    # Dispatch goes on parking the due messages of later inputs as they come due: the counts
    # are compared when they agree, or the last ones are shown.
    counts: list[tuple[float, int]] = []

    def counts_agree() -> bool:
        _drain_dead(settings.amqp_url, ledger)
        later = [h for h in ledger.parked_later if {r for r, _ in _deaths(h)} != {"expired"}]
        assert all("x-nudge-source-queue" in h for h in later), f"parked by the broker: {later}"
        by_worker = sum(1 for h in ledger.parked.values() if not _deaths(h)) + len(later)
        counted = sum(w.metric("nudge_dead_lettered_total") for w in fuzz_fleet.values())
        counts.append((counted, by_worker))
        return counted == by_worker

    try:
        wait_for(counts_agree, timeout=20, interval=0.5)
    except AssertionError:
        raise AssertionError(
            f"workers counted {counts[-1][0]} parked, nudge.dead has {counts[-1][1]} {replay}; "
            f"due messages parked: {ledger.parked_later}"
        ) from None


def test_a_forged_due_message_naming_another_contact_sends_that_contact_nothing(
    settings: Settings, engine: Engine, sink: Sink, fuzz_fleet: dict[str, Worker]
) -> None:
    # Contact A's message, due in an hour; contact B exists (an event of theirs). A due message
    # published over the workers' own credentials names A's message and B.
    run = f"fd{uuid.uuid4().hex[:8]}"
    a, b = f"{run}-a", f"{run}-b"
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        schedule = {
            "v": 1,
            "contact": {"id": a},
            "template": "welcome",
            "channel": "webhook",
            "deliver_at": _in(3600),
        }
        event = {"v": 1, "contact": {"id": b}, "name": "page_viewed", "occurred_at": _in(0)}
        for exchange, key, doc, mid in (
            (INTAKE_EXCHANGE, SCHEDULE_KEY, schedule, f"{run}-m"),
            (EVENTS_EXCHANGE, EVENT_KEY, event, f"{run}-e"),
        ):
            channel.basic_publish(
                exchange,
                key,
                json.dumps(doc).encode(),
                pika.BasicProperties(
                    message_id=mid, content_type="application/json", delivery_mode=2
                ),
                mandatory=True,
            )

        def ids() -> tuple[int, int, int] | None:
            with engine.connect() as conn:
                mid = conn.scalar(
                    select(messages.c.id).where(messages.c.idempotency_key == f"{run}-m")
                )
                cid = conn.scalar(select(contacts.c.id).where(contacts.c.external_id == b))
                aid = conn.scalar(select(contacts.c.id).where(contacts.c.external_id == a))
            return (mid, cid, aid) if mid and cid and aid else None

        wait_for(lambda: ids() is not None, timeout=30, message="A's message and B stored")
        found = ids()
        assert found is not None
        message_id, contact_b, _ = found
        forged = DueMessage(message_id=message_id, contact_id=contact_b, deliver_at=_in(0))
        channel.basic_publish(
            "",
            DUE_QUEUE,
            forged.model_dump_json().encode(),
            pika.BasicProperties(
                message_id=due_message_id(message_id, contact_b, 1),
                content_type="application/json",
                delivery_mode=2,
            ),
            mandatory=True,
        )
    finally:
        connection.close()

    parked: list[dict[str, Any]] = []

    def settled() -> bool:
        ledger = Ledger(run, {}, {}, {}, [], set())
        _drain_dead(settings.amqp_url, ledger)
        parked.extend(ledger.parked_later)
        return bool(parked) or any(r.body.get("message_id") == message_id for r in sink.requests)

    wait_for(settled, timeout=30, message="the forged due message sent or parked")
    to_b = [r for r in sink.requests if r.body.get("contact", {}).get("id") == b]
    assert not to_b, f"contact B received A's message: {to_b}"
    with engine.connect() as conn:
        rows = conn.execute(
            select(message_items.c.status).where(
                message_items.c.message_id == message_id,
                message_items.c.contact_id == contact_b,
            )
        ).all()
    assert not rows, f"a recipient row for B on A's message: {rows}"
    parkings = [
        (_text(h.get("x-nudge-reason")), _text(h.get("x-nudge-source-queue"))) for h in parked
    ]
    assert parkings == [
        (f"due: contact {contact_b} is not a recipient of message {message_id}", DUE_QUEUE)
    ], "parked by dispatch, with the pair named"
    assert fuzz_fleet["dispatch"].metric("nudge_dead_lettered_total", reason="due") == 1
