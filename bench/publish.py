"""Scenario ``publish``: how fast a service publishes with confirms, :class:`producer.Producer`
and :class:`producer.AsyncProducer`, into the real topology (the ``nudge.intake`` quorum
queue) with no worker consuming it.

Each round publishes N scheduled messages per producer twice: requests validated while
publishing (what a service does, as in the ``delays`` scenario), then requests validated
beforehand (the producer alone). The intake queue is purged before and after each round.
Each publish first publishes one message on its own (connecting), then times the N others.
Figures are the medians over the rounds; the publisher's CPU per message is its process's
user + system time over the N.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import click
import pika
import pika.exceptions

from bench import report, store
from bench.delays import requests_for
from bench.report import Figure
from producer import AsyncProducer, Producer, Scheduled
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
    """Seconds of wall time and of the publisher's CPU for one publish of ``n``."""

    wall: float
    cpu: float


def _purge(url: str) -> None:
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailable(f"cannot connect to RabbitMQ: {exc!r}") from exc
    try:
        connection.channel().queue_purge(INTAKE_QUEUE)
    finally:
        connection.close()


def _sync(url: str, requests: Iterator[Scheduled]) -> Round:
    with Producer(url, name="nudge-bench") as producer:
        producer.publish([next(requests)])  # connects
        cpu, began = time.process_time(), time.perf_counter()
        producer.schedule_many(requests)
        return Round(time.perf_counter() - began, time.process_time() - cpu)


def _async(url: str, requests: Iterator[Scheduled]) -> Round:
    async def publish() -> Round:
        async with AsyncProducer(url, name="nudge-bench-async") as producer:
            await producer.publish([next(requests)])
            cpu, began = time.process_time(), time.perf_counter()
            await producer.schedule_many(requests)
            return Round(time.perf_counter() - began, time.process_time() - cpu)

    return asyncio.run(publish())


def measure(url: str, p: Params) -> dict[tuple[str, bool], list[Round]]:
    """Every round's timings, by producer and whether the requests were built beforehand."""
    rounds: dict[tuple[str, bool], list[Round]] = {}
    due = datetime.now(UTC) + timedelta(days=1)  # nothing falls due: no worker runs anyway
    for _ in range(p.rounds):
        for name, publish in (("sync", _sync), ("async", _async)):
            prefix = f"bench-{uuid.uuid4().hex[:8]}-"
            _purge(url)
            made = requests_for(prefix + "v", p.n + 1, due, 60.0, [0.0])
            rounds.setdefault((name, False), []).append(publish(url, made))
            _purge(url)
            built = list(requests_for(prefix + "b", p.n + 1, due, 60.0, [0.0]))
            rounds.setdefault((name, True), []).append(publish(url, iter(built)))
            _purge(url)
    return rounds


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
