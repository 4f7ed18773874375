"""``python -m bench [SCENARIO] [OPTIONS]``: one subcommand per scenario, each in its own module;
``delays`` runs when none is named, so ``python -m bench --n 2000`` works. ``make bench`` runs
it after ``make setup``. Exit code 1 when a run failed (not when a target was missed).
``python -m bench table`` regenerates the tables of docs/benchmarks.md and docs/scaling.md from
the committed results."""

from __future__ import annotations

import sys

import click

from bench import (
    backends,
    campaign,
    capacity,
    celery_compare,
    delays,
    prune,
    publish,
    report,
    table,
)
from shared.errors import NudgeError
from workers.config import Settings

DEFAULT_SCENARIO = "delays"


class _Scenarios(click.Group):
    """A group that runs :data:`DEFAULT_SCENARIO` when no scenario is named."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = [DEFAULT_SCENARIO, *args]
        return super().parse_args(ctx, args)


@click.group(cls=_Scenarios, context_settings={"show_default": True})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Nudge benchmarks against the local servers (see docs/benchmarks.md)."""
    if ctx.invoked_subcommand != "table":
        report.begin()  # the machine's load before the run (1 s), then sampled during it


@main.command("table")
@click.option("--check", is_flag=True, help="Exit 1 if the docs differ from the results.")
def table_command(check: bool) -> None:
    """Regenerate the tables in docs/benchmarks.md and docs/scaling.md from
    bench/results/**/*.json."""
    if check:
        if stale := table.stale():
            raise click.ClickException(f"{', '.join(stale)} stale: run `python -m bench table`")
        return
    for doc, rendered in table.generated().items():
        changed = table.update(doc, rendered=rendered)
        click.echo(f"docs/{doc.name} " + ("updated" if changed else "already up to date"))


