"""``nudge message``: schedule, show and cancel single messages."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from shared.errors import InvalidTransition, NotFound
from workers.cli.base import (
    DURATION,
    EXIT_INVALID,
    database,
    errors,
    fail,
    load_settings,
    print_json,
)
from workers.config import Settings

if TYPE_CHECKING:
    from sqlalchemy import Connection


@click.group()
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

    settings = load_settings(ctx)
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        fail(f"--data: not JSON ({exc})", EXIT_INVALID)
    base = deliver_at or datetime.now(UTC) + (delay or timedelta(0))
    with errors(), Producer(settings.amqp_url, name="nudge-cli") as producer:
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
        print_json({"idempotency_key": key})
    else:
        click.echo(f"scheduled {key}")


def _find(settings: Settings, ref: str) -> dict[str, Any]:
    from workers.store import messages

    with database(settings) as conn:
        found = messages.find(conn, ref)
    if found is None:
        raise NotFound(f"no message {ref!r} (give its id or idempotency key)")
    return found


def page_options(limit: int) -> Callable[[Any], Any]:
    """``--limit``, ``--status`` and ``--after``: which page of recipients a view prints."""
    from workers.recipients import ItemStatus

    def decorate(command: Any) -> Any:
        for option in reversed(
            (
                click.option(
                    "--limit",
                    default=limit,
                    show_default=True,
                    type=click.IntRange(0, 10_000),
                    help="Recipients shown per page.",
                ),
                click.option(
                    "--status",
                    type=click.Choice([s.value for s in ItemStatus]),
                    help="Only recipients with this outcome.",
                ),
                click.option(
                    "--after",
                    default=0,
                    type=click.IntRange(0),
                    help="The next page: recipients after this contact id (printed at the "
                    "end of a page).",
                ),
            )
        ):
            command = option(command)
        return command

    return decorate


def recipient_page(
    conn: Connection, message_id: int, status: str | None, after: int, limit: int
) -> dict[str, Any]:
    """One page of a message's recipients with their opens and clicks, as printed."""
    from workers.recipients import ItemStatus
    from workers.store import messages, tracking

    page = messages.recipients(
        conn,
        message_id,
        status=ItemStatus(status) if status else None,
        after=after,
        limit=limit,
    )
    engaged = tracking.engagement(conn, ((message_id, i["contact_id"]) for i in page.items))
    for item in page.items:
        item.update(engaged[(message_id, item["contact_id"])].as_dict())
    return {"items": page.items, "total": page.total, "next_after": page.next_after}


def echo_page(page: dict[str, Any], status: str | None) -> None:
    """The recipients of a page, one line each, and how to get the next page."""
    which = f" {status}" if status else ""
    if not page["total"]:
        click.echo(f"  no{which} recipient has an outcome yet" if not status else f"  none{which}")
    for item in page["items"]:
        when = item["sent_at"].isoformat() if item["sent_at"] else ""
        click.echo(
            f"  {item['external_id']}: {item['status']} {when}".rstrip()
            + (f" ({item['reason']})" if item["reason"] else "")
            + (f" attempts={item['attempts']}" if item["attempts"] > 1 else "")
            + (f" failures={item['failures']}" if item["failures"] else "")
            + (f" last_error={item['last_error']}" if item["last_error"] else "")
            + engagement_text(item)
        )
    if page["next_after"] is not None:
        click.echo(
            f"  ... {len(page['items'])} of {page['total']}{which} recipients shown; "
            f"next page: --after {page['next_after']}"
        )


@message.command("show")
@click.argument("ref")
@page_options(limit=50)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def message_show(
    ctx: click.Context, ref: str, limit: int, status: str | None, after: int, as_json: bool
) -> None:
    """Show message REF (id or idempotency key) and its recipients' outcomes and why, with
    the opens and clicks of an email, a page at a time (by contact id)."""
    from workers.recipients import MessageStatus

    settings = load_settings(ctx)
    with errors():
        found = _find(settings, ref)
        with database(settings) as conn:
            found.update(recipient_page(conn, found["id"], status, after, limit))
    if as_json:
        print_json(found)
        return
    click.echo(
        f"message {found['id']} ({found['idempotency_key']}): {found['template']} "
        f"via {found['channel']}, {MessageStatus(found['status']).name.lower()}"
    )
    click.echo(
        f"  deliver_at {found['deliver_at'].isoformat()}"
        + (f", expires_at {found['expires_at'].isoformat()}" if found["expires_at"] else "")
    )
    echo_page(found, status)


def engagement_text(item: dict[str, Any]) -> str:
    """`` opened <first> (n times), clicked <url> at <time>, ...`` for what a recipient did
    with an email; empty when nothing."""
    out = ""
    if item["first_opened_at"] is not None:
        out += f" opened {item['first_opened_at'].isoformat(timespec='seconds')}"
        out += f" ({item['opens']} times)" if item["opens"] > 1 else ""
    for c in item["clicks"]:
        out += f" clicked {c['url']} at {c['at'].isoformat(timespec='seconds')}"
    return out


@message.command("cancel")
@click.argument("ref")
@click.pass_context
def message_cancel(ctx: click.Context, ref: str) -> None:
    """Cancel message REF: recipients not yet sent are recorded cancelled when due; for a
    campaign, as `nudge campaign cancel` does (its recipients not claimed yet at once)."""
    from workers.store import messages

    settings = load_settings(ctx)
    with errors():
        found = _find(settings, ref)
        if found["kind"] == "campaign":
            from workers.cli.campaigns import cancel

            try:
                campaign, n = cancel(settings, str(found["id"]), "cancelled by an operator")
            except InvalidTransition:
                changed = False
            else:
                click.echo(
                    f"message {found['id']} (campaign {campaign.name!r}) cancelled: "
                    f"{n} recipients recorded cancelled"
                )
                return
        else:
            with database(settings, write=True) as conn:
                changed = messages.cancel(conn, found["id"])
    click.echo(
        f"message {found['id']} cancelled"
        if changed
        else f"message {found['id']} had already completed or been cancelled"
    )
