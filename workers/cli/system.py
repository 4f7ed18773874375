"""Setting up and running: schema, topology, workers, the demo, the contract."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click

from shared import amqp, topology
from workers.cli.base import (
    EXIT_FAILED,
    EXIT_INVALID,
    errors,
    fail,
    load_settings,
)
from workers.config import DelayBackendName

if TYPE_CHECKING:
    from workers.runtime.runner import Role


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Apply migrations (safe to run from several processes at once)."""
    from workers.store.db import upgrade

    settings = load_settings(ctx)
    with errors():
        upgrade(settings.database_url, revision)
    click.echo(f"database at {revision}")


@db.command("partitions")
@click.pass_context
def db_partitions(ctx: click.Context) -> None:
    """Create the partitions of this month and the next two, and move the message id
    sequence to this month's partition (the scheduler role does it every few minutes)."""
    from datetime import UTC, datetime

    from workers.cli.base import database
    from workers.store import partitions

    settings = load_settings(ctx)
    with errors(), database(settings, write=True) as conn:
        partitions.lock(conn)
        done = partitions.maintain(conn, datetime.now(UTC))
        listing = {t: partitions.partitions(conn, t) for t in partitions.PARTITIONED}
    for line in done:
        click.echo(line)
    for table, found in listing.items():
        click.echo(f"{table}: {', '.join(p.name for p in found)}")


@db.command("prune")
@click.option("--dry-run", is_flag=True, help="Print what would be dropped and kept, and why.")
@click.pass_context
def db_prune(ctx: click.Context, dry_run: bool) -> None:
    """Drop the month partitions older than their table's retention that nothing pending
    needs, and delete old idempotency keys (and rule runs, when NUDGE_RETENTION_RULE_RUNS_DAYS
    is set). Prints, per partition, drop or keep and why."""
    from datetime import UTC, datetime

    from workers.cli.base import database
    from workers.store import partitions

    settings = load_settings(ctx)
    with errors(), database(settings, write=True) as conn:
        partitions.lock(conn)
        decisions, deleted = partitions.prune(
            conn, datetime.now(UTC), partitions.Retention.of(settings), dry_run=dry_run
        )
    for d in decisions:
        click.echo(("would " if dry_run and d.drop else "") + d.line())
    for line in deleted:
        click.echo(line)


@click.group("topology")
def topology_group() -> None:
    """RabbitMQ exchanges and queues."""


@topology_group.command("apply")
@click.option(
    "--backend",
    type=click.Choice(["auto", "plugin", "tiers"]),
    default=None,
    help="Delay backend (default: NUDGE_DELAY_BACKEND, tiers).",
)
@click.pass_context
def topology_apply(ctx: click.Context, backend: DelayBackendName | None) -> None:
    """Declare every exchange, queue and binding; idempotent."""
    settings = load_settings(ctx)

    async def apply() -> tuple[str, topology.Topology]:
        connection = await amqp.connect(settings.amqp_url, name="nudge-cli")
        try:
            configured = settings.delay_backend if backend is None else backend
            chosen = await amqp.resolve_backend(configured, settings.amqp_url)
            topo = topology.build(chosen)
            await amqp.declare(connection, topo)
            return chosen, topo
        finally:
            await connection.close()

    with errors():
        chosen, topo = asyncio.run(apply())
    click.echo(
        f"topology applied: backend={chosen}, {len(topo.exchanges)} exchanges, "
        f"{len(topo.queues)} queues, {len(topo.bindings)} bindings"
    )


@topology_group.command("export")
@click.option(
    "--backend", type=click.Choice(["plugin", "tiers"]), default="tiers", show_default=True
)
def topology_export(backend: str) -> None:
    """Print the topology, the broker users and their permissions on vhost / as RabbitMQ
    definitions JSON. The users have no password: importing the file clears the passwords of
    existing ones, so set them afterwards (rabbitmqctl change_password)."""
    definitions = {
        **topology.to_definitions(topology.build(backend)),  # type: ignore[arg-type]
        **topology.users_definitions(),
    }
    click.echo(json.dumps(definitions, indent=2, sort_keys=True))


@click.command()
@click.argument(
    "roles",
    nargs=-1,
    required=True,
    type=click.Choice(["scheduler", "dispatch", "events", "planner", "receipts", "web"]),
)
@click.option(
    "--concurrency",
    "-c",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Batches in flight per role.",
)
@click.option(
    "--burst",
    is_flag=True,
    help="Exit once the queues and the delay ladder are empty and nothing is in "
    "flight (for demos and tests).",
)
@click.pass_context
def worker(ctx: click.Context, roles: tuple[str, ...], concurrency: int, burst: bool) -> None:
    """Run worker ROLES in this process until SIGTERM (which finishes in-flight work and
    exits 0). The web role serves unsubscribe links, the open pixel and click redirects on
    NUDGE_WEB_HOST:NUDGE_WEB_PORT."""
    from workers.runtime.logs import configure
    from workers.runtime.runner import run

    if burst and set(roles) == {"web"}:
        fail("--burst: the web role serves until SIGTERM; give a consuming role too", EXIT_INVALID)
    settings = load_settings(ctx)
    configure(settings.log_level)
    with errors():
        asyncio.run(
            run(
                settings,
                cast("list[Role]", list(roles)),
                concurrency=concurrency,
                burst=burst,
            )
        )
    # Done: a late SIGTERM (the loop's handlers are gone) must not turn exit 0 into -15.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@click.command()
@click.option(
    "--count",
    default=12,
    show_default=True,
    type=click.IntRange(1, 100000),
    help="Messages to schedule, spread over 0.5-9 s.",
)
@click.pass_context
def demo(ctx: click.Context, count: int) -> None:
    """Run the main job end to end: a service schedules messages, workers deliver them to a
    local webhook receiver when due; prints what arrived and what the tables say."""
    from workers.demo.walkthrough import run_demo

    settings = load_settings(ctx)
    with errors():
        ok = run_demo(settings, count)
    sys.exit(0 if ok else EXIT_FAILED)


@click.group("contract")
def contract_group() -> None:
    """The wire contract for services in other languages."""


@contract_group.command("export")
@click.argument(
    "directory", default="docs/contract", type=click.Path(file_okay=False, path_type=Path)
)
def contract_export(directory: Path) -> None:
    """Write the AsyncAPI document and JSON Schemas to DIRECTORY (default docs/contract)."""
    from workers.asyncapi import export

    try:
        written = export(directory)
    except OSError as exc:
        fail(f"cannot write {directory}: {exc}", EXIT_FAILED)
    for path in written:
        click.echo(str(path))
