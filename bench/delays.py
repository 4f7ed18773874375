"""Scenario ``delays``: N messages due evenly over ``spread`` seconds, published with confirms
by a service, delivered to the ``log`` channel by real worker processes.

Figures: publish rate (sync and async producers), delivered rate, lateness (``sent_at -
deliver_at`` in Postgres) p50 / p99 / max, the workers' peak RSS. Targets on the 2-core
machine: publish >= 5,000 msg/s, delivered >= 2,000 msg/s, lateness p99 <= 100 ms.

``deliver_at = t0 + lead + i * spread / N``, ``t0`` being the start of the publish: a slow
publish or a slow pipeline shows as lateness, never as a shifted schedule. The async
producer's phase runs first (its messages are due within ``lead + 1`` s) and warms the
workers up; it is not part of the delivery figures.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import click
import psutil  # type: ignore[import-untyped]  # no stubs in the lock file
from sqlalchemy import Engine

from bench import report, store
from bench.fleet import CpuPeaks, Fleet, Servers, cpu_busy
from bench.report import Figure
from producer import AsyncProducer, Producer, Scheduled, scheduled
from shared import amqp, brokers, delay
from workers.config import Settings
from workers.store import templates
from workers.store.db import sync_engine


@dataclass(frozen=True)
class Params:
    """``n`` messages due over ``spread`` s from ``lead`` s after the publish starts;
    ``workers`` processes with ``concurrency`` batches in flight per role (with ``split``,
    ``workers`` scheduler processes and as many dispatch processes)."""

    n: int = 20_000
    spread: float = 10.0
    lead: float = 2.0
    workers: int = 1
    concurrency: int = 2
    async_n: int = 5_000
    split: bool = False


@dataclass(frozen=True)
class Measured:
    """What the run measured outside Postgres."""

    publish_s: float
    validate_s: float
    async_publish_s: float
    worker_cpu_s: float
    busy: float
    #: Seconds dispatch spent on the checks before sending, and recipients checked.
    check_s: float
    checked: float
    #: CPU seconds (user + system) per process kind over the publish and the delivery: the
    #: worker roles, ``rabbitmq``, ``postgres`` (every process of the server) and
    #: ``publisher`` (this process while it publishes, validation included).
    cpu: dict[str, float]
    #: Each of them at its busiest second, in cores (1.0 = one core).
    peak_cores: dict[str, float]
    #: Wall seconds from the start of the publish to the last final row.
    wall_s: float


def requests_for(
    prefix: str, n: int, start: datetime, spread: float, spent: list[float]
) -> Iterator[Scheduled]:
    """The run's requests, built while publishing as a service would; the time spent
    validating them is added to ``spent[0]``."""
    for i in range(n):
        began = time.perf_counter()
        due = start + timedelta(seconds=i * spread / n)
        request = scheduled(
            f"{prefix}{i}", "bench", "log", idempotency_key=f"{prefix}{i}", deliver_at=due
        )
        spent[0] += time.perf_counter() - began
        yield request


def publish_sync(url: str, prefix: str, p: Params) -> tuple[float, float]:
    """Publish with :meth:`Producer.schedule_many`; (seconds in all, of which validating)."""
    spent = [0.0]
    began = time.perf_counter()
    start = datetime.now(UTC) + timedelta(seconds=p.lead)
    with Producer(url, name="nudge-bench") as producer:
        producer.schedule_many(requests_for(prefix, p.n, start, p.spread, spent))
    return time.perf_counter() - began, spent[0]


async def publish_async(url: str, prefix: str, p: Params) -> float:
    """Publish ``async_n`` with :meth:`AsyncProducer.schedule_many`; seconds, validation and
    confirms included, connecting excluded."""
    async with AsyncProducer(url, name="nudge-bench-async") as producer:
        began = time.perf_counter()
        start = datetime.now(UTC) + timedelta(seconds=p.lead)
        await producer.schedule_many(requests_for(prefix, p.async_n, start, 1.0, [0.0]))
        return time.perf_counter() - began


@dataclass
class Result:
    """One run's figures and whether the run itself succeeded."""

    run_id: str
    figures: list[Figure]
    worker_settings: dict[str, object]
    host: dict[str, object]
    final: int
    not_sent: int
    codes: list[int]
    ok: bool


