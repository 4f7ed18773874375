"""``python -m bench [SCENARIO] [OPTIONS]``: one subcommand per scenario, ``delays`` when none
is named (so ``python -m bench --n 2000`` works). ``make bench`` runs it after ``make setup``."""

from __future__ import annotations

import sys

import click

from bench import delays
from shared.config import Settings

DEFAULT_SCENARIO = "delays"


class _Scenarios(click.Group):
    """A group that runs :data:`DEFAULT_SCENARIO` when no scenario is named."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = [DEFAULT_SCENARIO, *args]
        return super().parse_args(ctx, args)


@click.group(cls=_Scenarios)
def main() -> None:
    """Nudge benchmarks, against the local servers (see docs/benchmarks.md)."""


@main.command("delays")
@click.option(
    "--n", default=20_000, show_default=True, type=click.IntRange(1), help="Messages to schedule."
)
@click.option(
    "--spread",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds over which they fall due, evenly.",
)
@click.option(
    "--lead",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds from the start of the publish to the first due time.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 8),
    help="Worker processes (scheduler + dispatch each).",
)
@click.option(
    "--concurrency",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Batches in flight per role and process.",
)
@click.option(
    "--async-n",
    default=5_000,
    show_default=True,
    type=click.IntRange(1),
    help="Messages for the AsyncProducer phase (also the warm-up).",
)
def delays_command(
    n: int, spread: float, lead: float, workers: int, concurrency: int, async_n: int
) -> None:
    """Publish N delayed messages, deliver them when due; rates, lateness, RSS."""
    params = delays.Params(n, spread, lead, workers, concurrency, async_n)
    sys.exit(0 if delays.run(Settings.load(), params) else 1)


if __name__ == "__main__":
    main()
