"""Scenario ``celery``: Nudge, Celery and dramatiq side by side, on the same RabbitMQ and
Postgres, one after the other.

1. **Delayed messages.** The same N messages due evenly over ``spread`` s from ``lead`` s
   after the publish starts. Nudge runs the ``delays`` scenario (which records its own
   result too); Celery publishes the same schedule as ETA tasks with
   publisher confirms to a quorum queue, so Celery 5.5+ routes them through its native delayed
   delivery, and a prefork worker writes one row to Postgres per task; dramatiq publishes it
   as delayed messages with confirms through its RabbitMQ broker, and its worker (one process
   per ``concurrency``) holds them in memory until due and writes one row per message.
2. **Long delays.** ``long_n`` messages due in ``hours``: the RSS of Nudge's worker (the
   messages wait in RabbitMQ's delay ladder) against Celery's worker with native delayed
   delivery (they wait in ``celery_delayed_*``) and without it (a classic queue: the worker
   takes every ETA task and holds it in memory until due), and dramatiq's worker holding every
   delayed message (its delay prefetch raised to ``long_n`` over its processes).

Each Celery and dramatiq run and the long Nudge run use a vhost of their own, deleted
afterwards with everything still waiting in it; Celery's and dramatiq's rows go to a database
of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import click
import dramatiq
import httpx
import pika.exceptions
import psutil  # type: ignore[import-untyped]  # no stubs in the lock file
import psycopg

from bench import delays, report
from bench.fleet import Fleet
from producer import Producer, scheduled
from shared import amqp, topology
from shared.topology import INTAKE_QUEUE
from workers.config import Settings

CELERY_DB = "nudge_bench_celery"
#: dramatiq's worker threads per process (its default).
DRAMATIQ_THREADS = 8
#: The largest prefetch AMQP can express (``basic.qos`` takes a 16-bit count).
MAX_PREFETCH = 65_535


@dataclass(frozen=True)
class Params:
    n: int = 20_000
    spread: float = 10.0
    lead: float = 2.0
    concurrency: int = 2
    long_n: int = 100_000
    hours: float = 3.0
    skip_delayed: bool = False
    skip_long: bool = False


@dataclass
class Side:
    """One system's figures in one scenario, by name."""

    figures: dict[str, float] = field(default_factory=dict)


class Broker:
    """Vhosts on the benchmark's RabbitMQ, through the management API."""

    def __init__(self, settings: Settings) -> None:
        parts = urllib.parse.urlsplit(settings.rabbitmq_mgmt_url)
        self._api = httpx.Client(
            base_url=f"{parts.scheme}://{parts.hostname}:{parts.port}/api",
            auth=(parts.username or "guest", parts.password or "guest"),
            timeout=30,
        )
        self._amqp = urllib.parse.urlsplit(settings.amqp_url)

    def vhost(self, name: str) -> str:
        """Create (empty) vhost ``name``; returns its AMQP URL."""
        self.delete(name)
        q = urllib.parse.quote(name, safe="")
        self._api.put(f"/vhosts/{q}").raise_for_status()
        user = self._amqp.username or "guest"
        self._api.put(
            f"/permissions/{q}/{user}", json={"configure": ".*", "write": ".*", "read": ".*"}
        ).raise_for_status()
        return urllib.parse.urlunsplit(self._amqp._replace(path="/" + q))

    def delete(self, name: str) -> None:
        self._api.delete(f"/vhosts/{urllib.parse.quote(name, safe='')}")

    def totals(self, vhost: str) -> tuple[int, int]:
        """Messages in every queue of ``vhost``: (ready, unacked, i.e. held by consumers).
        The management API refreshes these every 5 s."""
        r = self._api.get(f"/queues/{urllib.parse.quote(vhost, safe='')}")
        r.raise_for_status()
        queues = r.json()
        return (
            sum(q.get("messages_ready", 0) for q in queues),
            sum(q.get("messages_unacknowledged", 0) for q in queues),
        )

    def queue(self, vhost: str, name: str) -> dict[str, Any]:
        r = self._api.get(f"/queues/{urllib.parse.quote(vhost, safe='')}/{name}")
        return dict(r.json()) if r.status_code == 200 else {}


