"""The work kept in flight while faults are injected, one :class:`Flow` per kind of work, and
what each flow must find afterwards.

A flow makes batches of requests for the :class:`Stream` to publish, and judges the result:
every request the broker confirmed has exactly one final outcome in Postgres, nothing the
sink saw twice falls outside the in-flight bound, and every duplicate carries the same
``Idempotency-Key``. Requests whose publish raised are counted apart: they may or may not
have arrived (a confirm lost with the connection), and those that did must be judged like the
others.

Adding a flow (rules, ...) means writing one class with ``name``, ``tally``,
``next_batch``, ``settled`` and ``verdict``, and passing it to the stream in the test.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from sqlalchemy import Engine, func, select, text

from producer import NudgeError, Producer, Request, scheduled, tracked
from tests.support import settings_env
from workers.config import Settings
from workers.demo.sink import Sink
from workers.recipients import ItemStatus, MessageStatus
from workers.store.schema import contact_events, message_items, messages

FINAL = [s.value for s in ItemStatus if s.final]


@dataclass
class Tally:
    """What the producer was told: confirmed keys, keys whose publish raised, and why."""

    confirmed: set[str] = field(default_factory=set)
    raised: set[str] = field(default_factory=set)
    errors: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Verdict:
    """What one flow found after a fault."""

    flow: str
    confirmed: int
    raised: int
    #: Requests with a final outcome (confirmed, plus raised ones that arrived anyway).
    final: int
    lost: int
    duplicates: int
    bound: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


class Flow(Protocol):
    """One kind of work a service puts in flight."""

    name: str
    tally: Tally

    def next_batch(self) -> list[Request]:
        """The next requests to publish."""
        ...

    def settled(self, engine: Engine) -> bool:
        """Whether everything that arrived has reached a final state."""
        ...

    def verdict(self, engine: Engine, sink: Sink, bound: int) -> Verdict:
        """Judge the flow once settled; ``bound`` is how many duplicates the sink may see."""
        ...


class DelayedMessages:
    """Scheduled messages to the webhook sink, one contact each, due ``delay`` seconds after
    their publish (a random pick between the bounds), so that faults find them in the delay."""

    def __init__(self, run: str, delay: tuple[float, float] = (0.5, 5.0), seed: int = 0) -> None:
        self.name = "delayed messages"
        self.tally = Tally()
        self._run = run
        self._delay = delay
        self._rng = random.Random(seed)
        self._next = 0

    def _prefix(self) -> str:
        return f"{self._run}-d-"

    def next_batch(self) -> list[Request]:
        batch: list[Request] = []
        for _ in range(10):
            i, self._next = self._next, self._next + 1
            batch.append(
                scheduled(
                    f"{self._run}-c-{i}",
                    "welcome",
                    "webhook",
                    idempotency_key=f"{self._prefix()}{i}",
                    delay=timedelta(seconds=self._rng.uniform(*self._delay)),
                )
            )
        return batch

    def _items(self, engine: Engine) -> dict[str, list[tuple[str, int, int]]]:
        """Per idempotency key of this run: its recipients' (status, message id, contact id)."""
        query = (
            select(
                messages.c.idempotency_key,
                message_items.c.status,
                messages.c.id,
                message_items.c.contact_id,
            )
            .select_from(messages.outerjoin(message_items))
            .where(messages.c.idempotency_key.like(f"{self._prefix()}%"))
        )
        rows: dict[str, list[tuple[str, int, int]]] = {}
        with engine.connect() as conn:
            for key, status, mid, cid in conn.execute(query):
                rows.setdefault(key, [])
                if status is not None:
                    rows[key].append((status, mid, cid))
        return rows

    def settled(self, engine: Engine) -> bool:
        items = self._items(engine)
        return self.tally.confirmed <= items.keys() and all(
            len(r) == 1 and r[0][0] in FINAL for r in items.values()
        )

    def verdict(self, engine: Engine, sink: Sink, bound: int) -> Verdict:
        items = self._items(engine)
        problems: list[str] = []
        lost = self.tally.confirmed - items.keys()
        if lost:
            problems.append(f"{len(lost)} confirmed but never stored, e.g. {sorted(lost)[:3]}")
        not_one = {k: r for k, r in items.items() if len(r) != 1 or r[0][0] not in FINAL}
        if not_one:
            problems.append(
                f"{len(not_one)} without exactly one final outcome: "
                f"{dict(list(not_one.items())[:3])}"
            )
        unexpected = items.keys() - self.tally.confirmed - self.tally.raised
        if unexpected:
            problems.append(f"{len(unexpected)} stored that nobody published")
        sent = {f"nudge-{mid}-{cid}" for r in items.values() for s, mid, cid in r if s == "sent"}
        ours = [
            r
            for r in sink.requests
            if r.idempotency_key in sent
            or str(r.body.get("message_key", "")).startswith(self._prefix())
        ]
        accepted = {r.idempotency_key for r in ours if 200 <= r.status < 300}
        if accepted != sent:
            problems.append(
                f"sink accepted {len(accepted)} recipients, Postgres says {len(sent)} sent "
                f"(missing at the sink: {sorted(sent - accepted)[:3]}, "
                f"not recorded sent: {sorted(accepted - sent)[:3]})"
            )
        duplicates = len(ours) - len({r.idempotency_key for r in ours})
        if duplicates > bound:
            problems.append(f"{duplicates} duplicates at the sink, more than the bound {bound}")
        by_key: dict[str, set[tuple[object, object]]] = {}
        for r in ours:
            if r.body.get("idempotency_key") != r.idempotency_key:
                problems.append(f"body and header disagree on the key: {r.idempotency_key}")
            by_key.setdefault(r.idempotency_key, set()).add(
                (r.body.get("message_id"), r.body.get("contact", {}).get("id"))
            )
        mixed = [k for k, v in by_key.items() if len(v) > 1]
        if mixed:
            problems.append(f"one Idempotency-Key for different recipients: {mixed[:3]}")
        final = sum(1 for r in items.values() if len(r) == 1 and r[0][0] in FINAL)
        return Verdict(
            self.name,
            len(self.tally.confirmed),
            len(self.tally.raised),
            final,
            len(lost),
            duplicates,
            bound,
            tuple(problems),
        )


