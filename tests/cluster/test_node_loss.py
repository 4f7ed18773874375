"""A node of the three-node cluster SIGKILLed while a campaign fans out and delayed messages,
events and confirms are in flight, then started again: the quorum queues it led (``nudge.due``
and, as every queue was declared through it, the delay ladder's too) carry on from their
members on the survivors, the workers and the producer move to another address by
themselves, every confirmed request and every campaign recipient ends with exactly one final
outcome, the sink sees nothing twice beyond what was in flight, and the node rejoins.

The flows, the judge and the in-flight bound are the fault suite's (``tests/faults``).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import Engine

from shared.topology import DUE_QUEUE
from tests.cluster.conftest import SERVERS, Cluster, Node, servers
from tests.faults import test_injected_faults as faults
from tests.faults.flows import Campaign, DelayedMessages, Events, Flow, InFlight, Stream
from tests.support import Worker, wait_for
from workers.config import Settings
from workers.demo.sink import Sink
from workers.store import templates


@pytest.fixture
def run(engine: Engine) -> str:
    with engine.begin() as conn:
        templates.add(conn, "welcome", "Hello {{ contact.id }}", "Welcome", None)
    return f"c{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fleet(start_worker: Callable[..., Worker]) -> dict[str, Worker]:
    """One worker per role (as in the fault suite), started together."""
    return faults.start_fleet(start_worker)


def _leader(
    cluster: Cluster, vhost: str, queue: str, via: Node | None = None
) -> tuple[str, list[str], list[str]]:
    """The node leading ``queue``, its members and those online, asked of ``via`` (else of
    a node that is up)."""
    management = cluster.management(via)
    try:
        q = management.queue(vhost, queue)
    finally:
        management.close()
    return q.get("leader", ""), q.get("members", []), q.get("online", [])


def _moved(
    cluster: Cluster, via: Node, vhost: str, victim: Node, fleet: dict[str, Worker]
) -> list[str]:
    """Wait until every worker has a connection to a surviving node; returns those that do
    not. (A quorum queue keeps the consumers of a lost node as "suspected down", so its
    consumer count cannot tell.)"""
    wanted = {f"nudge-{role}" for role in fleet}

    def connected() -> set[str]:
        management = cluster.management(via)
        try:
            return {
                c.get("client_properties", {}).get("connection_name", "")
                for c in management.connections()
                if c.get("vhost") == vhost and c.get("node") != victim.name
            }
        finally:
            management.close()

    try:
        wait_for(lambda: wanted <= connected(), timeout=30, interval=0.5)
    except AssertionError:
        return [f"{sorted(wanted - connected())} did not move off {victim.name}"]
    return []


def test_sigkilling_the_node_that_leads_nudge_due_mid_campaign_loses_nothing_and_it_rejoins(
    cluster: Cluster,
    vhost: str,
    settings: Settings,
    sink: Sink,
    engine: Engine,
    run: str,
    fleet: dict[str, Worker],
) -> None:
    leader, members, _ = _leader(cluster, vhost, DUE_QUEUE)
    names = {n.name: n for n in cluster.nodes}
    assert sorted(members) == sorted(names), f"{DUE_QUEUE} has members {members}, not all three"
    victim = names[leader]
    survivors = next(n for n in names.values() if n is not victim)
    sink.latency = 0.005  # a slow receiver, so that the kill lands mid-send
    flows: list[Flow] = [
        Campaign(run, chunk=faults.BATCH, concurrency=faults.CONCURRENCY, size=1000).start(
            settings, engine
        ),
        DelayedMessages(run, limit=faults.CONCURRENCY * faults.BATCH, delay=(0.5, 3.0)),
        Events(run),
    ]
    stream = Stream(settings.amqp_url, flows).start()
    try:
        wait_for(lambda: stream.confirmed() >= 100, timeout=30, message="a stream in flight")
        servers("cluster-kill", str(victim.number))
        problems = _moved(cluster, survivors, vhost, victim, fleet)
        problems += faults._reconnected(fleet, stream)
        moved, _, online = _leader(cluster, vhost, DUE_QUEUE, survivors)
        if moved == leader or leader in online:
            problems.append(f"{DUE_QUEUE} still led by {moved}, online {online}")
        # The node boots while the flows settle.
        restart = subprocess.Popen(
            ["bash", str(SERVERS), "cluster-up"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    finally:
        stream.stop()
    try:
        faults._judge(
            "cluster node SIGKILLed (tiers)",
            f"SIGKILL {victim.name}, leader of {DUE_QUEUE}",
            stream,
            engine,
            sink,
            InFlight(faults=1),
            problems,
        )
    finally:
        _, err = restart.communicate(timeout=120)
    assert restart.returncode == 0, f"cluster-up after the kill failed: {err.decode()}"
    assert cluster.running() == dict.fromkeys(names, True)
    wait_for(
        lambda: leader in _leader(cluster, vhost, DUE_QUEUE, survivors)[2],
        timeout=30,
        message=f"{victim.name} back among {DUE_QUEUE}'s online members",
    )
