"""Faults injected while a campaign, delayed messages and events are in flight: workers
SIGKILLed at random moments (planner included), RabbitMQ restarted, PostgreSQL restarted,
PostgreSQL crashed (immediate shutdown: the claims committed without waiting for the disk may
be lost, and the finalise must write their outcomes again).
After each, every confirmed request and every campaign recipient has exactly one final
outcome, the sink saw nothing twice beyond the in-flight bound (and then with the same
Idempotency-Key), and producers and workers reconnected by themselves.

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
from sqlalchemy import Engine

from shared.topology import DUE_QUEUE, EVENTS_QUEUE, INTAKE_QUEUE, PLAN_QUEUE
from tests.backends import both_backends
from tests.conftest import ROOT
from tests.faults import report
from tests.faults.flows import Campaign, DelayedMessages, Events, Flow, Stream
from tests.support import Worker, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store import templates

#: Each role the faults hit, with the queue it consumes (no flow sends read receipts).
QUEUES = {
    "scheduler": INTAKE_QUEUE,
    "dispatch": DUE_QUEUE,
    "events": EVENTS_QUEUE,
    "planner": PLAN_QUEUE,
}
CONCURRENCY = 2
#: The claim lease of the fault tests' workers. The suite's usual 3 s is shorter than a batch
#: takes on a loaded machine: claims then overtake each other before any finalises, and the
#: copies re-published for rows held by others multiply (a livelock the lease must prevent).
LEASE = 12.0
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


def _start(start_worker: Callable[..., Worker], role: str) -> Worker:
    return start_worker(role, concurrency=CONCURRENCY, claim_lease_seconds=LEASE)


def _flows(run: str, settings: Settings, engine: Engine) -> list[Flow]:
    """The work in flight: a campaign fanning out, delayed messages and events streaming."""
    return [Campaign(run).start(settings, engine), DelayedMessages(run, seed=SEED), Events(run)]


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


def _in_flight_bound(settings: Settings, dispatch_faults: int) -> int:
    """What the sink may see twice (docs/architecture.md, "What a receiver may see twice"):
    the sends of the batches in flight in a dispatch process when it died, at most
    concurrency x batch size for each fault that hit one."""
    return dispatch_faults * CONCURRENCY * settings.batch_size


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
    bound: int,
    reconnect_problems: Sequence[str] = (),
) -> None:
    """Wait until every flow settled (or a deadline), add the scenario's row to the table,
    print it, and fail with the problems found."""
    with contextlib.suppress(AssertionError):  # the verdicts say what did not settle
        wait_for(
            lambda: all(f.settled(engine) for f in stream.flows),
            timeout=10 if reconnect_problems else 120,
            interval=0.5,
            message="every flow to settle",
        )
    errors: Counter[str] = Counter()
    for f in stream.flows:
        errors.update(f.tally.errors)
    row = report.Row(
        scenario,
        f"{injected} (seed {SEED})",
        tuple(f.verdict(engine, sink, bound) for f in stream.flows),
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
        for _ in range(5):
            # A random moment is the point of the test: this sleep is the fault's timing.
            time.sleep(rng.uniform(0.3, 2.5))
            role = rng.choice(sorted(QUEUES))
            fleet[role].kill()
            kills[role] += 1
            fleet[role] = _start(start_worker, role)
    finally:
        stream.stop()
    injected = "SIGKILL " + ", ".join(f"{role} x{n}" for role, n in sorted(kills.items()))
    _judge(
        f"workers SIGKILLed ({settings.delay_backend})",
        injected,
        stream,
        engine,
        sink,
        _in_flight_bound(settings, kills["dispatch"]),
    )


@both_backends
def test_a_rabbitmq_restart_mid_stream_loses_no_confirmed_message(
    settings: Settings, sink: Sink, engine: Engine, run: str, fleet: dict[str, Worker]
) -> None:
    stream = Stream(settings.amqp_url, _flows(run, settings, engine)).start()
    try:
        wait_for(lambda: stream.confirmed() >= 100, timeout=30, message="a stream in flight")
        took = _servers("restart-rabbitmq")
        problems = _reconnected(fleet, stream)
    finally:
        stream.stop()
    _judge(
        f"RabbitMQ restarted ({settings.delay_backend})",
        f"restart-rabbitmq ({took:.0f} s)",
        stream,
        engine,
        sink,
        _in_flight_bound(settings, 1),
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
        _in_flight_bound(settings, 1),
        problems,
    )
