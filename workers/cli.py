"""``nudge``: the admin command line.

Exit codes a script can rely on: 0 success, 1 the operation failed (broker, database),
2 invalid input or configuration, 4 not found.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable, Iterator
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
    from sqlalchemy import Connection

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


@contextmanager
def _database(settings: Settings, *, write: bool = False) -> Iterator[Connection]:
    """A connection to the store (in one transaction when ``write``); driver errors leave as
    :class:`~shared.errors.StoreError`."""
    from workers.store.db import sync_engine, sync_errors

    engine = sync_engine(settings.database_url)
    try:
        with sync_errors(), engine.begin() if write else engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


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
    # Done: a late SIGTERM (the loop's handlers are gone) must not turn exit 0 into -15.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
@click.option(
    "--exclude-scope",
    type=click.Choice(["since_scheduled", "ever", "within"]),
    default="since_scheduled",
    show_default=True,
    help="Which past --exclude events count.",
)
@click.option("--exclude-within", type=DURATION, help="The window of --exclude-scope within.")
@click.option("--category", help="Kind of content, for the category dedup window.")
@click.option(
    "--priority",
    type=click.Choice(["transactional", "automation", "campaign"]),
    default="automation",
    show_default=True,
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
    exclude_scope: str,
    exclude_within: timedelta | None,
    category: str | None,
    priority: str,
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
            exclude_scope=exclude_scope,
            exclude_within=exclude_within,
            category=category,
            priority=priority,
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

    with _database(settings) as conn:
        found = messages.find(conn, ref)
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
            + (f" failures={item['failures']}" if item["failures"] else "")
            + (f" last_error={item['last_error']}" if item["last_error"] else "")
        )


@message.command("cancel")
@click.argument("ref")
@click.pass_context
def message_cancel(ctx: click.Context, ref: str) -> None:
    """Cancel message REF: recipients not yet sent are recorded cancelled when due."""
    from workers.store import messages

    settings = _settings(ctx)
    with _errors():
        found = _find(settings, ref)
        with _database(settings, write=True) as conn:
            changed = messages.cancel(conn, found["id"])
    click.echo(
        f"message {found['id']} cancelled"
        if changed
        else f"message {found['id']} had already completed or been cancelled"
    )


# --- policy ------------------------------------------------------------------------------

PRIORITIES = click.Choice(["transactional", "automation", "campaign"])


def _optional_duration(value: str) -> float | None:
    """Seconds of a duration option, or None for ``none``."""
    if value == "none":
        return None
    try:
        return parse_duration(value).total_seconds()
    except ValueError as exc:
        raise InvalidMessage(str(exc)) from exc


def _optional_int(value: str) -> int | None:
    if value == "none":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise InvalidMessage(f"{value!r} is not a whole number or 'none'") from exc


@main.group()
def policy() -> None:
    """Anti-spam policies, one per priority class; dispatch workers apply changes from their
    next batch, no restart needed."""


@policy.command("set")
@click.argument("priority", type=PRIORITIES)
@click.option("--frequency-cap", help="Messages per contact per window, all channels, or none.")
@click.option("--channel-cap", help="Messages per contact per window on one channel, or none.")
@click.option("--frequency-window", help="Rolling window of the caps, e.g. 24h.")
@click.option("--category-window", help="No repeat of a category within this, e.g. 72h, or none.")
@click.option(
    "--interaction-events", help="Comma-separated events that mean 'talking to us', or none."
)
@click.option("--interaction-window", help="How recent an interaction skips a message, e.g. 2h.")
@click.option("--quiet-hours", help="HH:MM-HH:MM in the contact's timezone, or none.")
@click.option("--default-timezone", help="For contacts without one, e.g. Europe/Paris.")
@click.option("--cap-action", type=click.Choice(["suppress", "defer"]))
@click.option("--bypass-caps/--no-bypass-caps", default=None)
@click.option("--bypass-subscription/--no-bypass-subscription", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policy_set(ctx: click.Context, /, priority: str, as_json: bool, **options: Any) -> None:
    """Change the policy of PRIORITY; options not given keep their current value."""
    from shared.contract import Priority
    from workers import policy as policy_mod
    from workers.store import policies

    settings = _settings(ctx)
    converters: dict[str, Callable[[str], object]] = {
        "frequency_cap": _optional_int,
        "channel_cap": _optional_int,
        "frequency_window": lambda v: _required(_optional_duration(v), "frequency_window"),
        "category_window": _optional_duration,
        "interaction_events": lambda v: (
            () if v == "none" else tuple(e.strip() for e in v.split(",") if e.strip())
        ),
        "interaction_window": lambda v: _required(_optional_duration(v), "interaction_window"),
        "quiet_hours": lambda v: None if v == "none" else v,
    }
    fields = {"frequency_window": "frequency_window_seconds",
              "category_window": "category_window_seconds",
              "interaction_window": "interaction_window_seconds"}  # fmt: skip
    with _errors():
        changes = {
            fields.get(name, name): converters[name](value) if name in converters else value
            for name, value in options.items()
            if value is not None
        }
        with _database(settings, write=True) as conn:
            current, _ = policies.get(conn, Priority(priority), for_update=True)
            updated = policy_mod.parse({**current.model_dump(), **changes})
            policies.put(conn, Priority(priority), updated)
    _show_policy(priority, updated, stored=True, as_json=as_json)


def _required(value: float | None, name: str) -> float:
    if value is None:
        raise InvalidMessage(f"{name}: cannot be none")
    return value


def _show_policy(name: str, p: Any, *, stored: bool, as_json: bool) -> None:
    if as_json:
        _print_json({"name": name, "stored": stored, **p.model_dump(mode="json")})
        return
    click.echo(f"{name}{'' if stored else ' (built-in default)'}")
    for key, value in p.model_dump(mode="json").items():
        click.echo(f"  {key}: {value}")


@policy.command("show")
@click.argument("priority", type=PRIORITIES)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policy_show(ctx: click.Context, priority: str, as_json: bool) -> None:
    """Show the policy dispatch workers apply to PRIORITY messages."""
    from shared.contract import Priority
    from workers.store import policies

    settings = _settings(ctx)
    with _errors(), _database(settings) as conn:
        p, stored = policies.get(conn, Priority(priority))
    _show_policy(priority, p, stored=stored, as_json=as_json)


@policy.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policy_list(ctx: click.Context, as_json: bool) -> None:
    """Show the policy of every priority class."""
    from shared.contract import Priority
    from workers.store import policies

    settings = _settings(ctx)
    with _errors(), _database(settings) as conn:
        found = {p.value: policies.get(conn, p) for p in Priority}
    if as_json:
        _print_json([{"name": n, "stored": s, **p.model_dump(mode="json")}
                     for n, (p, s) in found.items()])  # fmt: skip
        return
    for n, (p, s) in found.items():
        _show_policy(n, p, stored=s, as_json=False)


@policy.command("reset")
@click.argument("priority", type=PRIORITIES)
@click.pass_context
def policy_reset(ctx: click.Context, priority: str) -> None:
    """Forget the stored policy of PRIORITY: the built-in default applies again."""
    from shared.contract import Priority
    from workers.store import policies

    settings = _settings(ctx)
    with _errors(), _database(settings, write=True) as conn:
        policies.reset(conn, Priority(priority))
    click.echo(f"{priority}: built-in default restored")


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
