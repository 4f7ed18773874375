"""``nudge dead``: look at what was parked in ``nudge.dead`` and why, replay it once the cause
is fixed, or purge it."""

from __future__ import annotations

import click

from shared.errors import InvalidMessage, NotFound
from workers.cli.base import errors, load_settings, print_json

#: ``dead list --json`` shows at most this much of each body (``dead show`` shows it all).
LIST_BODY_BYTES = 4096


@click.group()
def dead() -> None:
    """Parked messages (nudge.dead)."""


@dead.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def dead_list(ctx: click.Context, limit: int, as_json: bool) -> None:
    """List parked messages, oldest first, with where they came from and why."""
    from workers import deadletters

    settings = load_settings(ctx)
    with errors():
        letters = deadletters.browse(settings.amqp_url, limit)
    if as_json:
        print_json([d.describe(max_body=LIST_BODY_BYTES) for d in letters])
        return
    if not letters:
        click.echo("nudge.dead is empty")
    for d in letters:
        click.echo(f"{d.message_id or '-'}  from {d.source_queue or '?'}: {d.reason}")


@dead.command("show")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def dead_show(ctx: click.Context, message_id: str, as_json: bool) -> None:
    """Show parked message MESSAGE_ID: reason, headers and body."""
    from workers import deadletters

    settings = load_settings(ctx)
    with errors():
        found = [
            d for d in deadletters.browse(settings.amqp_url, 100_000) if d.message_id == message_id
        ]
        if not found:
            raise NotFound(f"no parked message {message_id!r} (see `nudge dead list`)")
    doc = found[0].describe()
    if as_json:
        print_json(doc)
        return
    click.echo(f"message {message_id} from {doc['source_queue'] or '?'}")
    click.echo(f"reason: {doc['reason']}")
    for key, value in sorted(doc["headers"].items()):
        click.echo(f"header {key}: {value}")
    click.echo(f"body: {found[0].body.decode(errors='replace')}")


def _selection(message_ids: tuple[str, ...], everything: bool) -> set[str] | None:
    if bool(message_ids) == everything:
        raise InvalidMessage("message_id: give message ids or --all, not both or neither")
    return None if everything else set(message_ids)


@dead.command("replay")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Replay every parked message.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def dead_replay(
    ctx: click.Context, message_ids: tuple[str, ...], everything: bool, as_json: bool
) -> None:
    """Put parked messages back on the queue they came from (fix the cause first)."""
    from workers import deadletters

    settings = load_settings(ctx)
    with errors():
        wanted = _selection(message_ids, everything)
        done = deadletters.replay(settings.amqp_url, wanted)
        if wanted is not None and not done:
            raise NotFound(f"no parked message {', '.join(sorted(wanted))}")
    if as_json:
        print_json([{"message_id": d.message_id, "queue": d.source_queue} for d in done])
        return
    for d in done:
        click.echo(f"replayed {d.message_id or '-'} to {d.source_queue}")
    click.echo(f"{len(done)} message(s) replayed")


@dead.command("purge")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Delete every parked message.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation with --all.")
@click.pass_context
def dead_purge(
    ctx: click.Context, message_ids: tuple[str, ...], everything: bool, yes: bool
) -> None:
    """Delete parked messages for good."""
    from workers import deadletters

    settings = load_settings(ctx)
    with errors():
        wanted = _selection(message_ids, everything)
    if everything and not yes:
        click.confirm("delete every message parked in nudge.dead?", abort=True)
    with errors():
        done = deadletters.purge(settings.amqp_url, wanted)
        if wanted is not None and not done:
            raise NotFound(f"no parked message {', '.join(sorted(wanted))}")
    click.echo(f"{len(done)} message(s) purged")
