"""Worker processes under benchmark: started before the load, watched for peak RSS while it
runs, stopped with SIGTERM afterwards (a clean stop exits 0).

Workers inherit the benchmark's environment, so ``NUDGE_PREFETCH=2000 make bench`` tunes them;
``NUDGE_LOG_LEVEL`` defaults to ``warning`` so that the log channel's one line per delivery
does not dominate what is measured.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pika
import psutil  # type: ignore[import-untyped]  # no stubs in the lock file

from shared.topology import DUE_QUEUE, INTAKE_QUEUE

#: How often RSS is sampled.
RSS_PERIOD = 0.1


@dataclass
class Worker:
    """One ``nudge worker scheduler dispatch`` process and the largest RSS seen for it."""

    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    peak_rss: int = 0
    cpu_seconds: float = 0.0
    exit_code: int | None = None


@dataclass
class Fleet:
    """``count`` worker processes with ``concurrency`` batches in flight per role each."""

    count: int
    concurrency: int
    log_dir: Path
    workers: list[Worker] = field(default_factory=list)
    _stop_sampling: threading.Event = field(default_factory=threading.Event)
    _sampler: threading.Thread | None = None

    def start(self, amqp_url: str, timeout: float = 60.0) -> None:
        """Spawn the workers and return once they consume both queues; raises RuntimeError
        when one exits or they are not consuming within ``timeout`` seconds."""
        env = {"NUDGE_LOG_LEVEL": "warning", **os.environ}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.count):
            path = self.log_dir / f"worker-{i + 1}.tmp"
            log_file = path.open("wb")
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "workers",
                    "worker",
                    "scheduler",
                    "dispatch",
                    "--concurrency",
                    str(self.concurrency),
                ],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            self.workers.append(Worker(process, path, log_file))
        self._sampler = threading.Thread(target=self._sample, name="rss", daemon=True)
        self._sampler.start()
        self._wait_consuming(amqp_url, time.monotonic() + timeout)

    def _wait_consuming(self, amqp_url: str, deadline: float) -> None:
        while True:
            for w in self.workers:
                if w.process.poll() is not None:
                    raise RuntimeError(
                        f"worker exited with {w.process.returncode} at start, see {w.log_path.name}"
                    )
            connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
            try:
                channel = connection.channel()
                counts = [
                    channel.queue_declare(q, passive=True).method.consumer_count
                    for q in (INTAKE_QUEUE, DUE_QUEUE)
                ]
            finally:
                connection.close()
            if min(counts) >= self.count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not consuming (consumers: {counts})")
            time.sleep(0.2)

    def _sample(self) -> None:
        handles = [psutil.Process(w.process.pid) for w in self.workers]
        while not self._stop_sampling.wait(RSS_PERIOD):
            for worker, handle in zip(self.workers, handles, strict=True):
                with contextlib.suppress(psutil.Error):  # it exited
                    worker.peak_rss = max(worker.peak_rss, handle.memory_info().rss)
                    worker.cpu_seconds = sum(handle.cpu_times()[:2])

    def stop(self, timeout: float = 60.0) -> list[int]:
        """SIGTERM every worker, wait, and return their exit codes (SIGKILL after
        ``timeout``, reported as -9)."""
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
            w.log_file.close()
        self._stop_sampling.set()
        if self._sampler is not None:
            self._sampler.join()
        return [w.exit_code for w in self.workers if w.exit_code is not None]


def cpu_busy(since: Any) -> float:
    """Share of the machine's CPU time (all cores) spent busy since ``since``, a
    :func:`psutil.cpu_times` snapshot."""
    now = psutil.cpu_times()
    idle = (now.idle + now.iowait) - (since.idle + since.iowait)
    total = sum(now) - sum(since)
    return 1.0 - idle / total if total > 0 else 0.0