def run(settings: Settings, p: Params) -> bool:
    """Run the scenario, print the table, write the JSON. False when the run itself failed
    (messages not final in time, a worker not exiting 0), whatever the figures."""
    r = measure(settings, p)
    click.echo(report.table(r.figures))
    host = r.host
    click.echo(
        f"machine: {host['nproc']} x {host['cpu_model']}, RabbitMQ {host['rabbitmq']}, "
        f"Postgres {host['postgres']}\nworkers: {r.worker_settings}\n"
        f"final {r.final}/{p.n} (not sent: {r.not_sent}); exit codes {r.codes}"
    )
    path = report.write(
        "delays",
        asdict(p),
        r.worker_settings,
        host,
        r.figures,
        {
            "run": r.run_id,
            "final": r.final,
            "not_sent": r.not_sent,
            "worker_exit_codes": r.codes,
        },
        ok=r.ok,
    )
    click.echo(f"wrote bench/results/delays/{path.name}")
    if not r.ok:
        click.echo("RUN FAILED: see bench/results/worker-*.tmp", err=True)
    return r.ok


@dataclass
class Rig:
    """What a run measures with: the started workers, the servers, the database."""

    settings: Settings
    engine: Engine
    fleet: Fleet
    servers: Servers
    backend: delay.BackendName

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far per worker role, server and ``publisher`` (this process)."""
        return (
            self.fleet.cpu_by_role()
            | self.servers.cpu_seconds()
            | {"publisher": time.process_time()}
        )


def prepare(settings: Settings, p: Params) -> Rig:
    """The bench template, the backend, the (not yet started) workers and the servers."""
    engine = sync_engine(settings.database_url)
    with engine.begin() as conn:  # the scheduler parks messages naming an unknown template
        if templates.missing(conn, ["bench"]):
            templates.add(conn, "bench", "bench for {{ contact.id }}", None, None)
    backend = asyncio.run(amqp.resolve_backend(settings.delay_backend, settings.amqp_url))
    fleet = Fleet(p.workers, p.concurrency, report.RESULTS, p.split)
    amqp_port = urllib.parse.urlsplit(brokers.addresses(settings.amqp_url)[0]).port or 5672
    return Rig(settings, engine, fleet, Servers(amqp_port, engine.url.port or 5432), backend)


def warm_up(rig: Rig, prefix: str, p: Params) -> float:
    """Publish ``async_n`` messages with :class:`AsyncProducer` and wait until all are final;
    the publish's seconds."""
    async_s = asyncio.run(publish_async(rig.settings.amqp_url, prefix, p))
    if store.wait_final(rig.engine, prefix, p.async_n, time.monotonic() + 120) < p.async_n:
        raise RuntimeError("warm-up messages not delivered within 120 s: are workers ok?")
    return async_s


def load(
    rig: Rig, prefix: str, p: Params, async_s: float, grace: float = 120.0
) -> tuple[Measured, store.Outcomes, int]:
    """Publish the ``n`` messages of ``p`` with :class:`Producer`, wait until they are final
    (or ``grace`` seconds pass after the publish and the spread) and measure: the figures,
    their outcomes, how many are final."""
    cpu0, since = rig.cpu(), psutil.cpu_times()
    check0 = rig.fleet.metric("nudge_check_seconds_total")
    checked0 = rig.fleet.metric("nudge_checked_total")
    began, publisher0 = time.monotonic(), time.process_time()
    peaks = CpuPeaks(rig.cpu)
    try:
        publish_s, validate_s = publish_sync(rig.settings.amqp_url, prefix, p)
        publisher_s = time.process_time() - publisher0
        deadline = time.monotonic() + p.lead + p.spread + grace
        final = store.wait_final(rig.engine, prefix, p.n, deadline)
    finally:
        peak = peaks.stop()
    wall_s = time.monotonic() - began
    cpu1 = rig.cpu()
    cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1} | {"publisher": publisher_s}
    roles = {w.role for w in rig.fleet.workers}
    measured = Measured(
        publish_s,
        validate_s,
        async_s,
        sum(cpu[role] for role in roles),
        cpu_busy(since),
        rig.fleet.metric("nudge_check_seconds_total") - check0,
        rig.fleet.metric("nudge_checked_total") - checked0,
        cpu,
        peak,
        wall_s,
    )
    return measured, store.outcomes(rig.engine, prefix), final


