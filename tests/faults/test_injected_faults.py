"""Faults injected while a campaign, delayed messages and events are in flight: workers
SIGKILLed at random moments (planner included, dispatch at least once), RabbitMQ restarted and
crashed (SIGKILL of its Erlang VM; on the ladder only, for the suite's time), PostgreSQL
restarted and crashed (immediate shutdown: the claims committed without waiting for the disk
may be lost, and the finalise must write their outcomes again).
After each, every confirmed request and every campaign recipient has exactly one final
outcome, ``sent`` for every message (the sink accepts everything), the sink saw nothing twice
beyond what was really in flight when the fault hit (and then with the same Idempotency-Key),
and producers and workers reconnected by themselves. The fleet runs with small batches, so
that what may be in flight is small next to what must not be sent twice.

These tests restart the shared servers, so they live in a module of their own (the package's
conftest brings the servers up again afterwards). ``NUDGE_FAULTS_SEED`` replays a run.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from sqlalchemy import Engine, select

from shared.topology import DUE_QUEUE, EVENTS_QUEUE, INTAKE_QUEUE, PLAN_QUEUE
from tests.backends import both_backends
from tests.conftest import ROOT
from tests.faults import report
from tests.faults.flows import Campaign, DelayedMessages, Events, Flow, InFlight, Stream
from tests.support import Worker, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store import templates
from workers.store.schema import message_items

#: Each role the faults hit, with the queue it consumes (no flow sends read receipts).
QUEUES = {
    "scheduler": INTAKE_QUEUE,
    "dispatch": DUE_QUEUE,
    "events": EVENTS_QUEUE,
    "planner": PLAN_QUEUE,
}
CONCURRENCY = 2
#: The dispatch's batch size and the campaign's chunk: what one batch task holds claimed. Small,
#: so that what a dead dispatch may have had in flight is a small part of every flow.
BATCH = 20
#: The claim lease of the fault tests' workers. The suite's usual 3 s is shorter than a batch
#: takes on a loaded machine: claims then overtake each other before any finalises, and the
#: copies re-published for rows held by others multiply (a livelock the lease must prevent).
LEASE = 12.0
#: After this many seconds past its time, a recipient still pending is published again by the
#: scheduler's rescue: the plugin drops the delayed messages whose time passed while the broker
#: was down, and the rescue is how Nudge still sends them (docs/delays.md).
RESCUE = 10.0
SEED = int(os.environ.get("NUDGE_FAULTS_SEED", random.randrange(1_000_000)))


@pytest.fixture
def run(engine: Engine) -> str:
    """A run id prefixing every key, and the template the flows send."""
    with engine.begin() as conn:
        templates.add(conn, "welcome", "Hello {{ contact.id }}", "Welcome", None)
    return f"f{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fleet(start_worker: Callable[..., Worker]) -> dict[str, Worker]:
    """One worker process per role, so that a fault can hit one role at a time."""
    return {role: _start(start_worker, role) for role in QUEUES}


def _start(start_worker: Callable[..., Worker], role: str, *, wait: bool = True) -> Worker:
    return start_worker(
        role,
        concurrency=CONCURRENCY,
        claim_lease_seconds=LEASE,
        batch_size=BATCH,
        rescue_after_seconds=RESCUE,
        wait=wait,
    )


def start_fleet(start_worker: Callable[..., Worker]) -> dict[str, Worker]:
    """One worker per role with the fault suite's settings, started together, once each
    consumes its queue (the cluster and failover tests' fleet)."""
    workers = {role: _start(start_worker, role, wait=False) for role in QUEUES}
    for role, worker in workers.items():
        wait_for(lambda w=worker, q=QUEUES[role]: w.consuming([q]), timeout=60)  # type: ignore[misc]
    return workers


def _flows(run: str, settings: Settings, engine: Engine) -> list[Flow]:
    """The work in flight: a campaign fanning out, delayed messages and events streaming."""
    return [
        Campaign(run, chunk=BATCH, concurrency=CONCURRENCY).start(settings, engine),
        DelayedMessages(run, limit=CONCURRENCY * BATCH, seed=SEED),
        Events(run),
    ]


def _sending(engine: Engine) -> set[tuple[str, object]]:
    """The recipients ``sending`` now, as (Idempotency-Key, claim time): the test's database
    holds this run's rows only."""
    query = select(
        message_items.c.message_id, message_items.c.contact_id, message_items.c.claimed_at
    ).where(message_items.c.status == "sending")
    with engine.connect() as conn:
        return {(f"nudge-{mid}-{cid}", at) for mid, cid, at in conn.execute(query)}


def _kill_schedule(rng: random.Random, kills: int) -> list[str]:
    """The roles to SIGKILL, one after the other: random, dispatch among them at least once."""
    roles = [rng.choice(sorted(QUEUES)) for _ in range(kills)]
    if "dispatch" not in roles:
        roles[rng.randrange(kills)] = "dispatch"
    return roles


def _servers(command: str) -> float:
    """Run ``servers.sh COMMAND``; returns the seconds it took."""
    started = time.monotonic()
    subprocess.run(
        ["bash", str(ROOT / "infra/local/servers.sh"), command],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def _reconnected(fleet: dict[str, Worker], stream: Stream) -> list[str]:
    """Wait until every worker consumes its queue again and the producer gets confirms again;
    returns what did not come back."""
    problems = []
    deadline = time.monotonic() + 45
    for role, worker in fleet.items():
        try:
            wait_for(
                lambda w=worker, q=QUEUES[role]: w.consuming([q]),  # type: ignore[misc]
                timeout=max(1.0, deadline - time.monotonic()),
                interval=0.5,
            )
        except AssertionError:
            problems.append(f"the {role} worker does not consume {QUEUES[role]} again")
    before = stream.confirmed()
    try:
        wait_for(lambda: stream.confirmed() >= before + 50, timeout=60)
    except AssertionError:
        problems.append("the producer gets no confirms again")
    return problems


def _judge(
    scenario: str,
    injected: str,
    stream: Stream,
    engine: Engine,
    sink: Sink,
    in_flight: InFlight,
    reconnect_problems: Sequence[str] = (),
) -> None:
    """Wait until every flow settled (or a deadline), add the scenario's row to the table,
    print it, and fail with the problems found."""
    with contextlib.suppress(AssertionError):  # the verdicts say what did not settle
        wait_for(
            lambda: all(f.settled(engine) for f in stream.flows),
            timeout=10 if reconnect_problems else 240,
            interval=0.5,
            message="every flow to settle",
        )
    errors: Counter[str] = Counter()
    for f in stream.flows:
        errors.update(f.tally.errors)
    row = report.Row(
        scenario,
        f"{injected} (seed {SEED})",
        tuple(f.verdict(engine, sink, in_flight) for f in stream.flows),
        ", ".join(f"{k} x{n}" for k, n in sorted(errors.items())),
        tuple(reconnect_problems),
    )
    report.ROWS.append(row)
    print("\n" + report.table([row]))
    assert row.ok, report.table([row])


@both_backends
def test_workers_sigkilled_at_random_moments_lose_nothing_and_send_nothing_twice(
    settings: Settings,
    sink: Sink,
    engine: Engine,
    run: str,
    fleet: dict[str, Worker],
    start_worker: Callable[..., Worker],
) -> None:
    rng = random.Random(SEED)
    sink.latency = 0.01  # a slow receiver, so that kills land mid-send
    stream = Stream(settings.amqp_url, _flows(run, settings, engine)).start()
    try:
        wait_for(lambda: stream.confirmed() >= 100, timeout=30, message="a stream in flight")
        kills: Counter[str] = Counter()
        # Each claim a dead dispatch held: its recipient may be sent once more, no other.
        claims: set[tuple[str, object]] = set()
        for role in _kill_schedule(rng, 5):
            # A random moment is the point of the test: this sleep is the fault's timing.
            time.sleep(rng.uniform(0.3, 2.5))
            fleet[role].kill()
            kills[role] += 1
            if role == "dispatch":
                claims |= _sending(engine)
            fleet[role] = _start(start_worker, role)
    finally:
        stream.stop()
    injected = "SIGKILL " + ", ".join(f"{role} x{n}" for role, n in sorted(kills.items()))
    _judge(
        f"workers SIGKILLed ({settings.delay_backend})",
        f"{injected}; {len(claims)} claims in flight",
        stream,
        engine,
        sink,
        InFlight(claims=Counter(key for key, _ in claims)),
    )


@pytest.mark.parametrize(
    ("delay_backend", "command", "scenario"),
    [
        ("tiers", "restart-rabbitmq", "RabbitMQ restarted"),
        ("plugin", "restart-rabbitmq", "RabbitMQ restarted"),
        # The crash on the ladder only: each RabbitMQ scenario costs about a minute of the
        # suite, and what a crash adds (nothing flushed) is the broker's, not the backend's.
        ("tiers", "crash-rabbitmq", "RabbitMQ crashed"),
    ],
    ids=["restart-tiers", "restart-plugin", "crash-tiers"],
)
def test_rabbitmq_going_down_mid_stream_loses_no_confirmed_message(
    settings: Settings,
    sink: Sink,
    engine: Engine,
    run: str,
    fleet: dict[str, Worker],
    command: str,
    scenario: str,
) -> None:
    # A clean stop, and a SIGKILL of the Erlang VM: nothing flushed, no connection closed.
    stream = Stream(settings.amqp_url, _flows(run, settings, engine)).start()
    try:
        wait_for(lambda: stream.confirmed() >= 100, timeout=30, message="a stream in flight")
        took = _servers(command)
        problems = _reconnected(fleet, stream)
    finally:
        stream.stop()
    _judge(
        f"{scenario} ({settings.delay_backend})",
        f"{command} ({took:.0f} s)",
        stream,
        engine,
        sink,
        InFlight(faults=1),
        problems,
    )


@pytest.mark.parametrize(
    ("command", "scenario"),
    [("restart-postgres", "PostgreSQL restarted"), ("crash-postgres", "PostgreSQL crashed")],
    ids=["restart", "crash"],
)
def test_postgres_going_down_mid_stream_loses_no_confirmed_message(
    settings: Settings,
    sink: Sink,
    engine: Engine,
    run: str,
    fleet: dict[str, Worker],
    command: str,
    scenario: str,
) -> None:
    # A clean restart, and a crash (immediate shutdown) that may lose the claims dispatch
    # committed without waiting for the disk: the finalise must write their outcomes again.
    stream = Stream(settings.amqp_url, _flows(run, settings, engine)).start()
    try:
        wait_for(lambda: stream.confirmed() >= 100, timeout=30, message="a stream in flight")
        took = _servers(command)
        engine.dispose()  # the test's own pooled connections died with the server
        problems = _reconnected(fleet, stream)
    finally:
        stream.stop()
    _judge(
        scenario,
        f"{command} ({took:.0f} s)",
        stream,
        engine,
        sink,
        InFlight(faults=1),
        problems,
    )