class Tree:
    """A process and its children, sampled for RSS (summed over the tree) every 100 ms."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs if p.is_running())
        return 0

    def cpu(self) -> float:
        """CPU seconds (user + system) the process and its live children used so far."""
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.process.pid)
            return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])
        return 0.0

    def _sample(self) -> None:
        while not self._done.wait(0.1):
            self.peak = max(self.peak, self.rss())

    def stop(self, timeout: float = 30) -> None:
        self._done.set()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _celery_dsn(settings: Settings) -> str:
    parts = urllib.parse.urlsplit(settings.database_url.replace("postgresql+psycopg", "postgresql"))
    with psycopg.connect(
        urllib.parse.urlunsplit(parts._replace(path="/postgres")), autocommit=True
    ) as conn:
        if not conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (CELERY_DB,)
        ).fetchone():
            conn.execute(f'CREATE DATABASE "{CELERY_DB}"')
    dsn = urllib.parse.urlunsplit(parts._replace(path=f"/{CELERY_DB}"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS celery_rows (key text PRIMARY KEY, "
            "due_at timestamptz NOT NULL, done_at timestamptz NOT NULL)"
        )
        conn.execute("TRUNCATE celery_rows")
    return dsn


def _celery_worker(broker: str, dsn: str, mode: str, concurrency: int, log: Any) -> Tree:
    env = {
        **os.environ,
        "BENCH_CELERY_BROKER": broker,
        "BENCH_CELERY_DSN": dsn,
        "BENCH_CELERY_MODE": mode,
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_app",
            "worker",
            "-P",
            "prefork",
            "-c",
            str(concurrency),
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        env=env,
        stdout=log,
        stderr=log,
    )
    return Tree(process)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _celery_publish(
    broker: str, mode: str, keys: list[str], dues: list[float]
) -> tuple[float, int]:
    """Publish ETA tasks with confirms from this process; returns the seconds it took and how
    many had to go without an ETA.

    With native delayed delivery, Celery 5.7 raises ``ValueError: countdown must be a positive
    number`` for an ETA less than a second ahead (kombu routes ``int(countdown)`` seconds): such
    a task is published without an ETA, as a user would have to, and runs at once, early.
    """
    from bench.celery_app import make_app

    app = make_app(broker, mode)
    task = app.tasks["bench.record"]
    without_eta = 0
    began = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for key, due in zip(keys, dues, strict=True):
            ahead = due - time.time()
            if mode == "native" and 0 < ahead < 1.05:
                without_eta += 1
                task.apply_async((key, due), producer=producer)
                continue
            task.apply_async((key, due), eta=datetime.fromtimestamp(due, UTC), producer=producer)
    took = time.perf_counter() - began
    app.close()
    return took, without_eta


def _rows(dsn: str, prefix: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM celery_rows WHERE key LIKE %s", (f"{prefix}%",)
        ).fetchone()
        return int(row[0]) if row else 0


def _lateness(dsn: str, prefix: str) -> tuple[float, float, float, float]:
    """The rows of ``prefix``: (first to last row in s, lateness p50, p99, max in ms)."""
    with psycopg.connect(dsn) as conn:
        r = conn.execute(
            "SELECT extract(epoch FROM max(done_at) - min(done_at)), "
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY late), "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY late), max(late) "
            "FROM (SELECT done_at, extract(epoch FROM done_at - due_at) * 1000 AS late "
            "FROM celery_rows WHERE key LIKE %s) t",
            (f"{prefix}%",),
        ).fetchone()
    assert r is not None
    span, p50, p99, late_max = (float(x) for x in r)
    return span, p50, p99, late_max


def _delayed_side(
    p: Params, publish_s: float, dsn: str, prefix: str, worker: Tree, cpu_s: float, early: int
) -> Side:
    span, p50, p99, late_max = _lateness(dsn, prefix)
    return Side(
        {
            "publish with confirms (/s)": p.n / publish_s,
            "delivered, first to last (/s)": p.n / max(span, 1e-3),
            "lateness p50 (ms)": p50,
            "lateness p99 (ms)": p99,
            "lateness max (ms)": late_max,
            "peak RSS, worker (MB)": worker.peak / 2**20,
            "worker CPU per message (µs)": cpu_s * 1e6 / p.n,
            "published without ETA (< 1 s ahead)": early,
        }
    )


def celery_delayed(settings: Settings, broker_api: Broker, p: Params, log: Any) -> Side:
    """Celery, native delayed delivery: the delayed scenario's schedule, one row per task."""
    dsn = _celery_dsn(settings)
    url = broker_api.vhost("bench-celery-delayed")
    worker = _celery_worker(url, dsn, "native", p.concurrency, log)
    try:
        _wait(
            lambda: broker_api.queue("bench-celery-delayed", "bench-celery").get("consumers"),
            60,
            "the Celery worker to consume",
        )
        prefix = f"c{uuid.uuid4().hex[:6]}-"
        start = time.time() + p.lead
        keys = [f"{prefix}{i}" for i in range(p.n)]
        dues = [start + i * p.spread / p.n for i in range(p.n)]
        cpu0 = worker.cpu()
        publish_s, without_eta = _celery_publish(url, "native", keys, dues)
        _wait(lambda: _rows(dsn, prefix) >= p.n, p.lead + p.spread + 300, "Celery's rows")
        cpu_s = worker.cpu() - cpu0
    finally:
        worker.stop()
        broker_api.delete("bench-celery-delayed")
    return _delayed_side(p, publish_s, dsn, prefix, worker, cpu_s, without_eta)


