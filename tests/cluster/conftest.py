"""The cluster suite: a three-node RabbitMQ cluster (``servers.sh cluster-up``) started for the
session beside the single node, and settings whose ``amqp_url`` lists its three nodes."""

from __future__ import annotations

import re
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from shared import brokers, delay
from tests.conftest import ROOT, declared_settings
from tests.support import Management
from workers.config import Settings
from workers.demo.sink import Sink

SERVERS = ROOT / "infra/local/servers.sh"


def servers(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SERVERS), *args], check=check, capture_output=True, text=True, timeout=300
    )


@dataclass(frozen=True)
class Node:
    number: int
    name: str
    amqp_port: int
    management_port: int


@dataclass(frozen=True)
class Cluster:
    """The local cluster: its addresses, and its nodes as ``cluster-status`` reported them when
    the session started (all up)."""

    amqp_url: str
    nodes: tuple[Node, ...]

    def management(self, node: Node | None = None) -> Management:
        """The management API of ``node``, else of the first node that answers."""
        for candidate in [node] if node else self.nodes:
            url = f"http://guest:guest@127.0.0.1:{candidate.management_port}"
            try:
                httpx.get(url + "/api/overview", auth=("guest", "guest"), timeout=5)
            except httpx.HTTPError:
                continue
            return Management(url)
        raise AssertionError("no node of the cluster answers on its management port")

    def running(self) -> dict[str, bool]:
        """Whether each node runs in the cluster, as a node that is up sees it."""
        management = self.management()
        try:
            return {n["name"]: n["running"] for n in management.nodes()}
        finally:
            management.close()

    def url(self, vhost: str) -> str:
        """The three addresses, on ``vhost``."""
        path = "/" + urllib.parse.quote(vhost, safe="")
        return ",".join(
            urllib.parse.urlunsplit(urllib.parse.urlsplit(a)._replace(path=path))
            for a in brokers.addresses(self.amqp_url)
        )


@pytest.fixture(scope="session")
def cluster(servers_up: None) -> Cluster:
    """The three-node cluster, started if it is not running; like the single node, it stays up
    after the session (``make down`` stops it)."""
    env = dict(
        line.split("=", 1) for line in servers("cluster-up").stdout.splitlines() if "=" in line
    )
    return Cluster(env["NUDGE_AMQP_URL"], tuple(_nodes()))


def _nodes() -> list[Node]:
    """Each node, from ``cluster-status`` (which fails unless all are up and clustered)."""
    nodes = []
    for line in servers("cluster-status").stdout.splitlines():
        m = re.match(
            r"node(\d+) rabbitmq\s+up\s+amqp=[\d.]+:(\d+) management=(\d+) .*node=(\S+)", line
        )
        assert m, f"unexpected cluster-status line: {line!r}"
        nodes.append(Node(int(m[1]), m[4], int(m[2]), int(m[3])))
    return nodes


@pytest.fixture(scope="session")
def servers_up(servers: None) -> None:
    """Postgres (and the single node) of the usual suite."""


@pytest.fixture
def vhost(cluster: Cluster) -> Iterator[str]:
    """A fresh vhost on the cluster."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    management = cluster.management()
    try:
        management.create_vhost(name)
    finally:
        management.close()
    yield name
    management = cluster.management()
    try:
        management.delete_vhost(name)
    except httpx.TimeoutException:
        pass  # the node goes on deleting it: deleting quorum queues may outlast the request
    finally:
        management.close()


@pytest.fixture
def settings(
    cluster: Cluster, vhost: str, database_url: str, sink: Sink, delay_backend: delay.BackendName
) -> Settings:
    """Settings naming the three nodes (this test's vhost) and this test's database, with the
    topology of ``delay_backend`` declared while every node is up: its quorum queues have a
    member on each."""
    return declared_settings(Settings.load(), cluster.url(vhost), database_url, sink, delay_backend)
