"""The campaign benchmark: import N contacts from a generated CSV, send one campaign to all of
them through real dispatch workers, pause and resume it once while it sends, and report.

It runs in a database of its own (created, migrated, dropped afterwards) on the configured
Postgres, and on the configured RabbitMQ vhost, which must have no other consumers of the
campaign queues. Recipients go out through the webhook channel in batch mode (one signed POST
per chunk) to a receiver in a process of its own (:mod:`bench.sink`), which verifies the
signatures and counts the messages and their duplicates; ``--channel log`` leaves the network
out. Worker logs are at ``warning``.
"""

from __future__ import annotations

import csv
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import pika
import psutil  # type: ignore[import-untyped]  # no stubs in the lock file
import psycopg
from sqlalchemy import Engine, create_engine, text

from bench import report
from bench.report import Figure
from shared.topology import BATCHES_QUEUE, PLAN_QUEUE
from workers.config import Settings
from workers.store import templates
from workers.store.db import upgrade

DATABASE = "nudge_bench_campaign"


@dataclass(frozen=True)
class Params:
    contacts: int
    workers: int
    concurrency: int
    chunk_size: int
    batch_size: int
    pause_at: float
    channel: str = "webhook"


def _url(settings: Settings, database: str, *, driver: bool = True) -> str:
    parts = urllib.parse.urlsplit(settings.database_url)
    url = urllib.parse.urlunsplit(parts._replace(path=f"/{database}"))
    return url if driver else url.replace("postgresql+psycopg", "postgresql")


def _nudge(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "workers", *args], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"nudge {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _consumers(amqp_url: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        return sum(
            channel.queue_declare(q, passive=True).method.consumer_count
            for q in (BATCHES_QUEUE, PLAN_QUEUE)
        )
    finally:
        connection.close()


def _generate(path: Path, n: int) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["external_id", "email", "timezone", "tier"])
        tiers = ("free", "pro", "vip")
        out.writerows(
            (f"user-{i}", f"user{i}@example.com", "Europe/Paris", tiers[i % 3])
            for i in range(1, n + 1)
        )


class _Peak:
    """Samples the RSS of processes every 100 ms and keeps each one's peak; also the CPU time
    of the workers, of the Postgres backends serving the benchmark's database, and of
    RabbitMQ, to show where the time goes."""

    def __init__(self, pids: dict[str, int], amqp_port: int) -> None:
        self.peaks = dict.fromkeys(pids, 0)
        self.cpu = dict.fromkeys([*pids, "postgres", "rabbitmq"], 0.0)
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        #: pid -> (kind, process, CPU seconds when first seen, CPU seconds now)
        self._servers: dict[int, tuple[str, psutil.Process, float, float]] = {}
        self._amqp_port = amqp_port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _find_servers(self) -> None:
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["pid"] in self._servers:
                continue
            if proc.info["name"] == "postgres" and DATABASE in cmdline:
                self._servers[proc.info["pid"]] = ("postgres", proc, 0.0, 0.0)
            elif proc.info["name"] == "beam.smp":
                try:  # the local node is named in its environment (infra/local/servers.sh)
                    node = proc.environ().get("RABBITMQ_NODENAME", "")
                except psutil.Error:
                    continue
                if node.startswith(f"nudge-{self._amqp_port}@"):
                    times = proc.cpu_times()  # a long-running server: count from now on
                    base = times.user + times.system
                    self._servers[proc.info["pid"]] = ("rabbitmq", proc, base, base)

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(0.1):
            if tick % 20 == 0:
                self._find_servers()
            tick += 1
            for name, proc in self._procs.items():
                try:
                    self.peaks[name] = max(self.peaks[name], proc.memory_info().rss)
                    times = proc.cpu_times()
                    self.cpu[name] = times.user + times.system
                except psutil.Error:
                    continue
            for pid, (name, proc, base, _) in list(self._servers.items()):
                try:
                    times = proc.cpu_times()
                    self._servers[pid] = (name, proc, base, times.user + times.system)
                except psutil.Error:
                    continue
            for server in ("postgres", "rabbitmq"):
                self.cpu[server] = sum(
                    now - base for n, _, base, now in self._servers.values() if n == server
                )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _count(engine: Engine, sql: str, **params: object) -> float:
    with engine.connect() as conn:
        return float(conn.execute(text(sql), params).scalar_one() or 0)