def _dramatiq_worker(
    broker: str, dsn: str, processes: int, log: Any, delay_prefetch: int | None = None
) -> Tree:
    """``dramatiq bench.dramatiq_app`` with ``processes`` worker processes of
    :data:`DRAMATIQ_THREADS` threads; ``delay_prefetch``: messages each process takes from the
    delay queue and holds (dramatiq's default: 1,000 per thread)."""
    env = {**os.environ, "BENCH_DRAMATIQ_BROKER": broker, "BENCH_DRAMATIQ_DSN": dsn}
    if delay_prefetch is not None:
        env["dramatiq_delay_queue_prefetch"] = str(delay_prefetch)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dramatiq",
            "bench.dramatiq_app",
            "--processes",
            str(processes),
            "--threads",
            str(DRAMATIQ_THREADS),
        ],
        env=env,
        stdout=log,
        stderr=log,
    )
    return Tree(process)


def _dramatiq_consuming(broker_api: Broker, vhost: str, processes: int) -> None:
    from bench.dramatiq_app import QUEUE

    _wait(
        lambda: all(
            broker_api.queue(vhost, q).get("consumers", 0) >= processes
            for q in (QUEUE, f"{QUEUE}.DQ")
        ),
        60,
        "the dramatiq worker to consume",
    )


def _dramatiq_publish(url: str, keys: list[str], dues: list[float]) -> float:
    """Send delayed messages with confirms from this process (the delay in ms from now to the
    due time); returns the seconds it took."""
    from bench.dramatiq_app import make_actor

    actor = make_actor(url)
    began = time.perf_counter()
    for key, due in zip(keys, dues, strict=True):
        actor.send_with_options(args=(key, due), delay=round((due - time.time()) * 1000))
    took = time.perf_counter() - began
    actor.broker.close()
    return took


def dramatiq_delayed(settings: Settings, broker_api: Broker, p: Params, log: Any) -> Side:
    """dramatiq: the delayed scenario's schedule, one row per message."""
    vhost = "bench-dramatiq-delayed"
    dsn = _celery_dsn(settings)
    url = broker_api.vhost(vhost)
    worker = _dramatiq_worker(url, dsn, p.concurrency, log)
    try:
        _dramatiq_consuming(broker_api, vhost, p.concurrency)
        prefix = f"d{uuid.uuid4().hex[:6]}-"
        start = time.time() + p.lead
        keys = [f"{prefix}{i}" for i in range(p.n)]
        dues = [start + i * p.spread / p.n for i in range(p.n)]
        cpu0 = worker.cpu()
        publish_s = _dramatiq_publish(url, keys, dues)
        _wait(lambda: _rows(dsn, prefix) >= p.n, p.lead + p.spread + 300, "dramatiq's rows")
        cpu_s = worker.cpu() - cpu0
    finally:
        worker.stop()
        broker_api.delete(vhost)
    return _delayed_side(p, publish_s, dsn, prefix, worker, cpu_s, 0)