class Events:
    """Contact events; each confirmed event id must be recorded once in ``contact_events``."""

    def __init__(self, run: str) -> None:
        self.name = "events"
        self.tally = Tally()
        self._run = run
        self._next = 0

    def next_batch(self) -> list[Request]:
        batch: list[Request] = []
        for _ in range(5):
            i, self._next = self._next, self._next + 1
            batch.append(
                tracked(f"{self._run}-e-{i % 50}", "page_viewed", event_id=f"{self._run}-e-{i}")
            )
        return batch

    def _recorded(self, engine: Engine) -> Counter[str]:
        query = (
            select(contact_events.c.event_id, func.count())
            .where(contact_events.c.event_id.like(f"{self._run}-e-%"))
            .group_by(contact_events.c.event_id)
        )
        with engine.connect() as conn:
            return Counter({k: n for k, n in conn.execute(query)})

    def settled(self, engine: Engine) -> bool:
        return self.tally.confirmed <= self._recorded(engine).keys()

    def verdict(self, engine: Engine, sink: Sink, bound: int) -> Verdict:
        recorded = self._recorded(engine)
        problems: list[str] = []
        lost = self.tally.confirmed - recorded.keys()
        if lost:
            problems.append(f"{len(lost)} confirmed events never recorded, e.g. {sorted(lost)[:3]}")
        twice = [k for k, n in recorded.items() if n != 1]
        if twice:
            problems.append(f"{len(twice)} events recorded more than once")
        unexpected = recorded.keys() - self.tally.confirmed - self.tally.raised
        if unexpected:
            problems.append(f"{len(unexpected)} recorded that nobody published")
        return Verdict(
            self.name,
            len(self.tally.confirmed),
            len(self.tally.raised),
            len(recorded),
            len(lost),
            0,
            0,
            tuple(problems),
        )


class Stream:
    """Publishes the flows' batches in turn from a thread, with one :class:`Producer`, until
    stopped. A publish either returns (confirmed) or raises (counted, then tried again later
    with new requests): a producer must never drop a message silently."""

    def __init__(self, amqp_url: str, flows: list[Flow], pause: float = 0.1) -> None:
        self.flows = flows
        self._url = amqp_url
        self._pause = pause
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-stream", daemon=True)
        self.crashed: BaseException | None = None

    def start(self) -> Stream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the publishing thread did not stop"
        if self.crashed is not None:
            raise AssertionError(f"the producer raised outside its contract: {self.crashed!r}")

    def confirmed(self) -> int:
        return sum(len(f.tally.confirmed) for f in self.flows)

    def _run(self) -> None:
        try:
            with Producer(self._url, confirm_timeout=10.0, name="nudge-faults") as producer:
                while not self._stop.is_set():
                    for flow in self.flows:
                        self._publish(producer, flow)
                    self._stop.wait(self._pause)
        except BaseException as exc:  # reported by stop()
            self.crashed = exc

    def _publish(self, producer: Producer, flow: Flow) -> None:
        batch = flow.next_batch()
        keys = [r.idempotency_key for r in batch]
        try:
            producer.publish(batch)
        except NudgeError as exc:
            flow.tally.raised.update(keys)
            flow.tally.errors[type(exc).__name__] += 1
            time.sleep(0.2)  # the broker is away: do not spin
            return
        flow.tally.confirmed.update(keys)


