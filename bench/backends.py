"""Scenario ``backends``: the two delay backends side by side in one run, each in a vhost of
its own on the same broker.

Per backend: the ``delays`` scenario (publish rate, delivered rate, lateness p50/p99/max at
``n / spread`` due per second) with the broker's CPU per message; then ``pending`` requests
due in ``hours`` hours (spread over one hour) left waiting in the delay: broker memory and
disk added, a broker restart (``servers.sh restart-rabbitmq``) with them waiting, how long it
took and whether every one is still there. What a node loss loses is not measured here (one
node); the figures file carries the plugin's own documentation on it.

Each run writes ``bench/results/backends-<UTC timestamp>.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import httpx
import psutil  # type: ignore[import-untyped]  # no stubs in the lock file
import sqlalchemy as sa

from bench import delays, report, store
from bench.fleet import Fleet
from producer import Producer, scheduled
from shared import amqp, delay, topology
from workers.config import Settings
from workers.store.db import sync_engine
from workers.store.schema import message_keys, messages

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "infra/local/servers.sh"
BACKENDS: tuple[delay.BackendName, ...] = ("tiers", "plugin")

#: From the plugin's README (rabbitmq/rabbitmq-delayed-message-exchange, "Limitations"),
#: quoted so the result file says what the measurement cannot: one node here, no node loss.
NODE_LOSS = (
    "Plugin (README, Limitations): delayed messages are stored in a Mnesia table with a single "
    "disk copy on the node that received them; they survive a restart of that node, but are "
    "lost if the node is lost (the table is not replicated), and disabling the plugin loses "
    "them too. The design does not fit 'hundreds of thousands or millions' of delayed "
    "messages. Ladder: every level is a quorum queue (replicated to a majority) and moves "
    "messages by at-least-once dead-lettering, so a cluster keeps waiting messages while a "
    "majority of its nodes lives."
)


@dataclass(frozen=True)
class Params:
    n: int = 20_000
    spread: float = 10.0
    pending: int = 100_000
    hours: float = 3.0
    concurrency: int = 2


class Broker:
    """The local node: its management API, its Erlang VM and its data directory."""

    def __init__(self, settings: Settings) -> None:
        parts = urllib.parse.urlsplit(settings.rabbitmq_mgmt_url)
        self.api = httpx.Client(
            base_url=f"{parts.scheme}://{parts.hostname}:{parts.port}/api",
            auth=(parts.username or "guest", parts.password or "guest"),
            timeout=30,
        )
        self.amqp = urllib.parse.urlsplit(settings.amqp_url)

    def vhost(self, name: str) -> str:
        q = urllib.parse.quote(name, safe="")
        self.api.delete(f"/vhosts/{q}")
        self.api.put(f"/vhosts/{q}").raise_for_status()
        user = self.amqp.username or "guest"
        self.api.put(
            f"/permissions/{q}/{user}", json={"configure": ".*", "write": ".*", "read": ".*"}
        ).raise_for_status()
        return urllib.parse.urlunsplit(self.amqp._replace(path="/" + q))

    def delete(self, name: str) -> None:
        self.api.delete(f"/vhosts/{urllib.parse.quote(name, safe='')}")

    def waiting(self, vhost: str) -> int:
        """AMQP messages waiting in the delay of ``vhost`` (ladder queues, plugin exchange)."""
        q = urllib.parse.quote(vhost, safe="")
        total = sum(
            x.get("messages", 0)
            for x in self.api.get(f"/queues/{q}").json()
            if x["name"].startswith("nudge.delay.")
        )
        r = self.api.get(f"/exchanges/{q}/{delay.PLUGIN_EXCHANGE}")
        if r.status_code == 200:
            total += r.json().get("messages_delayed", 0)
        return int(total)

    def intake(self, vhost: str) -> int:
        q = urllib.parse.quote(vhost, safe="")
        r = self.api.get(f"/queues/{q}/{topology.INTAKE_QUEUE}")
        return int(r.json().get("messages", 1)) if r.status_code == 200 else 1

    def node(self) -> dict[str, Any]:
        nodes: list[dict[str, Any]] = self.api.get("/nodes").json()
        return nodes[0]

    def process(self) -> psutil.Process:
        """The broker's Erlang VM: the process listening on the AMQP port."""
        port = self.amqp.port
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
        raise RuntimeError(f"no process listens on the AMQP port {port}")

    def cpu_seconds(self) -> float:
        return float(sum(self.process().cpu_times()[:2]))

    def data_bytes(self) -> int:
        """Size of the node's data directory (RABBITMQ_MNESIA_BASE of its VM)."""
        base = self.process().environ().get("RABBITMQ_MNESIA_BASE")
        if not base:
            raise RuntimeError("the broker's RABBITMQ_MNESIA_BASE is unknown")
        out = subprocess.run(["du", "-sb", base], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[0])