def nudge_delayed(settings: Settings, p: Params) -> Side:
    """Nudge: the ``delays`` scenario with the same schedule, figures as it recorded them; the
    same run as ``python -m bench delays --together`` (one process with both roles, its
    warm-up of ``async_n`` messages included)."""
    ok = delays.run(
        settings,
        delays.Params(
            n=p.n,
            spread=p.spread,
            lead=p.lead,
            workers=1,
            concurrency=p.concurrency,
            async_n=min(delays.Params.async_n, p.n),
            split=False,
        ),
    )
    if not ok:
        raise RuntimeError("the delays run failed (see its output above)")
    doc = report.last("delays")
    got = {f["name"]: f["value"] for f in doc["figures"]}
    rss = sum(v for k, v in got.items() if k.startswith("peak RSS"))
    return Side(
        {
            "publish with confirms (/s)": got["publish, Producer (sync)"],
            "delivered, first to last (/s)": got["delivered, first to last send"],
            "lateness p50 (ms)": got["lateness p50"],
            "lateness p99 (ms)": got["lateness p99"],
            "lateness max (ms)": got["lateness max"],
            "peak RSS, worker (MB)": rss,
            "worker CPU per message (µs)": got["worker CPU per message"],
            "published without ETA (< 1 s ahead)": 0,
        }
    )


def nudge_long(settings: Settings, broker_api: Broker, p: Params) -> Side:
    """Nudge's worker RSS once ``long_n`` messages due in ``hours`` wait in the ladder."""
    vhost = "bench-nudge-long"
    url = broker_api.vhost(vhost)

    async def declare() -> None:
        connection = await amqp.connect(url)
        try:
            await amqp.declare(connection, topology.build("tiers"))
        finally:
            await connection.close()

    asyncio.run(declare())
    saved = os.environ.get("NUDGE_AMQP_URL")
    os.environ["NUDGE_AMQP_URL"] = url
    os.environ["NUDGE_DELAY_BACKEND"] = "tiers"
    fleet = Fleet(1, p.concurrency, report.RESULTS)
    prefix = f"bench-long-{uuid.uuid4().hex[:6]}-"
    try:
        fleet.start(url)
        idle = fleet.workers[0].peak_rss
        due = datetime.now(UTC) + timedelta(hours=p.hours)
        began = time.perf_counter()
        with Producer(url, name="nudge-bench-long") as producer:
            producer.schedule_many(
                scheduled(
                    f"{prefix}{i % 1000}",
                    "bench",
                    "log",
                    idempotency_key=f"{prefix}{i}",
                    deliver_at=due + timedelta(seconds=i % 3600),
                )
                for i in range(p.long_n)
            )
        publish_s = time.perf_counter() - began
        _wait(
            lambda: not broker_api.queue(vhost, INTAKE_QUEUE).get("messages", 1),
            600,
            "the scheduler to store every message",
        )
        time.sleep(6)  # a few RSS samples once idle again, and fresh management statistics
        rss = psutil.Process(fleet.workers[0].process.pid).memory_info().rss
        waiting, held = broker_api.totals(vhost)
    finally:
        fleet.stop()
        broker_api.delete(vhost)
        if saved is not None:
            os.environ["NUDGE_AMQP_URL"] = saved
        _forget(settings, prefix)
    return Side(
        {
            "publish with confirms (/s)": p.long_n / publish_s,
            "RSS with all pending (MB)": rss / 2**20,
            "peak RSS (MB)": fleet.workers[0].peak_rss / 2**20,
            "RSS idle before (MB)": idle / 2**20,
            "waiting in RabbitMQ": waiting,
            "held by the worker (unacked)": held,
        }
    )


