"""Worker processes under benchmark: started before the load, sampled for RSS every 100 ms
while it runs, stopped with SIGTERM afterwards (a clean stop exits 0).

Workers inherit the benchmark's environment, so ``NUDGE_PREFETCH=2000 make bench`` tunes them;
``NUDGE_LOG_LEVEL`` defaults to ``warning`` so that the log channel's line per delivery does not
dominate what is measured. Their output goes to ``bench/results/worker-<i>.tmp``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pika
import pika.exceptions
import psutil  # type: ignore[import-untyped]  # no stubs in the lock file

from shared.topology import DUE_QUEUE, INTAKE_QUEUE

RSS_PERIOD = 0.1


@dataclass
class Worker:
    """One ``nudge worker`` process and the largest RSS seen for it."""

    process: subprocess.Popen[bytes]
    role: str  # "scheduler", "dispatch" or "worker" (both)
    log: IO[bytes]
    metrics_port: int
    peak_rss: int = 0
    exit_code: int | None = None

    def metric(self, name: str) -> float:
        """The sum of a Prometheus metric's samples on this worker (0 when absent)."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.split("{")[0].split(" ")[0] == name
        )


@dataclass
class Fleet:
    """``count`` worker processes running both roles with ``concurrency``, or with ``split``
    ``count`` scheduler processes and ``count`` dispatch processes."""

    count: int
    concurrency: int
    log_dir: Path
    split: bool = False
    workers: list[Worker] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)
    _sampler: threading.Thread | None = None

    def start(self, amqp_url: str, timeout: float = 60.0) -> None:
        """Spawn the workers and return once they consume both queues; raises RuntimeError
        when other consumers are there first, a worker exits, or ``timeout`` passes."""
        if any(others := _consumer_counts(amqp_url)):
            raise RuntimeError(
                f"nudge.intake / nudge.due already have consumers {others}: "
                "stop other workers, they would take part in the run"
            )
        env = {"NUDGE_LOG_LEVEL": "warning", **os.environ}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.log_dir.glob("worker-*.tmp"):
            stale.unlink()
        roles = [["scheduler"], ["dispatch"]] if self.split else [["scheduler", "dispatch"]]
        for i, role in enumerate(roles * self.count):
            log = (self.log_dir / f"worker-{i + 1}.tmp").open("wb")
            argv = ["worker", *role, "--concurrency", str(self.concurrency)]
            port = _free_port()
            # NUDGE_BENCH_PROFILE=DIR: each worker writes a cProfile of its run to DIR.
            profile = os.environ.get("NUDGE_BENCH_PROFILE")
            prefix = ["-m", "cProfile", "-o", f"{profile}/worker-{i + 1}-{role[0]}.prof"]
            process = subprocess.Popen(
                [sys.executable, *(prefix if profile else []), "-m", "workers", *argv],
                env={**env, "NUDGE_METRICS_PORT": str(port)},
                stdout=log,
                stderr=log,
            )
            self.workers.append(Worker(process, role[0] if self.split else "worker", log, port))
        self._sampler = threading.Thread(target=self._sample, name="rss", daemon=True)
        self._sampler.start()
        deadline = time.monotonic() + timeout
        while min(counts := _consumer_counts(amqp_url)) < self.count:
            if any(w.process.poll() is not None for w in self.workers):
                raise RuntimeError("a worker exited at start: see bench/results/worker-*.tmp")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not consuming after {timeout} s: {counts}")
            time.sleep(0.2)

    def _sample(self) -> None:
        handles = [psutil.Process(w.process.pid) for w in self.workers]
        while not self._done.wait(RSS_PERIOD):
            for worker, handle in zip(self.workers, handles, strict=True):
                with contextlib.suppress(psutil.Error):  # it exited
                    worker.peak_rss = max(worker.peak_rss, handle.memory_info().rss)

    def metric(self, name: str) -> float:
        """A Prometheus metric summed over the live workers."""
        total = 0.0
        for w in self.workers:
            with contextlib.suppress(httpx.HTTPError):
                total += w.metric(name)
        return total

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the live workers used so far."""
        return sum(self.cpu_by_role().values())

    def cpu_by_role(self) -> dict[str, float]:
        """CPU time (user + system) the live workers used so far, summed per role."""
        total: dict[str, float] = {}
        for w in self.workers:
            with contextlib.suppress(psutil.Error):
                cpu = sum(psutil.Process(w.process.pid).cpu_times()[:2])
                total[w.role] = total.get(w.role, 0.0) + cpu
        return total

    def stop(self, timeout: float = 60.0) -> list[int]:
        """SIGTERM every worker and return their exit codes; one still running after
        ``timeout`` seconds is killed (-9)."""
        for w in self.workers:
            if w.process.poll() is None:
                w.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            try:
                w.exit_code = w.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.exit_code = w.process.wait()
            w.log.close()
        self._done.set()
        if self._sampler is not None:
            self._sampler.join()
        return [w.process.returncode for w in self.workers]


class Servers:
    """The local RabbitMQ and Postgres servers' processes, found by the ports they listen on:
    RabbitMQ's Erlang VM, and Postgres' postmaster with its children (backends, WAL writer,
    checkpointer...). :meth:`cpu_seconds` counts the children that exited too, through the
    postmaster's reaped-children times."""

    def __init__(self, amqp_port: int, postgres_port: int) -> None:
        self.rabbitmq = _listening(amqp_port, "RabbitMQ")
        self.postgres = _listening(postgres_port, "Postgres")

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds so far of ``rabbitmq`` and ``postgres`` (all processes)."""
        times = self.postgres.cpu_times()
        postgres = times.user + times.system + times.children_user + times.children_system
        for child in self.postgres.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # it exited: counted once reaped
                postgres += sum(child.cpu_times()[:2])
        return {"rabbitmq": sum(self.rabbitmq.cpu_times()[:2]), "postgres": postgres}


class CpuPeaks:
    """Samples cumulative CPU seconds (``source()``: seconds by process kind) every
    ``period`` seconds on a thread and keeps each kind's busiest period, as cores used
    (1.0 = one core), until :meth:`stop`."""

    def __init__(self, source: Callable[[], dict[str, float]], period: float = 1.0) -> None:
        self._source = source
        self._period = period
        self.peaks: dict[str, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-peaks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last, at = self._source(), time.monotonic()
        while not self._done.wait(self._period):
            now, now_at = self._source(), time.monotonic()
            for kind, seconds in now.items():
                used = (seconds - last.get(kind, seconds)) / max(1e-3, now_at - at)
                self.peaks[kind] = max(self.peaks.get(kind, 0.0), used)
            last, at = now, now_at

    def stop(self) -> dict[str, float]:
        """Stop sampling; each kind's busiest period in cores."""
        self._done.set()
        self._thread.join()
        return dict(self.peaks)


def _listening(port: int, what: str) -> psutil.Process:
    """The process listening on TCP ``port`` of this machine."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    raise RuntimeError(f"no process listens on port {port} ({what}): is `make setup` done?")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _consumer_counts(amqp_url: str) -> list[int]:
    """Consumers of ``nudge.intake`` and ``nudge.due`` (passive declares)."""
    try:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            channel = connection.channel()
            return [
                channel.queue_declare(q, passive=True).method.consumer_count
                for q in (INTAKE_QUEUE, DUE_QUEUE)
            ]
        finally:
            if connection.is_open:
                connection.close()
    except pika.exceptions.AMQPError as exc:
        raise RuntimeError(f"cannot count consumers (is `make setup` done?): {exc!r}") from exc


def cpu_busy(since: Any) -> float:
    """Share of the machine's CPU time (all cores) that was busy since ``since``, a
    ``psutil.cpu_times()`` snapshot."""
    now = psutil.cpu_times()
    idle = (now.idle + now.iowait) - (since.idle + since.iowait)
    total = sum(now) - sum(since)
    return 1.0 - idle / total if total > 0 else 0.0
