"""Scenario ``capacity``: the ``delays`` load stepped up through due rates (1,000 to 8,000
per second by default) against one set of workers, to find where lateness p99 crosses
100 ms and which process saturates first.

Each step publishes ``rate * spread`` messages with :class:`Producer`, due evenly over
``spread`` seconds from ``lead`` seconds after the publish starts, waits until every one is
final, and records the ``delays`` figures: rates, lateness, CPU per message of every process
and each process's busiest second. A process saturates when its busiest second reaches 90 %
of what it can use: one core for a worker role or the publisher (single-threaded Python), all
of the machine's cores for RabbitMQ and Postgres. One result file holds every step.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import click

from bench import delays, report, store
from bench.report import Figure
from workers.config import Settings

#: A process whose busiest second reaches this share of its ceiling is saturated.
SATURATED = 0.9
#: The lateness p99 a step must stay within, ms (the issue's target).
P99_MS = 100.0
#: The processes that cannot use more than one core.
SINGLE_CORE = ("scheduler", "dispatch", "worker", "publisher")


@dataclass(frozen=True)
class Params:
    """Due rates per second, stepped in order; the rest as for ``delays``."""

    rates: tuple[int, ...] = (1000, 2000, 3000, 4000, 5000, 6000, 8000)
    spread: float = 10.0
    lead: float = 2.0
    workers: int = 1
    concurrency: int = 2
    split: bool = True


@dataclass(frozen=True)
class Step:
    rate: int
    figures: list[Figure]
    ok: bool

    def value(self, name: str) -> float | None:
        for f in self.figures:
            if f.name.strip() == name:
                return f.value
        return None


def _ceiling(kind: str, cores: int) -> float:
    """Cores ``kind`` can use at most on a machine of ``cores``."""
    return 1.0 if kind in SINGLE_CORE else float(cores)


def saturation(step: Step, cores: int) -> dict[str, float]:
    """Each process's busiest second as a share of its ceiling."""
    out = {}
    for kind in delays.PROCESSES:
        busiest = step.value(f"busiest second, {kind}")
        if busiest is not None:
            out[kind] = busiest / 100 / _ceiling(kind, cores)
    return out


def summary(steps: list[Step], cores: int | None = None) -> tuple[list[Figure], list[str]]:
    """The figures and sentences of the whole run: the last rate within the p99 target,
    the first beyond it, and the first process to saturate (at which rate) on a machine of
    ``cores`` (this one's by default)."""
    cores = cores or os.cpu_count() or 1
    within = [s.rate for s in steps if (s.value("lateness p99") or 0) <= P99_MS and s.ok]
    beyond = [s.rate for s in steps if s.rate not in within]
    first_beyond = beyond[0] if beyond else None
    last_within = max((r for r in within if first_beyond is None or r < first_beyond), default=None)
    lines = []
    if first_beyond is None:
        lines.append(f"p99 stays within {P99_MS:g} ms at every step, up to {steps[-1].rate} /s")
    elif last_within is None:
        lines.append(f"p99 is over {P99_MS:g} ms from the first step, {first_beyond} /s")
    else:
        lines.append(
            f"p99 crosses {P99_MS:g} ms between {last_within} and {first_beyond} due per second"
        )
    saturated_at: int | None = None
    kind: str | None = None
    for s in steps:
        shares = saturation(s, cores)
        over = {k: v for k, v in shares.items() if v >= SATURATED}
        if over:
            kind = max(over, key=lambda k: over[k])
            saturated_at = s.rate
            busy = s.value("machine CPU busy") or 0.0
            lines.append(
                f"first to saturate: {kind}, at {s.rate} /s (busiest second "
                f"{shares[kind] * _ceiling(kind, cores) * 100:.0f} % of a core; machine busy "
                f"{busy:.0f} % over the step)"
            )
            break
    else:
        busiest = max(
            ((s.value("machine CPU busy") or 0.0, s.rate) for s in steps), default=(0.0, 0)
        )
        lines.append(
            f"no process reached {SATURATED:.0%} of its ceiling in any second"
            + (
                f"; the machine was {busiest[0]:.0f} % busy (at {busiest[1]} /s): the cores,"
                " shared with whatever else runs, were the limit"
                if busiest[0] >= SATURATED * 100
                else ""
            )
        )
    figures = [
        Figure("p99 within 100 ms up to", last_within, "/s", absent="no step"),
        Figure("p99 over 100 ms from", first_beyond, "/s", absent="no step"),
        Figure("first saturated at", saturated_at, "/s", absent="none saturated"),
    ]
    return figures, lines


