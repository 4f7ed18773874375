"""Scenario ``publish``: how fast a service publishes with confirms, :class:`producer.Producer`
and :class:`producer.AsyncProducer`, into the real topology (the ``nudge.intake`` quorum
queue) with no worker consuming it.

Each round publishes N scheduled messages per producer twice: requests validated while
publishing (what a service does, as in the ``delays`` scenario), then requests validated
beforehand (the producer alone). The intake queue is purged before and after each round.
Each publish first publishes one message on its own (connecting), then times the N others.
Figures are the medians over the rounds; the publisher's CPU per message is its process's
user + system time over the N, and RabbitMQ's that of the local node serving the URL (the one
``infra/local/servers.sh`` started for its port) over the same publish with prebuilt requests.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import click
import pika
import pika.exceptions
import psutil  # type: ignore[import-untyped]  # no stubs in the lock file

from bench import report, store
from bench.delays import requests_for
from bench.report import Figure
from producer import AsyncProducer, Producer, Scheduled
from shared.brokers import addresses
from shared.errors import BrokerUnavailable
from shared.topology import INTAKE_QUEUE
from workers.config import Settings
from workers.store.db import sync_engine

#: The target: a raw pipelined aio-pika publisher reaches about 10,500 /s into a quorum queue
#: on the benchmark machine.
TARGET = 10_000


@dataclass(frozen=True)
class Params:
    """``n`` messages per producer and kind of publish, ``rounds`` times."""

    n: int = 20_000
    rounds: int = 3


@dataclass(frozen=True)
class Round:
    """Seconds of wall time, of the publisher's CPU and of RabbitMQ's (None when the broker is
    not a local node) for one publish of ``n``."""

    wall: float
    cpu: float
    broker_cpu: float | None


def broker_clock(url: str) -> Callable[[], float | None]:
    """The CPU seconds so far of the local RabbitMQ node serving ``url`` (named
    ``nudge-<port>@...`` by ``infra/local/servers.sh``), None when there is none."""
    port = urllib.parse.urlsplit(addresses(url)[0]).port
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "beam.smp":
            continue
        try:
            node = proc.environ().get("RABBITMQ_NODENAME", "")
        except psutil.Error:
            continue
        if node.startswith(f"nudge-{port}@"):
            return lambda: _cpu_seconds(proc)
    return lambda: None


def _cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def _spent(before: float | None, after: float | None) -> float | None:
    return after - before if before is not None and after is not None else None


def _purge(url: str) -> None:
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailable(f"cannot connect to RabbitMQ: {exc!r}") from exc
    try:
        connection.channel().queue_purge(INTAKE_QUEUE)
    finally:
        connection.close()


def _sync(url: str, requests: Iterator[Scheduled], broker: Callable[[], float | None]) -> Round:
    with Producer(url, name="nudge-bench") as producer:
        producer.publish([next(requests)])  # connects
        cpu, began, broker_cpu = time.process_time(), time.perf_counter(), broker()
        producer.schedule_many(requests)
        wall = time.perf_counter() - began
        return Round(wall, time.process_time() - cpu, _spent(broker_cpu, broker()))


def _async(url: str, requests: Iterator[Scheduled], broker: Callable[[], float | None]) -> Round:
    async def publish() -> Round:
        async with AsyncProducer(url, name="nudge-bench-async") as producer:
            await producer.publish([next(requests)])
            cpu, began, broker_cpu = time.process_time(), time.perf_counter(), broker()
            await producer.schedule_many(requests)
            wall = time.perf_counter() - began
            return Round(wall, time.process_time() - cpu, _spent(broker_cpu, broker()))

    return asyncio.run(publish())


def measure(url: str, p: Params) -> dict[tuple[str, bool], list[Round]]:
    """Every round's timings, by producer and whether the requests were built beforehand."""
    rounds: dict[tuple[str, bool], list[Round]] = {}
    due = datetime.now(UTC) + timedelta(days=1)  # nothing falls due: no worker runs anyway
    broker = broker_clock(url)
    for _ in range(p.rounds):
        for name, publish in (("sync", _sync), ("async", _async)):
            prefix = f"bench-{uuid.uuid4().hex[:8]}-"
            _purge(url)
            made = requests_for(prefix + "v", p.n + 1, due, 60.0, [0.0])
            rounds.setdefault((name, False), []).append(publish(url, made, broker))
            _purge(url)
            built = list(requests_for(prefix + "b", p.n + 1, due, 60.0, [0.0]))
            rounds.setdefault((name, True), []).append(publish(url, iter(built), broker))
            _purge(url)
    return rounds


def _median_per_message(seconds: list[float | None], n: int) -> float | None:
    known = [s for s in seconds if s is not None]
    return statistics.median(s * 1e6 / n for s in known) if known else None


def _validate_rate(n: int) -> float:
    due = datetime.now(UTC) + timedelta(days=1)
    began = time.perf_counter()
    list(requests_for("bench-validate-", n, due, 60.0, [0.0]))
    return n / (time.perf_counter() - began)


def run(settings: Settings, p: Params) -> bool:
    """Run the scenario, print the table, write the JSON (a failed publish raises)."""
    click.echo(f"publish: {p.n} messages per producer and kind, {p.rounds} round(s)")
    rounds = measure(settings.amqp_url, p)
    label = {"sync": "Producer (sync)", "async": "AsyncProducer"}
    figures: list[Figure] = []
    for name in ("sync", "async"):
        made, built = rounds[(name, False)], rounds[(name, True)]
        figures += [
            Figure(f"publish, {label[name]}", statistics.median(p.n / r.wall for r in made), "/s"),
            Figure(
                f"  prebuilt requests, {label[name]}",
                statistics.median(p.n / r.wall for r in built),
                "/s",
                TARGET,
            ),
            Figure(
                f"  CPU per message, {name}",
                statistics.median(r.cpu * 1e6 / p.n for r in made),
                "µs",
            ),
            Figure(
                f"  CPU per message, {name} prebuilt",
                statistics.median(r.cpu * 1e6 / p.n for r in built),
                "µs",
            ),
            Figure(
                f"  RabbitMQ CPU per message, {name} prebuilt",
                _median_per_message([r.broker_cpu for r in built], p.n),
                "µs",
                absent="no local RabbitMQ node",
            ),
        ]
    figures.append(Figure("validating requests alone", _validate_rate(p.n), "/s"))
    click.echo(report.table(figures))
    engine = sync_engine(settings.database_url)
    try:
        host = report.machine(settings.rabbitmq_mgmt_url, store.server_version(engine))
    finally:
        engine.dispose()
    per_round = {
        f"{name}{' prebuilt' if built else ''}": [round(p.n / r.wall) for r in rs]
        for (name, built), rs in rounds.items()
    }
    extra = {"rounds_per_second": per_round}
    path = report.write("publish", asdict(p), {}, host, figures, extra)
    click.echo(f"wrote bench/results/publish/{path.name}")
    return True
