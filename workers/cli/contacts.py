"""``nudge contact``: bulk import of contacts from CSV, and one contact's history."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from shared.errors import NotFound
from workers.cli.base import database, errors, load_settings, print_json


@click.group()
def contacts() -> None:
    """Contacts (the people messages go to)."""


@contacts.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def contacts_import(ctx: click.Context, file: Path, as_json: bool) -> None:
    """Upsert the contacts of CSV FILE in bulk.

    Columns: external_id (required), email, phone, timezone, subscribed, attributes (a JSON
    object); other columns become string attributes. Empty cells keep the stored value. An
    invalid row stops the import before anything is stored, naming its line.
    """
    from workers.store.contact_import import import_csv

    settings = load_settings(ctx)
    started = time.perf_counter()
    with errors(), database(settings, write=True) as conn, file.open(newline="") as f:
        done = import_csv(conn, f)
    seconds = time.perf_counter() - started
    if as_json:
        print_json(
            {
                "rows": done.rows,
                "inserted": done.inserted,
                "updated": done.updated,
                "seconds": round(seconds, 3),
            }
        )
    else:
        click.echo(
            f"imported {done.rows} rows from {file.name}: {done.inserted} new, "
            f"{done.updated} updated in {seconds:.1f} s"
        )


@contacts.command("show")
@click.argument("external_id")
@click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Messages per page.",
)
@click.option(
    "--before",
    type=click.IntRange(1),
    help="Page cursor: only messages with an id below this (the last page printed it).",
)
@click.option(
    "--events",
    default=10,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="Recent events to show.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def contacts_show(
    ctx: click.Context,
    external_id: str,
    limit: int,
    before: int | None,
    events: int,
    as_json: bool,
) -> None:
    """Show contact EXTERNAL_ID: its fields, recent events, and every message with its
    outcome and reason (why it was or was not sent), opens and clicks, newest first."""
    from workers.cli.messages import engagement_text
    from workers.store import contact_history

    settings = load_settings(ctx)
    with errors(), database(settings) as conn:
        found = contact_history.show(
            conn,
            external_id,
            limit=limit,
            before=before or contact_history.FIRST_PAGE,
            events=events,
        )
        if found is None:
            raise NotFound(f"no contact {external_id!r} (give the service's external id)")
    if as_json:
        print_json(found)
        return
    c = found["contact"]
    click.echo(
        f"contact {c['external_id']} (id {c['id']}): "
        + ("subscribed" if c["subscribed"] else "unsubscribed")
    )
    for field in ("email", "phone", "timezone"):
        if c[field]:
            click.echo(f"  {field} {c[field]}")
    if c["attributes"]:
        click.echo(f"  attributes {json.dumps(c['attributes'], sort_keys=True)}")
    if events:
        click.echo("events, newest first:" if found["events"] else "no events")
        for e in found["events"]:
            data = f" {json.dumps(e['data'], sort_keys=True)}" if e["data"] else ""
            click.echo(f"  {e['occurred_at'].isoformat(timespec='seconds')} {e['name']}{data}")
    click.echo("messages, newest first:" if found["messages"] else "no messages")
    for m in found["messages"]:
        what = (
            f"campaign {m['campaign']!r}"
            if m["campaign"]
            else f"{m['kind']} {m['idempotency_key']}"
        )
        when = m["sent_at"] or m["deliver_at"]
        click.echo(
            f"  #{m['message_id']} {what}: {m['template']} via {m['channel']}: {m['status']}"
            + f" {when.isoformat(timespec='seconds')}"
            + (f" ({m['reason']})" if m["reason"] else "")
            + (f" last_error={m['last_error']}" if m["last_error"] else "")
            + engagement_text(m)
        )
    if found["next_before"] is not None:
        click.echo(
            f"more: nudge contact show {external_id} --before {found['next_before']}"
            + (f" --limit {limit}" if limit != 20 else "")
        )