def _forget(settings: Settings, prefix: str) -> None:
    """Delete the long run's messages: they will never be due here."""
    dsn = settings.database_url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM messages WHERE idempotency_key LIKE %s", (f"{prefix}%",))
        conn.execute("DELETE FROM message_keys WHERE key LIKE %s", (f"{prefix}%",))


def celery_long(settings: Settings, broker_api: Broker, p: Params, mode: str, log: Any) -> Side:
    """Celery's worker RSS with ``long_n`` ETA tasks due in ``hours``, in ``mode``."""
    vhost = f"bench-celery-long-{mode}"
    url = broker_api.vhost(vhost)
    dsn = _celery_dsn(settings)
    worker = _celery_worker(url, dsn, mode, p.concurrency, log)
    try:
        _wait(
            lambda: broker_api.queue(vhost, "bench-celery").get("consumers"),
            60,
            "the Celery worker to consume",
        )
        time.sleep(2)
        idle = worker.rss()
        due = time.time() + p.hours * 3600
        keys = [f"long-{i}" for i in range(p.long_n)]
        publish_s, _ = _celery_publish(url, mode, keys, [due + i % 3600 for i in range(p.long_n)])
        if mode == "eta":  # wait until the worker holds them all
            _wait(
                lambda: broker_api.queue(vhost, "bench-celery").get("messages_ready", 1) == 0,
                600,
                "the worker to take every ETA task",
            )
        time.sleep(6)
        rss = worker.rss()
        waiting, held = broker_api.totals(vhost)
    finally:
        worker.stop(timeout=60)
        broker_api.delete(vhost)
    return Side(
        {
            "publish with confirms (/s)": p.long_n / publish_s,
            "RSS with all pending (MB)": rss / 2**20,
            "peak RSS (MB)": worker.peak / 2**20,
            "RSS idle before (MB)": idle / 2**20,
            "waiting in RabbitMQ": waiting,
            "held by the worker (unacked)": held,
        }
    )