def measure(settings: Settings, p: Params) -> Result:
    """Run the scenario against ``settings`` (its vhost and delay backend); the workers take
    their settings from the environment, so both must agree."""
    run_id = uuid.uuid4().hex[:8]
    rig = prepare(settings, p)
    click.echo(
        f"run {run_id}: {p.n} messages due over {p.spread:g} s; {p.workers} worker(s), "
        f"concurrency {p.concurrency}, {rig.backend} backend"
    )
    try:
        rig.fleet.start(settings.amqp_url)
        async_s = warm_up(rig, f"bench-{run_id}-a-", p)
        measured, outcome, final = load(rig, f"bench-{run_id}-s-", p, async_s)
        host = report.machine(settings.rabbitmq_mgmt_url, store.server_version(rig.engine))
    finally:
        codes = rig.fleet.stop()
        rig.engine.dispose()
    out = figures(p, measured, outcome)
    out += [
        Figure(f"peak RSS, {w.role} {i + 1}", w.peak_rss / 2**20, "MB")
        for i, w in enumerate(rig.fleet.workers)
    ]
    ok = final == p.n and outcome.not_sent == 0 and codes == [0] * len(rig.fleet.workers)
    return Result(
        run_id,
        out,
        worker_settings(settings, rig.backend),
        host,
        final,
        outcome.not_sent,
        codes,
        ok,
    )


def worker_settings(settings: Settings, backend: str) -> dict[str, object]:
    """The settings the workers ran with, as recorded beside the figures."""
    return {
        "prefetch": settings.prefetch,
        "batch_size": settings.batch_size,
        "batch_wait_seconds": settings.batch_wait_seconds,
        "log_level": os.environ.get("NUDGE_LOG_LEVEL", "warning"),
        "delay_backend": backend,
    }


def figures(p: Params, m: Measured, o: store.Outcomes) -> list[Figure]:
    """The scenario's figures; rates are per second, lateness in ms."""
    sent_span = max(1e-3, o.last_sent - o.first_sent)
    due_span = max(1e-3, o.last_sent - o.first_due)
    return [
        Figure("publish, Producer (sync)", p.n / m.publish_s, "/s", 5000),
        Figure("  same, excluding validation", p.n / (m.publish_s - m.validate_s), "/s"),
        Figure("publish, AsyncProducer", p.async_n / m.async_publish_s, "/s", 5000),
        Figure("stored by the scheduler", p.n / max(1e-3, o.stored_last - o.stored_first), "/s"),
        Figure("delivered, first to last send", o.sent / sent_span, "/s", 2000),
        Figure("delivered, first due to last send", o.sent / due_span, "/s"),
        Figure("delivered, busiest second", o.peak_per_second, "/s"),
        Figure("lateness p50", o.lateness_p50, "ms"),
        Figure("lateness p99", o.lateness_p99, "ms", 100, "<="),
        Figure("lateness max", o.lateness_max, "ms"),
        Figure("worker CPU per message", m.worker_cpu_s * 1e6 / p.n, "µs"),
        *cpu_figures(m.cpu, m.peak_cores, p.n),
        # checks 1-8 (lock, facts in a constant number of statements, decisions), wall time
        Figure("  checks before sending, per message", m.check_s * 1e6 / max(1.0, m.checked), "µs"),
        Figure("machine CPU busy", m.busy * 100, "%"),
    ]


#: The processes whose CPU the scenario reports, in the order printed.
PROCESSES = ("scheduler", "dispatch", "worker", "rabbitmq", "postgres", "publisher")


def cpu_figures(cpu: dict[str, float], peaks: dict[str, float], n: int) -> list[Figure]:
    """CPU per delivered message of each process kind in ``cpu`` and of all together, and
    each kind's busiest second in ``peaks`` (100 % = one core, where a Python worker
    saturates)."""
    kinds = [k for k in PROCESSES if k in cpu]
    out = [Figure(f"CPU per message, {k}", cpu[k] * 1e6 / n, "µs") for k in kinds]
    out.append(Figure("CPU per message, all", sum(cpu[k] for k in kinds) * 1e6 / n, "µs"))
    out += [Figure(f"  busiest second, {k}", peaks.get(k, 0.0) * 100, "%") for k in kinds]
    return out