def run(settings: Settings, p: Params) -> bool:
    """Run the scenario and print the report; False when the campaign did not complete."""
    if _consumers(settings.amqp_url):
        raise RuntimeError("nudge.batches / nudge.plan already have consumers: stop them")
    with psycopg.connect(_url(settings, "postgres", driver=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DATABASE}"')
    url = _url(settings, DATABASE)
    upgrade(url)
    engine = create_engine(url)
    env = {**os.environ, "NUDGE_DATABASE_URL": url, "NUDGE_LOG_LEVEL": "warning"}
    workdir = Path(tempfile.mkdtemp(prefix="nudge-bench-campaign-"))
    processes: list[subprocess.Popen[bytes]] = []
    sink: subprocess.Popen[str] | None = None
    sink_url = ""
    try:
        if p.channel == "webhook":
            secret = secrets.token_hex(16)
            sink = subprocess.Popen(
                [sys.executable, "-m", "bench.sink", "--secret", secret],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert sink.stdout is not None
            sink_url = f"http://127.0.0.1:{int(sink.stdout.readline())}"
            env |= {
                "NUDGE_WEBHOOK_URL": f"{sink_url}/hook",
                "NUDGE_WEBHOOK_SECRET": secret,
                "NUDGE_WEBHOOK_BATCH_SIZE": str(min(500, p.chunk_size)),
            }
        csv_path = workdir / "contacts.csv"
        started = time.perf_counter()
        _generate(csv_path, p.contacts)
        generated = time.perf_counter() - started
        print(f"generated {p.contacts} contacts in {generated:.1f} s", flush=True)
        started = time.perf_counter()
        print(_nudge(env, "contacts", "import", str(csv_path)), flush=True)
        imported = time.perf_counter() - started
        with engine.begin() as conn:
            templates.add(conn, "promo", "Hello {{ contact.id }}", "News", None)

        logs = (workdir / "workers.log").open("wb")
        roles = [["dispatch"]] * p.workers + [["planner"]]
        # NUDGE_BENCH_PROFILE=DIR: each worker writes a cProfile of its run to DIR.
        profile = os.environ.get("NUDGE_BENCH_PROFILE")
        for i, role in enumerate(roles):
            prefix = ["-m", "cProfile", "-o", f"{profile}/campaign-{i + 1}-{role[0]}.prof"]
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        *(prefix if profile else []),
                        "-m",
                        "workers",
                        "worker",
                        *role,
                        "--concurrency",
                        str(p.concurrency),
                    ],
                    env=env,
                    stderr=logs,
                )
            )
        deadline = time.monotonic() + 60
        while _consumers(settings.amqp_url) < len(roles):
            if time.monotonic() > deadline or any(w.poll() is not None for w in processes):
                raise RuntimeError(f"workers did not start: see {workdir / 'workers.log'}")
            time.sleep(0.2)
        names = [f"dispatch-{i + 1}" for i in range(p.workers)] + ["planner"]
        pids = {n: w.pid for n, w in zip(names, processes, strict=True)}
        if sink is not None:
            pids["receiver"] = sink.pid
        port = urllib.parse.urlsplit(settings.amqp_url).port or 5672
        peak = _Peak(pids, port)

        sizes = ["--batch-size", str(p.batch_size), "--chunk-size", str(p.chunk_size)]
        _nudge(
            env,
            "campaign",
            "create",
            "bench",
            "--template",
            "promo",
            "--channel",
            p.channel,
            "--all",
            *sizes,
        )
        t_start = time.time()
        print(_nudge(env, "campaign", "start", "bench"), flush=True)
        frozen = time.time() - t_start

        sent_sql = "SELECT count(*) FROM message_items WHERE status = 'sent'"
        pause: dict[str, float] = {}
        polls = 0
        while True:
            time.sleep(0.5)
            polls += 1
            state = _count(engine, "SELECT status FROM messages WHERE name = 'bench'")
            if polls % 10:  # counting is a scan of message_items: every 5 s, not to weigh
                if state == 3 or time.time() - t_start > 1800:
                    break
                continue
            sent = _count(engine, sent_sql)
            print(f"  {time.time() - t_start:6.1f} s  sent {int(sent)}", flush=True)
            if not pause and sent >= p.pause_at * p.contacts:
                # the real command, as an operator runs it: its start-up is part of the figure
                asked = time.time()
                _nudge(env, "campaign", "pause", "bench", "--reason", "benchmark")
                returned = time.time()
                time.sleep(3.0)  # let what was in flight land, then count it
                pause = {
                    "command_s": returned - asked,
                    "after_return": _count(
                        engine,
                        "SELECT count(*) FROM message_items WHERE sent_at > to_timestamp(:t)",
                        t=returned,
                    ),
                    "last_send_after_return_s": _count(
                        engine, "SELECT extract(epoch FROM max(sent_at)) FROM message_items"
                    )
                    - returned,
                }
                _nudge(env, "campaign", "resume", "bench")
                pause["paused_s"] = time.time() - asked
                print(f"  paused: {pause}", flush=True)
            if state == 3 or time.time() - t_start > 1800:
                break
        finished = _count(
            engine, "SELECT extract(epoch FROM finished_at) FROM messages WHERE name = 'bench'"
        )
        elapsed = finished - t_start  # wall time, the pause included (a figure of its own)
        peak.stop()
        rows = _count(engine, "SELECT count(*) FROM message_items")
        # summed over the partitions: a partitioned table's own relation is empty
        size = _count(
            engine,
            "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('message_items')",
        )
        heap = _count(
            engine, "SELECT sum(pg_relation_size(relid)) FROM pg_partition_tree('message_items')"
        )
        sent = _count(engine, sent_sql)
        received: dict[str, int] = {}
        if sink is not None:
            received = httpx.get(f"{sink_url}/stats", timeout=10).json()
    finally:
        children: list[subprocess.Popen[Any]] = [*processes, *([sink] if sink else [])]
        for child in children:
            child.terminate()
        for child in children:
            child.wait(timeout=60)
        engine.dispose()
        with psycopg.connect(_url(settings, "postgres", driver=False), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    mb = 1024 * 1024
    np = "no pause"  # the campaign completed before reaching --pause-at
    dispatch_peak = max(v for k, v in peak.peaks.items() if k.startswith("dispatch")) / mb
    figures = [
        Figure("import contacts (CLI, incl. start)", imported, "s", 60, "<="),
        Figure("start to completed", elapsed, "s", 120, "<="),
        Figure("  of which start command (freeze)", frozen, "s"),
        Figure(
            "recipients per second", sent / elapsed if elapsed > 0 else 0, "/s", p.contacts / 120
        ),
        Figure("dispatch worker peak RSS", dispatch_peak, "MB", 200, "<="),
        Figure("planner peak RSS", peak.peaks["planner"] / mb, "MB", 200, "<="),
        Figure("message_items per 1M rows (all)", size / rows * 1e6 / mb, "MB"),
        Figure("message_items per 1M rows (heap)", heap / rows * 1e6 / mb, "MB"),
        Figure("  of which paused (pause to resume)", _ms(pause, "paused_s", 1), "s", absent=np),
        Figure(
            "pause: `nudge campaign pause`, start to return",
            _ms(pause, "command_s"),
            "ms",
            500,
            "<=",
            absent=np,
        ),
        Figure(
            "sends after pause returned",
            pause.get("after_return"),
            "",
            p.workers * p.concurrency * p.chunk_size,
            "<=",
            absent=np,
        ),
        Figure(
            "last send after pause returned",
            _ms(pause, "last_send_after_return_s"),
            "ms",
            absent=np,
        ),
    ]
    if received:
        figures += [
            Figure("receiver: messages (unique)", received["unique"], "", p.contacts, ">="),
            Figure("receiver: duplicates", received["duplicates"], ""),
            Figure("receiver: requests", received["requests"], ""),
            Figure("receiver: bad signatures", received["bad_signatures"], "", 0, "<="),
        ]
    figures += [Figure(f"CPU {name}", cpu, "s") for name, cpu in peak.cpu.items()]
    print()
    print(
        "channel: webhook, batch requests to a receiver process (signatures verified)"
        if p.channel == "webhook"
        else "channel: log (outcomes recorded in message_items; no network call per recipient)"
    )
    print(report.table(figures))
    with create_engine(settings.database_url).connect() as conn:
        version = str(conn.exec_driver_sql("SHOW server_version").scalar_one())
    ok = sent == p.contacts and (not received or received["unique"] == p.contacts)
    path = report.write(
        "campaign",
        asdict(p),
        {"channel": p.channel, "log_level": "warning"},
        report.machine(settings.rabbitmq_mgmt_url, version),
        figures,
        {"sent": sent, "rows": rows},
        ok=ok,
    )
    print(
        f"\nwritten to {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
    )
    if not ok:
        print(f"RUN FAILED: {int(sent)} of {p.contacts} sent, receiver {received}", flush=True)
    return ok


def _ms(pause: dict[str, float], key: str, scale: float = 1000) -> float | None:
    """A pause timing in ms (``scale`` 1: in s), None when no pause happened."""
    return pause[key] * scale if key in pause else None
