"""``nudge contacts``: bulk import of contacts from CSV."""

from __future__ import annotations

import time
from pathlib import Path

import click

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
