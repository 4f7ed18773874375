"""How a benchmark reports: the machine it ran on, a table of figures beside their targets,
and the same as JSON in ``bench/results/latest-<scenario>.json`` (no machine paths inside,
so the file can be committed)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx

RESULTS = Path(__file__).with_name("results")


@dataclass(frozen=True)
class Figure:
    """One measured figure; ``target`` is a floor (``>=``) or a ceiling (``<=``), if any."""

    name: str
    value: float
    unit: str
    target: float | None = None
    bound: Literal[">=", "<="] = ">="

    @property
    def ratio(self) -> float | None:
        return self.value / self.target if self.target else None

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.bound == ">=" else self.value <= self.target


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
        lines.append(f"{f.name:<34} {f.value:>9.1f} {f.unit:<2} {target:>14} {ratio:>7}  {ok}")
    return "\n".join(lines)


def write(
    scenario: str,
    params: dict[str, Any],
    env: dict[str, Any],
    host: dict[str, Any],
    figures: list[Figure],
    extra: dict[str, Any],
) -> Path:
    """Write ``latest-<scenario>.json`` and return its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"latest-{scenario}.json"
    doc = {
        "scenario": scenario,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "params": params,
        "worker_settings": env,
        "machine": host,
        "figures": [_as_json(f) for f in figures],
        **extra,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _as_json(f: Figure) -> dict[str, Any]:
    ratio = round(f.ratio, 3) if f.ratio is not None else None
    return {
        **asdict(f),
        "name": f.name.strip(),
        "value": round(f.value, 1),
        "ratio": ratio,
        "met": f.met,
    }


def _commit() -> str:
    """The checked-out commit (the tree may hold uncommitted changes on top)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=RESULTS.parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()