class Campaign:
    """A broadcast campaign to ``size`` contacts, started through the CLI before the faults:
    every frozen recipient must end with exactly one final outcome, the sink must have what
    Postgres says was sent, and anything seen twice must stay within the in-flight bound and
    carry the same ``Idempotency-Key``. Publishes nothing itself: the planner fans it out."""

    def __init__(self, run: str, size: int = 3000) -> None:
        self.name = "campaign"
        self.tally = Tally()
        self._run = run
        self._size = size
        self._id: int | None = None

    def start(self, settings: Settings, engine: Engine) -> Campaign:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO contacts (external_id) SELECT :p || g "
                    "FROM generate_series(1, :n) g"
                ),
                {"p": f"{self._run}-k-", "n": self._size},
            )
        name = f"{self._run}-campaign"
        for args in (
            (
                "campaign",
                "create",
                name,
                "--template",
                "welcome",
                "--channel",
                "webhook",
                "--ids",
                ",".join(f"{self._run}-k-{i}" for i in range(1, self._size + 1)),
            ),
            ("campaign", "start", name),
        ):
            done = subprocess.run(
                [sys.executable, "-m", "workers", *args],
                env=settings_env(settings),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, f"nudge {args[:3]}: {done.stdout}{done.stderr}"
        with engine.connect() as conn:
            self._id = conn.scalar(select(messages.c.id).where(messages.c.name == name))
        self.tally.confirmed.add(name)
        return self

    def next_batch(self) -> list[Request]:
        return []

    def _items(self, engine: Engine) -> list[tuple[int, str]]:
        with engine.connect() as conn:
            return [
                (cid, status)
                for cid, status in conn.execute(
                    select(message_items.c.contact_id, message_items.c.status).where(
                        message_items.c.message_id == self._id
                    )
                )
            ]

    def _state(self, engine: Engine) -> int | None:
        with engine.connect() as conn:
            return conn.scalar(select(messages.c.status).where(messages.c.id == self._id))

    def settled(self, engine: Engine) -> bool:
        items = self._items(engine)
        return (
            len(items) == self._size
            and all(s in FINAL for _, s in items)
            and self._state(engine) == int(MessageStatus.COMPLETED)
        )

    def verdict(self, engine: Engine, sink: Sink, bound: int) -> Verdict:
        items = self._items(engine)
        problems: list[str] = []
        if len(items) != self._size:
            problems.append(f"{len(items)} recipients frozen, not {self._size}")
        pending = [cid for cid, s in items if s not in FINAL]
        if pending:
            problems.append(f"{len(pending)} recipients without a final outcome")
        state = self._state(engine)
        if state != int(MessageStatus.COMPLETED):
            problems.append(f"campaign status {state}, not completed")
        sent = {f"nudge-{self._id}-{cid}" for cid, s in items if s == "sent"}
        ours = [r for r in sink.requests if r.body.get("message_id") == self._id]
        accepted = {r.idempotency_key for r in ours if 200 <= r.status < 300}
        if accepted != sent:
            problems.append(
                f"sink accepted {len(accepted)} recipients, Postgres says {len(sent)} sent"
            )
        duplicates = len(ours) - len({r.idempotency_key for r in ours})
        if duplicates > bound:
            problems.append(f"{duplicates} duplicates at the sink, more than the bound {bound}")
        by_key: dict[str, set[object]] = {}
        for r in ours:
            by_key.setdefault(r.idempotency_key, set()).add(r.body.get("contact", {}).get("id"))
        mixed = [k for k, v in by_key.items() if len(v) > 1]
        if mixed:
            problems.append(f"one Idempotency-Key for different recipients: {mixed[:3]}")
        final = sum(1 for _, s in items if s in FINAL)
        return Verdict(
            self.name, self._size, 0, final, self._size - final, duplicates, bound, tuple(problems)
        )
