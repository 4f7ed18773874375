"""``nudge``: the admin command line.

Exit codes a script can rely on: 0 success, 1 the operation failed (broker, database),
2 invalid input or configuration, 4 not found.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

import click

from shared import amqp, topology
from shared.config import Settings
from shared.durations import parse_duration
from shared.errors import ConfigError, InvalidMessage, NotFound, NudgeError

if TYPE_CHECKING:
    from workers.runner import Role

EXIT_FAILED, EXIT_INVALID, EXIT_NOT_FOUND = 1, 2, 4


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (InvalidMessage, ConfigError) as exc:
        _fail(str(exc), EXIT_INVALID)
    except NotFound as exc:
        _fail(str(exc), EXIT_NOT_FOUND)
    except NudgeError as exc:
        _fail(str(exc), EXIT_FAILED)


def _settings(ctx: click.Context) -> Settings:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "settings" not in obj:
        with _errors():
            obj["settings"] = Settings.load(obj.get("config_file"))
    settings: Settings = obj["settings"]
    return settings


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, sort_keys=True))


class _Duration(click.ParamType[timedelta, Any]):
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = _Duration()


@click.group()
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, path_type=Path),
    envvar="NUDGE_CONFIG",
    help="TOML file of settings (NUDGE_* variables win).",
)
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """Nudge: the right message to the right person at the right time, never twice.

    Settings come from NUDGE_* environment variables (see docs/operations.md).
    """
    ctx.ensure_object(dict)["config_file"] = config_file


# --- db ------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Apply migrations (safe to run from several processes at once)."""
    from workers.store.db import upgrade

    settings = _settings(ctx)
    with _errors():
        upgrade(settings.database_url, revision)
    click.echo(f"database at {revision}")


# --- topology ------------------------------------------------------------------------------


@main.group("topology")
def topology_group() -> None:
    """RabbitMQ exchanges and queues."""


@topology_group.command("apply")
@click.option(
    "--backend",
    type=click.Choice(["auto", "plugin", "tiers"]),
    default=None,
    help="Delay backend (default: NUDGE_DELAY_BACKEND, auto).",
)
@click.pass_context
def topology_apply(ctx: click.Context, backend: str | None) -> None:
    """Declare every exchange, queue and binding; idempotent."""
    settings = _settings(ctx)

    async def apply() -> tuple[str, topology.Topology]:
        from workers.runner import resolve_backend

        connection = await amqp.connect(settings.amqp_url, name="nudge-cli")
        try:
            chosen = await resolve_backend(
                settings
                if backend is None
                else settings.model_copy(update={"delay_backend": backend})
            )
            topo = topology.build(chosen)
            await amqp.declare(connection, topo)
            return chosen, topo
        finally:
            await connection.close()

    with _errors():
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
    """Print the topology as RabbitMQ definitions JSON."""
    click.echo(
        json.dumps(
            topology.to_definitions(topology.build(backend)),  # type: ignore[arg-type]
            indent=2,
            sort_keys=True,
        )
    )


# --- worker --------------------------------------------------------------------------------