def dramatiq_long(settings: Settings, broker_api: Broker, p: Params, log: Any) -> Side:
    """dramatiq's worker RSS holding ``long_n`` delayed messages due in ``hours``: its delay
    prefetch raised so that its processes take them all (up to :data:`MAX_PREFETCH` each)."""
    vhost = "bench-dramatiq-long"
    url = broker_api.vhost(vhost)
    dsn = _celery_dsn(settings)
    prefetch = min(MAX_PREFETCH, -(-p.long_n // p.concurrency))
    worker = _dramatiq_worker(url, dsn, p.concurrency, log, delay_prefetch=prefetch)
    try:
        _dramatiq_consuming(broker_api, vhost, p.concurrency)
        time.sleep(2)
        idle = worker.rss()
        due = time.time() + p.hours * 3600
        keys = [f"long-{i}" for i in range(p.long_n)]
        publish_s = _dramatiq_publish(url, keys, [due + i % 3600 for i in range(p.long_n)])
        held_all = min(p.long_n, prefetch * p.concurrency)
        _wait(
            lambda: broker_api.totals(vhost)[1] >= held_all,
            600,
            "the worker to take the delayed messages",
        )
        time.sleep(6)
        rss = worker.rss()
        waiting, held = broker_api.totals(vhost)
    finally:
        worker.stop(timeout=60)
        broker_api.delete(vhost)
    return Side(
        {
            "publish with confirms (/s)": p.long_n / publish_s,
            "RSS with all pending (MB)": rss / 2**20,
            "peak RSS (MB)": worker.peak / 2**20,
            "RSS idle before (MB)": idle / 2**20,
            "waiting in RabbitMQ": waiting,
            "held by the worker (unacked)": held,
        }
    )


def _side_by_side(title: str, columns: dict[str, Side]) -> tuple[str, list[dict[str, Any]]]:
    names = list(dict.fromkeys(name for side in columns.values() for name in side.figures))
    base = next(iter(columns))
    head = (
        f"{title:<34}"
        + "".join(f"{c:>16}" for c in columns)
        + "".join(f"{'/ ' + base:>16}" for c in list(columns)[1:])
    )
    lines, rows = [head, "-" * len(head)], []
    for name in names:
        values = {c: s.figures.get(name, float("nan")) for c, s in columns.items()}
        ratios = {
            c: values[c] / values[base] if values[base] else float("nan") for c in list(columns)[1:]
        }
        lines.append(
            f"{name:<34}"
            + "".join(f"{v:>16.1f}" for v in values.values())
            + "".join((f"{r:>15.2f}x" if r == r else f"{'n/a':>16}") for r in ratios.values())
        )
        rows.append(
            {
                "figure": name,
                **{c: round(v, 1) for c, v in values.items()},
                **{f"{c} / {base}": round(r, 3) if r == r else None for c, r in ratios.items()},
            }
        )
    return "\n".join(lines), rows


def run(settings: Settings, p: Params) -> bool:
    """Run both scenarios, print them side by side, record the result: the figures of every
    half that succeeded, and the failures. False, and the run recorded as failed, when a half
    of either comparison failed: each failure is printed."""
    broker_api = Broker(settings)
    report.RESULTS.mkdir(exist_ok=True)
    out: dict[str, Any] = {}
    failures: dict[str, str] = {}

    def half(name: str, measure: Any) -> Side | None:
        try:
            side: Side = measure()
        except (
            RuntimeError,
            OSError,
            psycopg.Error,
            httpx.HTTPError,
            pika.exceptions.AMQPError,
            dramatiq.DramatiqError,
        ) as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"
            click.echo(f"FAILED: {name}: {failures[name]}", err=True)
            return None
        return side

    def compare(section: str, title: str, sides: dict[str, Side | None]) -> None:
        done = {name: side for name, side in sides.items() if side is not None}
        if done:
            text, out[section] = _side_by_side(title, done)
            click.echo(text + "\n")

    with (report.RESULTS / "celery-worker.tmp").open("wb") as log:
        if not p.skip_delayed:
            compare(
                "delayed",
                f"delayed: {p.n} over {p.spread:g} s",
                {
                    "nudge": half("delayed, nudge", lambda: nudge_delayed(settings, p)),
                    "celery native": half(
                        "delayed, celery native",
                        lambda: celery_delayed(settings, broker_api, p, log),
                    ),
                    "dramatiq": half(
                        "delayed, dramatiq",
                        lambda: dramatiq_delayed(settings, broker_api, p, log),
                    ),
                },
            )
        if not p.skip_long:
            compare(
                "long",
                f"long: {p.long_n} due in {p.hours:g} h",
                {
                    "nudge": half("long, nudge", lambda: nudge_long(settings, broker_api, p)),
                    "celery native": half(
                        "long, celery native",
                        lambda: celery_long(settings, broker_api, p, "native", log),
                    ),
                    "celery eta": half(
                        "long, celery eta",
                        lambda: celery_long(settings, broker_api, p, "eta", log),
                    ),
                    "dramatiq": half(
                        "long, dramatiq",
                        lambda: dramatiq_long(settings, broker_api, p, log),
                    ),
                },
            )
    with psycopg.connect(settings.database_url.replace("postgresql+psycopg", "postgresql")) as c:
        version = str(c.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    host = report.machine(settings.rabbitmq_mgmt_url, version)
    import celery

    path = report.write(
        "celery",
        asdict(p),
        {
            "celery": celery.__version__,
            "pool": "prefork",
            "dramatiq": dramatiq.__version__,
            "dramatiq_processes": p.concurrency,
            "dramatiq_threads": DRAMATIQ_THREADS,
            "dramatiq_delay_prefetch_long": min(MAX_PREFETCH, -(-p.long_n // p.concurrency)),
        },
        host,
        [],
        {"side_by_side": out, "failures": failures},
        ok=not failures,
    )
    click.echo(f"wrote bench/results/celery/{path.name}")
    if failures:
        click.echo(f"RUN FAILED: {', '.join(failures)}", err=True)
    return not failures