@main.command("delays")
@click.option("--n", default=20_000, type=click.IntRange(1), help="Messages to schedule.")
@click.option(
    "--spread", default=10.0, type=click.FloatRange(0.1), help="Seconds they fall due over."
)
@click.option(
    "--lead", default=2.0, type=click.FloatRange(0), help="Publish start to first due, s."
)
@click.option("--workers", default=1, type=click.IntRange(1, 8), help="Worker processes.")
@click.option("--concurrency", default=2, type=click.IntRange(1, 64), help="Batches per role.")
@click.option("--async-n", default=5_000, type=click.IntRange(1), help="AsyncProducer messages.")
@click.option(
    "--split/--together",
    default=True,
    show_default=True,
    help="Scheduler and dispatch in separate processes (a Deployment per role), or both roles "
    "in each process.",
)
def delays_command(
    n: int, spread: float, lead: float, workers: int, concurrency: int, async_n: int, split: bool
) -> None:
    """N messages due evenly over SPREAD seconds: publish and delivered rates, lateness, RSS."""
    try:
        ok = delays.run(
            Settings.load(), delays.Params(n, spread, lead, workers, concurrency, async_n, split)
        )
    except (NudgeError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(0 if ok else 1)


@main.command("capacity")
@click.option(
    "--rates",
    default="1000,2000,3000,4000,5000,6000,8000",
    help="Due rates per second, stepped in this order (comma-separated).",
)
@click.option("--spread", default=10.0, type=click.FloatRange(0.1), help="Seconds per step.")
@click.option("--lead", default=2.0, type=click.FloatRange(0), help="Publish start to first due.")
@click.option("--concurrency", default=2, type=click.IntRange(1, 64), help="Batches per role.")
@click.option("--split/--together", default=True, help="Roles in separate processes, or one.")
def capacity_command(rates: str, spread: float, lead: float, concurrency: int, split: bool) -> None:
    """Step the due rate up (the delays load at each rate) and print where lateness p99
    crosses 100 ms and which process saturates first."""
    try:
        steps = tuple(int(r) for r in rates.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{rates!r}: give positive integers separated by commas, e.g. 1000,2000",
            param_hint="--rates",
        ) from None
    if not steps or min(steps) < 1:
        raise click.BadParameter(f"{rates!r}: every rate must be at least 1", param_hint="--rates")
    try:
        ok = capacity.run(
            Settings.load(),
            capacity.Params(steps, spread, lead, concurrency=concurrency, split=split),
        )
    except (NudgeError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(0 if ok else 1)


@main.command("prune")
@click.option("--rows", default=10_000_000, type=click.IntRange(1000), help="Rows in the month.")
@click.option(
    "--delete-rows",
    default=1_000_000,
    type=click.IntRange(1000),
    help="Rows deleted for comparison (extrapolated to ROWS).",
)
def prune_command(rows: int, delete_rows: int) -> None:
    """Drop a month of ROWS message_items rows with the prune; DELETE DELETE_ROWS rows."""
    try:
        ok = prune.run(Settings.load(), prune.Params(rows, delete_rows))
    except (NudgeError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(0 if ok else 1)


@main.command("publish")
@click.option("--n", default=20_000, type=click.IntRange(1), help="Messages per publish.")
@click.option("--rounds", default=3, type=click.IntRange(1), help="Rounds; medians reported.")
def publish_command(n: int, rounds: int) -> None:
    """Producer and AsyncProducer publishing with confirms into the intake queue, no workers."""
    try:
        ok = publish.run(Settings.load(), publish.Params(n, rounds))
    except (NudgeError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(0 if ok else 1)


@main.command("campaign")
@click.option("--contacts", default=1_000_000, type=click.IntRange(1), help="Audience size.")
@click.option("--workers", default=2, type=click.IntRange(1, 8), help="Dispatch processes.")
@click.option("--concurrency", default=2, type=click.IntRange(1, 64), help="Batches per worker.")
@click.option("--chunk-size", default=250, type=click.IntRange(1, 5000))
@click.option("--batch-size", default=500, type=click.IntRange(1, 5000))
@click.option("--pause-at", default=0.3, type=click.FloatRange(0, 1), help="Pause once, here.")
@click.option(
    "--channel",
    default="webhook",
    type=click.Choice(["webhook", "log"]),
    help="webhook: batch requests to a local receiver process; log: no network call.",
)
def campaign_command(
    contacts: int,
    workers: int,
    concurrency: int,
    chunk_size: int,
    batch_size: int,
    pause_at: float,
    channel: str,
) -> None:
    """Import CONTACTS, send them a campaign through a batch webhook to a local receiver,
    pause and resume it once."""
    try:
        ok = campaign.run(
            Settings.load(),
            campaign.Params(
                contacts, workers, concurrency, chunk_size, batch_size, pause_at, channel
            ),
        )
    except (NudgeError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(0 if ok else 1)


@main.command("celery")
@click.option("--n", default=20_000, type=click.IntRange(1), help="Delayed messages.")
@click.option("--spread", default=10.0, type=click.FloatRange(0.1), help="Seconds due over.")
@click.option("--lead", default=2.0, type=click.FloatRange(0), help="Publish start to first due.")
@click.option("--concurrency", default=2, type=click.IntRange(1, 64), help="Per worker.")
@click.option("--long-n", default=100_000, type=click.IntRange(1), help="Long-delay messages.")
@click.option("--hours", default=3.0, type=click.FloatRange(0.1), help="Long delay, hours.")
@click.option("--skip-delayed", is_flag=True, help="Only the long-delay comparison.")
@click.option("--skip-long", is_flag=True, help="Only the delayed-messages comparison.")
def celery_command(**options: object) -> None:
    """Nudge and Celery side by side: delayed messages, and memory with long delays pending."""
    try:
        ok = celery_compare.run(Settings.load(), celery_compare.Params(**options))  # type: ignore[arg-type]
    except (NudgeError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(0 if ok else 1)


@main.command("backends")
@click.option("--n", default=20_000, type=click.IntRange(1), help="Delayed messages.")
@click.option("--spread", default=10.0, type=click.FloatRange(0.1), help="Seconds due over.")
@click.option("--pending", default=100_000, type=click.IntRange(1), help="Long-delay requests.")
@click.option("--hours", default=3.0, type=click.FloatRange(0.1), help="Long delay, hours.")
@click.option("--concurrency", default=2, type=click.IntRange(1, 64), help="Per worker.")
def backends_command(n: int, spread: float, pending: int, hours: float, concurrency: int) -> None:
    """tiers and plugin side by side: delivery, broker CPU, memory and disk with PENDING
    requests waiting, a broker restart with them."""
    try:
        ok = backends.run(Settings.load(), backends.Params(n, spread, pending, hours, concurrency))
    except (NudgeError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
