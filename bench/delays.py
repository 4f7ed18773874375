"""Scenario ``delays``: N messages due evenly over ``spread`` seconds, published with confirms
by a service, delivered to the ``log`` channel by real worker processes.

Figures: publish rate (sync and async producers), delivered rate, lateness (``sent_at -
deliver_at`` in Postgres) p50 / p99 / max, and the workers' peak RSS. Targets for the 2-core
machine: publish >= 5,000 msg/s, delivered >= 2,000 msg/s, lateness p99 <= 100 ms.

Schedule: ``deliver_at = t0 + lead + i * spread / N`` with ``t0`` the start of the publish, so
a slow publish makes messages late instead of moving the schedule. The async producer's
phase runs first, and doubles as the workers' warm-up.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import click
import psutil  # type: ignore[import-untyped]  # no stubs in the lock file

from bench import report, store
from bench.fleet import Fleet, cpu_busy
from producer import AsyncProducer, Producer, Scheduled, scheduled
from shared.config import Settings
from workers.runner import resolve_backend
from workers.store.db import sync_engine

PUBLISH_TARGET = 5000.0
DELIVERED_TARGET = 2000.0
LATENESS_P99_TARGET_MS = 100.0


@dataclass(frozen=True)
class Params:
    """What to run: ``n`` messages due over ``spread`` s starting ``lead`` s after the
    publish starts, ``workers`` processes of ``concurrency`` batches per role."""

    n: int = 20_000
    spread: float = 10.0
    lead: float = 2.0
    workers: int = 1
    concurrency: int = 2
    async_n: int = 5_000


def _requests(
    prefix: str, n: int, start: datetime, spread: float, spent: list[float]
) -> Iterator[Scheduled]:
    """The run's requests, built lazily (as a service would) with their build time added to
    ``spent[0]``."""
    for i in range(n):
        began = time.perf_counter()
        request = scheduled(
            f"{prefix}{i}",
            "bench",
            "log",
            idempotency_key=f"{prefix}{i}",
            deliver_at=start + timedelta(seconds=i * spread / n),
        )
        spent[0] += time.perf_counter() - began
        yield request


def publish_sync(url: str, prefix: str, params: Params) -> tuple[float, float]:
    """Publish with :meth:`Producer.schedule_many`; returns (seconds in all, seconds of it
    spent validating requests)."""
    spent = [0.0]
    began = time.perf_counter()
    start = datetime.now(UTC) + timedelta(seconds=params.lead)
    with Producer(url, name="nudge-bench") as producer:
        producer.schedule_many(_requests(prefix, params.n, start, params.spread, spent))
    return time.perf_counter() - began, spent[0]


async def publish_async(url: str, prefix: str, n: int, lead: float) -> float:
    """Publish ``n`` requests due over 1 s with :meth:`AsyncProducer.schedule_many`; returns
    the seconds it took, validation included."""
    async with AsyncProducer(url, name="nudge-bench-async") as producer:
        began = time.perf_counter()
        start = datetime.now(UTC) + timedelta(seconds=lead)
        await producer.schedule_many(_requests(prefix, n, start, 1.0, [0.0]))
        return time.perf_counter() - began


def run(settings: Settings, params: Params) -> bool:
    """Run the scenario, print the table, write the JSON; False when the run itself failed
    (messages not final in time, a worker not exiting 0), whatever the figures."""
    run_id = uuid.uuid4().hex[:8]
    warmup, prefix = f"bench-{run_id}-a-", f"bench-{run_id}-s-"
    engine = sync_engine(settings.database_url)
    fleet = Fleet(params.workers, params.concurrency, report.RESULTS)
    backend = asyncio.run(resolve_backend(settings))
    click.echo(
        f"run {run_id}: {params.n} messages over {params.spread:g} s, {params.workers} "
        f"worker(s) x concurrency {params.concurrency}, backend {backend}"
    )
    try:
        fleet.start(settings.amqp_url)
        async_seconds = asyncio.run(
            publish_async(settings.amqp_url, warmup, params.async_n, params.lead)
        )
        store.wait_final(engine, warmup, params.async_n, time.monotonic() + 120)
        since = psutil.cpu_times()
        publish_seconds, validating = publish_sync(settings.amqp_url, prefix, params)
        click.echo(f"published in {publish_seconds:.2f} s; waiting for deliveries")
        final = store.wait_final(
            engine, prefix, params.n, time.monotonic() + params.lead + params.spread + 120
        )
        busy = cpu_busy(since)
        result = store.outcomes(engine, prefix)
        host = report.machine(settings.rabbitmq_mgmt_url, store.server_version(engine))
    finally:
        codes = fleet.stop()
        engine.dispose()

    n = params.n
    figures = [
        report.Figure("publish, Producer (sync)", n / publish_seconds, "/s", PUBLISH_TARGET),
        report.Figure("  of which publish+confirm only", n / (publish_seconds - validating), "/s"),
        report.Figure(
            "publish, AsyncProducer", params.async_n / async_seconds, "/s", PUBLISH_TARGET
        ),
        report.Figure(
            "stored by scheduler", n / max(1e-3, result.stored_last - result.stored_first), "/s"
        ),
        report.Figure(
            "delivered, first to last send",
            result.sent / max(1e-3, result.last_sent - result.first_sent),
            "/s",
            DELIVERED_TARGET,
        ),
        report.Figure(
            "delivered, first due to last send",
            result.sent / max(1e-3, result.last_sent - result.first_due),
            "/s",
        ),
        report.Figure("delivered, busiest second", result.peak_per_second, "/s"),
        report.Figure("lateness p50", result.lateness_p50, "ms"),
        report.Figure("lateness p99", result.lateness_p99, "ms", LATENESS_P99_TARGET_MS, "<="),
        report.Figure("lateness max", result.lateness_max, "ms"),
    ]
    figures += [
        report.Figure(f"peak RSS, worker {i + 1}", w.peak_rss / 2**20, "MB")
        for i, w in enumerate(fleet.workers)
    ]
    figures += [
        report.Figure(
            "worker CPU per message, all roles",
            sum(w.cpu_seconds for w in fleet.workers) * 1000 / (n + params.async_n),
            "ms",
        ),
        report.Figure("machine CPU busy, publish to final", busy * 100, "%"),
    ]
    worker_settings = {
        "prefetch": settings.prefetch,
        "batch_size": settings.batch_size,
        "batch_wait_seconds": settings.batch_wait_seconds,
        "log_level": os.environ.get("NUDGE_LOG_LEVEL", "warning"),
        "delay_backend": backend,
    }
    ok = final == n and result.not_sent == 0 and codes == [0] * params.workers
    click.echo(report.table(figures))
    click.echo(
        f"machine: {host['nproc']} x {host['cpu_model']}, RabbitMQ {host['rabbitmq']}, "
        f"Postgres {host['postgres']}; workers: {worker_settings}"
    )
    click.echo(
        f"final {final}/{n} (sent {result.sent}, other {result.not_sent}); "
        f"worker exit codes {codes}"
    )
    path = report.write(
        "delays",
        asdict(params),
        worker_settings,
        host,
        figures,
        {
            "run": run_id,
            "final": final,
            "sent": result.sent,
            "not_sent": result.not_sent,
            "worker_exit_codes": codes,
            "ok": ok,
        },
    )
    click.echo(f"wrote {path.relative_to(report.RESULTS.parent.parent)}")
    if not ok:
        click.echo("RUN FAILED: see bench/results/worker-*.tmp", err=True)
    return ok