@main.command()
@click.argument(
    "roles", nargs=-1, required=True, type=click.Choice(["scheduler", "dispatch", "events"])
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
    exits 0)."""
    from shared.logs import configure
    from workers.runner import run

    settings = _settings(ctx)
    configure(settings.log_level)
    with _errors():
        asyncio.run(
            run(
                settings,
                cast("list[Role]", list(roles)),
                concurrency=concurrency,
                burst=burst,
            )
        )


# --- message -------------------------------------------------------------------------------


@main.group()
def message() -> None:
    """Scheduled messages."""


@message.command("schedule")
@click.argument("contact")
@click.argument("template")
@click.argument("channel")
@click.option("--delay", type=DURATION, help="e.g. 500ms, 15m, 7d.")
@click.option(
    "--at",
    "deliver_at",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z"]),
    help="Deliver at this time, e.g. 2026-12-01T09:00:00+00:00.",
)
@click.option(
    "--exclude",
    "exclude_events",
    multiple=True,
    help="Do not send if the contact does this event first (repeatable).",
)
@click.option("--expires-in", type=DURATION, help="Record expired if due after this long.")
@click.option("--key", "idempotency_key", help="Idempotency key (default: random).")
@click.option("--data", default="{}", help="JSON object for the template.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def message_schedule(
    ctx: click.Context,
    contact: str,
    template: str,
    channel: str,
    delay: timedelta | None,
    deliver_at: datetime | None,
    exclude_events: tuple[str, ...],
    expires_in: timedelta | None,
    idempotency_key: str | None,
    data: str,
    as_json: bool,
) -> None:
    """Schedule TEMPLATE for CONTACT on CHANNEL, through RabbitMQ like any service."""
    from datetime import UTC

    from producer import Producer

    settings = _settings(ctx)
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        _fail(f"--data: not JSON ({exc})", EXIT_INVALID)
    base = deliver_at or datetime.now(UTC) + (delay or timedelta(0))
    with _errors(), Producer(settings.amqp_url, name="nudge-cli") as producer:
        key = producer.schedule(
            contact,
            template,
            channel,
            delay=delay,
            deliver_at=deliver_at,
            exclude_events=exclude_events,
            expires_at=base + expires_in if expires_in else None,
            idempotency_key=idempotency_key,
            data=payload,
        )
    if as_json:
        _print_json({"idempotency_key": key})
    else:
        click.echo(f"scheduled {key}")


def _find(settings: Settings, ref: str) -> dict[str, Any]:
    from workers.store import messages
    from workers.store.db import sync_engine, sync_errors

    engine = sync_engine(settings.database_url)
    try:
        with sync_errors(), engine.connect() as conn:
            found = messages.find(conn, ref)
    finally:
        engine.dispose()
    if found is None:
        raise NotFound(f"no message {ref!r} (give its id or idempotency key)")
    return found


@message.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def message_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show message REF (id or idempotency key) and each recipient's outcome and why."""
    from workers.store.schema import MessageStatus

    settings = _settings(ctx)
    with _errors():
        found = _find(settings, ref)
    if as_json:
        _print_json(found)
        return
    click.echo(
        f"message {found['id']} ({found['idempotency_key']}): {found['template']} "
        f"via {found['channel']}, {MessageStatus(found['status']).name.lower()}"
    )
    click.echo(
        f"  deliver_at {found['deliver_at'].isoformat()}"
        + (f", expires_at {found['expires_at'].isoformat()}" if found["expires_at"] else "")
    )
    if not found["items"]:
        click.echo("  no recipient has an outcome yet")
    for item in found["items"]:
        when = item["sent_at"].isoformat() if item["sent_at"] else ""
        click.echo(
            f"  {item['external_id']}: {item['status']} {when}".rstrip()
            + (f" ({item['reason']})" if item["reason"] else "")
            + (f" attempts={item['attempts']}" if item["attempts"] > 1 else "")
            + (f" last_error={item['last_error']}" if item["last_error"] else "")
        )


@message.command("cancel")
@click.argument("ref")
@click.pass_context
def message_cancel(ctx: click.Context, ref: str) -> None:
    """Cancel message REF: recipients not yet sent are recorded cancelled when due."""
    from workers.store import messages
    from workers.store.db import sync_engine, sync_errors

    settings = _settings(ctx)
    with _errors():
        found = _find(settings, ref)
        engine = sync_engine(settings.database_url)
        try:
            with sync_errors(), engine.begin() as conn:
                changed = messages.cancel(conn, found["id"])
        finally:
            engine.dispose()
    click.echo(
        f"message {found['id']} cancelled"
        if changed
        else f"message {found['id']} had already completed or been cancelled"
    )


# --- demo ----------------------------------------------------------------------------------


@main.command()
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
    from workers.demo import run_demo

    settings = _settings(ctx)
    with _errors():
        ok = run_demo(settings, count)
    sys.exit(0 if ok else EXIT_FAILED)


# --- contract ------------------------------------------------------------------------------


@main.group("contract")
def contract_group() -> None:
    """The wire contract for services in other languages."""


@contract_group.command("export")
@click.argument(
    "directory", default="docs/contract", type=click.Path(file_okay=False, path_type=Path)
)
def contract_export(directory: Path) -> None:
    """Write the AsyncAPI document and JSON Schemas to DIRECTORY (default docs/contract)."""
    from shared.asyncapi import export

    try:
        written = export(directory)
    except OSError as exc:
        _fail(f"cannot write {directory}: {exc}", EXIT_FAILED)
    for path in written:
        click.echo(str(path))