#: The step table's columns: (heading, figure name).
COLUMNS = (
    ("stored /s", "stored by the scheduler"),
    ("delivered /s", "delivered, first to last send"),
    ("p50 ms", "lateness p50"),
    ("p99 ms", "lateness p99"),
    ("CPU/msg µs", "CPU per message, all"),
    ("sched %", "busiest second, scheduler"),
    ("disp %", "busiest second, dispatch"),
    ("rabbit %", "busiest second, rabbitmq"),
    ("pg %", "busiest second, postgres"),
    ("pub %", "busiest second, publisher"),
    ("busy %", "machine CPU busy"),
)


def step_table(steps: list[Step]) -> str:
    head = f"{'due /s':>7} " + " ".join(f"{h:>12}" for h, _ in COLUMNS)
    rows = [head, "-" * len(head)]
    for s in steps:
        cells = []
        for _, name in COLUMNS:
            v = s.value(name)
            cells.append(f"{v:>12.0f}" if v is not None else f"{'-':>12}")
        rows.append(f"{s.rate:>7} " + " ".join(cells) + ("" if s.ok else "  FAILED"))
    return "\n".join(rows)


def run(settings: Settings, p: Params) -> bool:
    """Step the rates, print each step and the summary, write one result file. False when a
    step itself failed (messages not final in time) or a worker did not exit 0."""
    run_id = uuid.uuid4().hex[:8]
    base = delays.Params(
        n=p.rates[0],
        spread=p.spread,
        lead=p.lead,
        workers=p.workers,
        concurrency=p.concurrency,
        async_n=2000,
        split=p.split,
    )
    rig = delays.prepare(settings, base)
    click.echo(
        f"run {run_id}: due rates {list(p.rates)} /s, {p.spread:g} s each, {rig.backend} backend"
    )
    steps: list[Step] = []
    try:
        rig.fleet.start(settings.amqp_url)
        delays.warm_up(rig, f"bench-{run_id}-a-", base)
        for rate in p.rates:
            sp = delays.Params(**{**asdict(base), "n": int(rate * p.spread)})
            # A step beyond capacity drains a backlog: a second more per 1,000 messages.
            grace = 120 + sp.n / 1000
            measured, outcome, final = delays.load(rig, f"bench-{run_id}-{rate}-", sp, 1.0, grace)
            figures = [
                f
                for f in delays.figures(sp, measured, outcome)
                if not f.name.startswith(("publish", "  same"))
            ]
            step = Step(rate, figures, final == sp.n and outcome.not_sent == 0)
            steps.append(step)
            click.echo(step_table([step]).splitlines()[-1] if steps[1:] else step_table([step]))
        host = report.machine(settings.rabbitmq_mgmt_url, store.server_version(rig.engine))
    finally:
        codes = rig.fleet.stop()
        rig.engine.dispose()
    figures, lines = summary(steps)
    click.echo("\n".join(lines))
    ok = bool(steps) and all(s.ok for s in steps) and codes == [0] * len(rig.fleet.workers)
    extra: dict[str, Any] = {
        "run": run_id,
        "worker_exit_codes": codes,
        "summary": lines,
        "steps": [
            {
                "due_per_second": s.rate,
                "ok": s.ok,
                "figures": [report.as_json(f) for f in s.figures],
            }
            for s in steps
        ],
    }
    path = report.write(
        "capacity",
        {**asdict(p), "rates": list(p.rates)},
        delays.worker_settings(settings, rig.backend),
        host,
        figures,
        extra,
        ok=ok,
    )
    click.echo(f"wrote bench/results/capacity/{path.name}")
    if not ok:
        click.echo("RUN FAILED: see bench/results/worker-*.tmp", err=True)
    return ok
