"""How a benchmark reports: the machine it ran on, a table of figures beside their targets,
and the same as JSON in a file of its own per run, ``bench/results/<scenario>/<UTC time>-
<commit>.json`` (no machine paths inside, so the file can be committed): the commit, whether
the tree had uncommitted changes, the machine's load before and during the run, the
parameters, the figures and whether the run itself succeeded. Every scenario records through
:func:`write`; ``python -m bench table`` turns the committed files into the tables of
docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx

RESULTS = Path(__file__).with_name("results")

#: The machine counts as loaded when its CPUs were at least this busy (all cores, over one
#: second) just before the run started: something else was running.
LOADED_BUSY = 0.25


@dataclass(frozen=True)
class Figure:
    """One measured figure; ``target`` is a floor (``>=``) or a ceiling (``<=``), if any."""

    name: str
    #: None when the run had nothing to measure (e.g. no pause happened): see ``absent``.
    value: float | None
    unit: str
    target: float | None = None
    bound: Literal[">=", "<="] = ">="
    #: What a missing value means, printed and recorded instead of a number.
    absent: str = "not measured"

    @property
    def ratio(self) -> float | None:
        return self.value / self.target if self.target and self.value is not None else None

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None:
            return None
        return self.value >= self.target if self.bound == ">=" else self.value <= self.target


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


class Load:
    """The machine's load: sampled for one second before the run, then every second during
    it (CPU busy over all cores from /proc/stat, and /proc/loadavg), until :meth:`summary`."""

    def __init__(self) -> None:
        b0, t0 = _cpu_times()
        time.sleep(1.0)
        b1, t1 = _cpu_times()
        self.busy_before = round((b1 - b0) / max(1, t1 - t0), 3)
        self.before: dict[str, Any] = {"loadavg": _loadavg(), "cpu_busy": self.busy_before}
        self._busy: list[float] = []
        self._loadavg_1m: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        last = _cpu_times()
        while not self._stop.wait(1.0):
            now = _cpu_times()
            self._busy.append((now[0] - last[0]) / max(1, now[1] - last[1]))
            self._loadavg_1m.append(_loadavg()[0])
            last = now

    def summary(self) -> dict[str, Any]:
        """Before and during (so far), and whether the machine was loaded before the run."""
        busy, avg = list(self._busy), list(self._loadavg_1m)
        during = {
            "samples": len(busy),
            "cpu_busy_mean": round(sum(busy) / len(busy), 3) if busy else None,
            "cpu_busy_max": round(max(busy), 3) if busy else None,
            "loadavg_1m_max": max(avg) if avg else None,
        }
        return {
            "before": self.before,
            "during": during,
            "loaded_machine": self.busy_before >= LOADED_BUSY,
        }


_load: Load | None = None
_written: dict[str, dict[str, Any]] = {}


def begin() -> None:
    """Start measuring the machine's load for this process's run (once; the first call wins,
    so a scenario that runs another inside it keeps the load from its own start)."""
    global _load
    if _load is None:
        _load = Load()


def last(scenario: str) -> dict[str, Any]:
    """The result this process last wrote for ``scenario``."""
    return _written[scenario]


def machine(rabbitmq_mgmt_url: str, postgres_version: str) -> dict[str, Any]:
    """CPU count and model, RabbitMQ and Postgres versions."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        overview = httpx.get(f"{rabbitmq_mgmt_url}/api/overview", timeout=5).json()
        rabbitmq = f"{overview['rabbitmq_version']} (Erlang {overview['erlang_version']})"
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        rabbitmq = f"unknown ({exc!r})"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "rabbitmq": rabbitmq,
        "postgres": postgres_version,
    }


def table(figures: list[Figure]) -> str:
    """The figures as a fixed-width table with targets and ratios."""
    lines = [f"{'figure':<34} {'value':>12} {'target':>14} {'ratio':>7}  ok", "-" * 75]
    for f in figures:
        target = f"{f.bound} {f.target:g} {f.unit}" if f.target is not None else ""
        ratio = f"{f.ratio:.2f}" if f.ratio is not None else ""
        ok = {True: "yes", False: "NO", None: ""}[f.met]
        value = f"{f.value:>9.1f} {f.unit:<2}" if f.value is not None else f"{f.absent:>12}"
        lines.append(f"{f.name:<34} {value} {target:>14} {ratio:>7}  {ok}")
    return "\n".join(lines)


def write(
    scenario: str,
    params: dict[str, Any],
    env: dict[str, Any],
    host: dict[str, Any],
    figures: list[Figure],
    extra: dict[str, Any],
    *,
    ok: bool = True,
    root: Path = RESULTS,
) -> Path:
    """Write this run's result to ``<root>/<scenario>/<UTC time>-<commit>.json``, a new file
    per run, and return its path. ``ok``: the run itself succeeded (not: met its targets)."""
    now = datetime.now(UTC)
    commit, dirty = _commit()
    path = root / scenario / f"{now:%Y%m%dT%H%M%SZ}-{commit}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "scenario": scenario,
        "at": now.isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "ok": ok,
        "load": _load.summary() if _load is not None else None,
        "params": params,
        "worker_settings": env,
        "machine": host,
        "figures": [as_json(f) for f in figures],
        **extra,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    _written[scenario] = doc
    return path


def as_json(f: Figure) -> dict[str, Any]:
    ratio = round(f.ratio, 3) if f.ratio is not None else None
    return {
        **asdict(f),
        "name": f.name.strip(),
        "value": round(f.value, 1) if f.value is not None else None,
        "ratio": ratio,
        "met": f.met,
    }


def _commit() -> tuple[str, bool | None]:
    """The checked-out commit, and whether tracked files outside ``bench/results`` hold
    uncommitted changes (None when git cannot tell)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=RESULTS.parent.parent
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None
    try:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    except (OSError, subprocess.CalledProcessError):
        return commit, None
    return commit, bool(changed)