def _wait(predicate: Any, timeout: float, what: str) -> float:
    """Poll until ``predicate()``; the seconds it took. Raises RuntimeError after ``timeout``."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - began


def _use(settings: Settings, url: str, backend: delay.BackendName) -> Settings:
    """Settings (and the workers' environment) for ``backend`` in the vhost at ``url``."""
    os.environ["NUDGE_AMQP_URL"] = url
    os.environ["NUDGE_DELAY_BACKEND"] = backend
    return settings.model_copy(update={"amqp_url": url, "delay_backend": backend})


def _declare(url: str, backend: delay.BackendName) -> None:
    async def declare() -> None:
        connection = await amqp.connect(url)
        try:
            await amqp.declare(connection, topology.build(backend))
        finally:
            await connection.close()

    asyncio.run(declare())


def delivery(
    settings: Settings, broker: Broker, backend: delay.BackendName, p: Params
) -> dict[str, Any]:
    """The delays scenario on ``backend``, with the broker's CPU per message."""
    # A name of its own per run: the plugin keeps the delayed messages of a deleted vhost and
    # delivers them into a vhost re-created under the same name (seen in this benchmark).
    vhost = f"bench-{backend}-delivery-{uuid.uuid4().hex[:6]}"
    url = broker.vhost(vhost)
    _declare(url, backend)
    dp = delays.Params(n=p.n, spread=p.spread, concurrency=p.concurrency, split=True)
    try:
        cpu0 = broker.cpu_seconds()
        result = delays.measure(_use(settings, url, backend), dp)
        cpu = broker.cpu_seconds() - cpu0
    finally:
        broker.delete(vhost)
    figures = {f.name.strip(): round(f.value, 1) for f in result.figures if f.value is not None}
    wanted = (
        "publish, Producer (sync)",
        "delivered, first to last send",
        "lateness p50",
        "lateness p99",
        "lateness max",
        "machine CPU busy",
    )
    return {
        **{k: figures[k] for k in wanted},
        "broker CPU per message (µs)": round(cpu * 1e6 / (dp.n + dp.async_n), 1),
        "final": f"{result.final}/{dp.n}",
        "ok": result.ok,
    }


def pending(
    settings: Settings, broker: Broker, backend: delay.BackendName, p: Params
) -> dict[str, Any]:
    """``p.pending`` requests waiting in the delay: memory, disk, and a restart."""
    vhost = f"bench-{backend}-pending-{uuid.uuid4().hex[:6]}"
    url = broker.vhost(vhost)
    _declare(url, backend)
    s = _use(settings, url, backend)
    prefix = f"bench-pending-{uuid.uuid4().hex[:6]}-"
    fleet = Fleet(1, p.concurrency, report.RESULTS, split=True)
    mem0, disk0 = broker.node()["mem_used"], broker.data_bytes()
    try:
        fleet.start(url)
        due = datetime.now(UTC) + timedelta(hours=p.hours)
        began = time.perf_counter()
        with Producer(url, name="nudge-bench-pending") as producer:
            producer.schedule_many(
                scheduled(
                    f"{prefix}{i % 1000}",
                    "bench",
                    "log",
                    idempotency_key=f"{prefix}{i}",
                    deliver_at=due + timedelta(seconds=i % 3600),
                )
                for i in range(p.pending)
            )
        publish_s = time.perf_counter() - began
        _wait(lambda: broker.intake(vhost) == 0, 900, "the scheduler to store every request")
    finally:
        fleet.stop()
    try:
        # the management API refreshes queue figures every 5 s: wait until two readings 6 s
        # apart agree
        waiting = 0

        def settled() -> bool:
            nonlocal waiting
            time.sleep(6)
            before, waiting = waiting, broker.waiting(vhost)
            return waiting > 0 and waiting == before

        _wait(settled, 180, "the waiting count to settle")
        mem, disk = broker.node()["mem_used"], broker.data_bytes()
        began = time.perf_counter()
        subprocess.run(["bash", str(SERVERS), "restart-rabbitmq"], check=True, capture_output=True)
        restart_s = time.perf_counter() - began
        back: list[int] = [0]

        def returned() -> bool:
            back[0] = broker.waiting(vhost)
            return back[0] >= waiting

        try:
            until_back = _wait(returned, 120, "every waiting message back after the restart")
        except RuntimeError:
            until_back = float("nan")
        return {
            "requests pending": p.pending,
            "publish with confirms (/s)": round(p.pending / publish_s),
            "AMQP messages waiting (bundled)": waiting,
            "broker memory added (MB)": round((mem - mem0) / 2**20, 1),
            "broker disk added (MB)": round((disk - disk0) / 2**20, 1),
            "restart-rabbitmq (s)": round(restart_s, 1),
            "then until all are counted again (s)": round(until_back, 1),
            "waiting after the restart": back[0],
            "all came back": back[0] >= waiting,
        }
    finally:
        broker.delete(vhost)
        _forget(s, prefix)


def _forget(settings: Settings, prefix: str) -> None:
    """Delete the pending run's requests: they will never be due here."""
    engine = sync_engine(settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.delete(messages).where(messages.c.idempotency_key.like(prefix + "%")))
            conn.execute(sa.delete(message_keys).where(message_keys.c.key.like(prefix + "%")))
    finally:
        engine.dispose()


def run(settings: Settings, p: Params) -> bool:
    broker = Broker(settings)
    saved = {k: os.environ.get(k) for k in ("NUDGE_AMQP_URL", "NUDGE_DELAY_BACKEND")}
    if asyncio.run(amqp.detect_backend(settings.amqp_url)) != "plugin":
        raise RuntimeError(
            "the broker has no x-delayed-message plugin: `make up` builds it when it finds "
            "its source (see infra/local/README.md)"
        )
    results: dict[str, dict[str, Any]] = {}
    load = os.getloadavg()
    try:
        for backend in BACKENDS:
            click.echo(f"--- {backend}: {p.n} messages due over {p.spread:g} s")
            results[backend] = delivery(settings, broker, backend, p)
            click.echo(f"--- {backend}: {p.pending} requests pending, then a broker restart")
            results[backend].update(pending(settings, broker, backend, p))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rows = list(results["tiers"])
    width = max(len(r) for r in rows)
    click.echo(f"{'':<{width}}  {'tiers':>12}  {'plugin':>12}")
    for row in rows:
        click.echo(f"{row:<{width}}  {results['tiers'][row]!s:>12}  {results['plugin'][row]!s:>12}")
    click.echo(f"node loss: {NODE_LOSS}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = report.RESULTS / f"backends-{stamp}.json"
    engine = sync_engine(settings.database_url)
    try:
        host = report.machine(settings.rabbitmq_mgmt_url, store.server_version(engine))
    finally:
        engine.dispose()
    doc = {
        "scenario": "backends",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": asdict(p),
        "machine": host,
        "load average at start (1, 5, 15 min)": [round(x, 1) for x in load],
        "results": results,
        "node_loss": NODE_LOSS,
    }
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    click.echo(f"wrote bench/results/{path.name}")
    return all(r["ok"] and r["all came back"] for r in results.values())
