"""``nudge campaign``: create, schedule, start, pause, resume, cancel, retry-failed, status,
watch and list broadcast campaigns.

Every change is committed in Postgres first, then announced: a plan message to the planners
(start, resume, retry-failed, or a start through the delay for ``schedule``) and, for pause,
resume and cancel, a message on ``nudge.control`` that every worker hears. A command returns
once both are confirmed by the broker.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from shared.contract import Channel, Priority
from shared.errors import BrokerError, InvalidMessage, InvalidTransition, NotFound
from workers.cli.base import (
    DURATION,
    EXIT_INVALID,
    database,
    errors,
    fail,
    load_settings,
    print_json,
)
from workers.cli.messages import echo_page, page_options, recipient_page

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from workers.config import Settings
    from workers.store.campaign_states import Paused
    from workers.store.campaigns import Campaign


@contextmanager
def _errors() -> Iterator[None]:
    """The CLI's errors, plus: an invalid transition is invalid input (exit 2)."""
    with errors():
        try:
            yield
        except InvalidTransition as exc:
            fail(str(exc), EXIT_INVALID)


def _find(conn: Connection, ref: str) -> Campaign:
    from workers.store import campaigns

    found = campaigns.find(conn, ref)
    if found is None:
        raise NotFound(f"no campaign {ref!r} (give its name or id; `nudge campaign list`)")
    return found


def _announce(
    settings: Settings,
    *,
    plan: tuple[int, int] | None = None,
    control: tuple[int, str, int] | None = None,
    start_at: datetime | None = None,
) -> None:
    """Publish a plan message (now, or through the delay at ``start_at``) and/or a control
    announcement, with confirms."""
    from shared import amqp, contract, delay
    from shared.contract import CampaignControl, PlanCampaign
    from shared.topology import PLAN_DESTINATION, PLAN_EXCHANGE, PLAN_KEY
    from workers.runtime.control import announce

    async def go() -> None:
        connection = await amqp.connect(settings.amqp_url, name="nudge-cli")
        try:
            publisher = await amqp.Publisher.open(connection)
            if control is not None:
                cid, action, round_ = control
                await announce(
                    publisher,
                    contract.build(CampaignControl, campaign_id=cid, action=action, round=round_),
                )
            if plan is not None:
                body = contract.encode(
                    PlanCampaign(campaign_id=plan[0], round=plan[1], start_at=start_at)
                )
                key = f"plan-{plan[0]}-{plan[1]}"
                if start_at is None:
                    await publisher.publish(amqp.Outgoing(PLAN_EXCHANGE, PLAN_KEY, body, key))
                else:
                    backend = await amqp.resolve_backend(settings.delay_backend, settings.amqp_url)
                    wait = delay.delay_until(start_at, datetime.now(UTC))
                    await publisher.publish(
                        amqp.Publisher.delayed(
                            backend,
                            PLAN_DESTINATION,
                            wait,
                            body,
                            f"{key}-{int(start_at.timestamp())}",
                        )
                    )
            await publisher.close()
        finally:
            await connection.close()

    asyncio.run(go())


@click.group()
def campaign() -> None:
    """Broadcast campaigns: draft → scheduled → sending ⇄ paused → completed (or cancelled)."""


def _read_ids_csv(path: Path) -> list[str]:
    with path.open(newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None:
            raise InvalidMessage(f"audience: {path} is empty")
        column = header.index("external_id") if "external_id" in header else 0
        return [r[column] for r in rows if r]


@campaign.command("create")
@click.argument("name")
@click.option("--template", required=True, help="Template name (must exist).")
@click.option("--channel", required=True, type=click.Choice([c.value for c in Channel]))
@click.option("--category", help="Kind of content, for the category dedup window.")
@click.option(
    "--priority",
    type=click.Choice([p.value for p in Priority]),
    default="campaign",
    show_default=True,
)
@click.option("--data", default="{}", help="JSON object for the template.")
@click.option("--all", "everyone", is_flag=True, help="Audience: every subscribed contact.")
@click.option(
    "--where",
    multiple=True,
    help="Audience: contacts whose attributes match (repeatable, all must hold): "
    "ATTR=VALUE, ATTR!=VALUE, 'ATTR in V1,V2', 'ATTR exists'.",
)
@click.option("--ids", multiple=True, help="Audience: external ids, comma-separated.")
@click.option(
    "--did",
    multiple=True,
    metavar="EVENT:WINDOW",
    help="Audience: only contacts who did EVENT within WINDOW before the start, e.g. "
    "purchased:30d (repeatable; alone: among every contact).",
)
@click.option(
    "--did-not",
    multiple=True,
    metavar="EVENT:WINDOW",
    help="Audience: only contacts who did not do EVENT within WINDOW before the start "
    "(repeatable).",
)
@click.option(
    "--exclude-event",
    "exclude_events",
    multiple=True,
    help="Do not send to a recipient who did this event (checked at send time; repeatable).",
)
@click.option(
    "--exclude-scope",
    type=click.Choice(["since_scheduled", "ever", "within"]),
    default="since_scheduled",
    show_default=True,
    help="Which --exclude-event events count: since the campaign was created, ever, or "
    "within --exclude-within before the send.",
)
@click.option("--exclude-within", type=DURATION, help="The window of --exclude-scope within.")
@click.option(
    "--csv",
    "csv_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Audience: the contacts of this CSV (imported first, as `nudge contacts import`).",
)
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 5000))
@click.option(
    "--chunk-size",
    default=50,
    show_default=True,
    type=click.IntRange(1, 5000),
    help="Recipients sent between two checks for a pause.",
)
@click.option("--rate", type=click.FloatRange(0.1), help="At most this many recipients/s.")
@click.option(
    "--expires-in",
    type=DURATION,
    help="Recipients not sent this long after the start are recorded expired.",
)
@click.option(
    "--auto-pause-threshold",
    type=click.FloatRange(0, 1, min_open=True),
    help="Pause when more than this fraction of the last --auto-pause-window sends failed.",
)
@click.option("--auto-pause-window", default=100, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def campaign_create(
    ctx: click.Context,
    name: str,
    template: str,
    channel: str,
    category: str | None,
    priority: str,
    data: str,
    everyone: bool,
    where: tuple[str, ...],
    ids: tuple[str, ...],
    did: tuple[str, ...],
    did_not: tuple[str, ...],
    exclude_events: tuple[str, ...],
    exclude_scope: str,
    exclude_within: timedelta | None,
    csv_file: Path | None,
    batch_size: int,
    chunk_size: int,
    rate: float | None,
    expires_in: timedelta | None,
    auto_pause_threshold: float | None,
    auto_pause_window: int,
    as_json: bool,
) -> None:
    """Create campaign NAME as a draft, validating its template and audience."""
    from workers.store import audiences, campaigns, contact_import, templates

    settings = load_settings(ctx)
    with _errors():
        given = [
            n
            for n, v in (
                ("--all", everyone),
                ("--where", where),
                ("--ids", ids),
                ("--csv", csv_file),
            )
            if v
        ]
        if len(given) > 1 or not (given or did or did_not):
            raise InvalidMessage(
                "audience: give one of --all, --where, --ids, --csv (or only --did/--did-not)"
                + (f" (got {', '.join(given)})" if given else "")
            )
        excluded = _exclusion(exclude_events, exclude_scope, exclude_within)
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as exc:
            raise InvalidMessage(f"data: not JSON ({exc})") from exc
        if not isinstance(payload, dict):
            raise InvalidMessage("data: must be a JSON object")
        if chunk_size > batch_size:
            raise InvalidMessage(f"chunk_size: {chunk_size} is larger than batch_size {batch_size}")
        base: dict[str, Any] | None = None
        if everyone:
            base = audiences.subscribed()
        elif where:
            base = audiences.filtered(where)
        elif ids:
            base = audiences.explicit([i for group in ids for i in group.split(",")])
        elif csv_file is not None:
            base = audiences.explicit(_read_ids_csv(csv_file))
        audience = audiences.with_behaviour(base, did, did_not)
        with database(settings, write=True) as conn:
            if templates.missing(conn, [template]):
                raise InvalidMessage(f"template: no template named {template!r}; add it first")
            if csv_file is not None:
                with csv_file.open(newline="") as f:
                    contact_import.import_csv(conn, f)
            if audience["kind"] == "ids":
                unknown = audiences.unknown_ids(conn, audience["ids"])
                if unknown:
                    raise InvalidMessage(
                        f"audience: {len(unknown)} external ids are not contacts "
                        f"(e.g. {', '.join(map(repr, unknown[:5]))}); "
                        "import them with `nudge contacts import`"
                    )
            new = campaigns.NewCampaign(
                name=name,
                template=template,
                channel=channel,
                category=category,
                priority=priority,
                data=payload,
                audience=audience,
                batch_size=batch_size,
                chunk_size=chunk_size,
                rate_per_second=rate,
                auto_pause_threshold=auto_pause_threshold,
                auto_pause_window=auto_pause_window if auto_pause_threshold else None,
                expires_after_seconds=expires_in.total_seconds() if expires_in else None,
                exclude_events=excluded[0],
                exclude_scope=excluded[1],
                exclude_within_seconds=excluded[2],
            )
            campaign_id = campaigns.create(conn, new)
            if campaign_id is None:
                raise InvalidMessage(f"name: a campaign named {name!r} already exists")
            matching = audiences.count(conn, audience)
    if as_json:
        print_json({"id": campaign_id, "name": name, "state": "draft", "matching": matching})
    else:
        click.echo(
            f"campaign {name!r} created (draft, id {campaign_id}): "
            f"{audiences.describe(audience)}, {matching} matching now"
        )


_EVENT_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")


def _exclusion(
    events: tuple[str, ...], scope: str, within: timedelta | None
) -> tuple[tuple[str, ...], str, float | None]:
    """``--exclude-event``, ``--exclude-scope`` and ``--exclude-within``, validated as a
    single message's exclusion fields."""
    for name in events:
        if not _EVENT_NAME.fullmatch(name):
            raise InvalidMessage(
                f"exclude_events: {name!r} is not an event name: 1-200 letters, digits, "
                "'_', '.', ':' or '-'"
            )
    if len(events) > 50:
        raise InvalidMessage(f"exclude_events: at most 50 events (got {len(events)})")
    if (scope == "within") != (within is not None):
        raise InvalidMessage(
            "exclude_within: --exclude-within is required with --exclude-scope within, "
            "and only then"
        )
    if within is not None and within.total_seconds() <= 0:
        raise InvalidMessage("exclude_within: must be more than 0")
    return tuple(dict.fromkeys(events)), scope, within.total_seconds() if within else None


@campaign.command("schedule")
@click.argument("ref")
@click.option(
    "--at",
    "at",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z"]),
    help="Start at this time, e.g. 2026-12-01T09:00:00+00:00.",
)
@click.option("--in", "in_", type=DURATION, help="Start after this long, e.g. 2h.")
@click.pass_context
def campaign_schedule(
    ctx: click.Context, ref: str, at: datetime | None, in_: timedelta | None
) -> None:
    """Start campaign REF at a time: one start message waits in the delay."""
    from workers.store import campaigns

    settings = load_settings(ctx)
    with _errors():
        if (at is None) == (in_ is None):
            raise InvalidMessage("schedule: give exactly one of --at and --in")
        when = at.astimezone(UTC) if at is not None else datetime.now(UTC) + (in_ or timedelta())
        with database(settings, write=True) as conn:
            found = _find(conn, ref)
            campaigns.schedule(conn, found, when)
        _announce(settings, plan=(found.id, 0), start_at=when)
    click.echo(f"campaign {found.name!r} scheduled to start at {when.isoformat()}")


@campaign.command("start")
@click.argument("ref")
@click.pass_context
def campaign_start(ctx: click.Context, ref: str) -> None:
    """Freeze the audience of campaign REF and start sending now."""
    from workers.store import campaigns

    settings = load_settings(ctx)
    with _errors():
        with database(settings, write=True) as conn:
            found = _find(conn, ref)
            round_, n = campaigns.start(conn, found)
        try:
            _announce(settings, plan=(found.id, round_))
        except BrokerError as exc:
            raise BrokerError(
                f"campaign {found.name!r} is sending but the planners were not told ({exc}); "
                "run `nudge campaign pause` then `resume` once RabbitMQ is back"
            ) from exc
    click.echo(f"campaign {found.name!r} sending: {n} recipients frozen")


@campaign.command("pause")
@click.argument("ref")
@click.option("--reason", default="paused by an operator", show_default=True)
@click.pass_context
def campaign_pause(ctx: click.Context, ref: str, reason: str) -> None:
    """Pause campaign REF: every worker stops within the chunk it is sending."""
    settings = load_settings(ctx)
    with _errors():
        found = pause(settings, ref, reason)
    click.echo(f"campaign {found.name!r} paused")


def pause(settings: Settings, ref: str, reason: str) -> Paused:
    """Commit the pause, then announce it to every worker. Neither SQLAlchemy nor aio-pika
    is imported on this path (psycopg, and pika with a confirm): their import was most of the
    command's time, while the workers went on sending."""
    from workers.store import campaign_states

    paused = campaign_states.pause(settings.database_url, ref, f"pause: {reason}")
    _announce_control(settings, paused.id, "pause", paused.round)
    return paused


def _announce_control(settings: Settings, campaign_id: int, action: str, round_: int) -> None:
    """Publish a control announcement with pika and wait for its confirm (what
    :func:`workers.runtime.control.announce` publishes, without the event loop)."""
    from shared import brokers, contract
    from shared.contract import CONTENT_TYPE, CampaignControl
    from shared.topology import CONTROL_EXCHANGE

    body = contract.encode(
        contract.build(CampaignControl, campaign_id=campaign_id, action=action, round=round_)
    )
    brokers.publish_confirmed(
        settings.amqp_url,
        CONTROL_EXCHANGE,
        "",
        body,
        message_id=f"control-{campaign_id}-{action}-{round_}",
        content_type=CONTENT_TYPE,
        connection_name="nudge-cli",
    )


@campaign.command("resume")
@click.argument("ref")
@click.pass_context
def campaign_resume(ctx: click.Context, ref: str) -> None:
    """Resume campaign REF: exactly the recipients without a final outcome are sent."""
    from workers.store import campaigns

    settings = load_settings(ctx)
    with _errors():
        with database(settings, write=True) as conn:
            found = _find(conn, ref)
            round_ = campaigns.resume(conn, found)
        _announce(settings, plan=(found.id, round_), control=(found.id, "resume", round_))
    click.echo(f"campaign {found.name!r} resumed")


@campaign.command("cancel")
@click.argument("ref")
@click.option("--reason", default="cancelled by an operator", show_default=True)
@click.pass_context
def campaign_cancel(ctx: click.Context, ref: str, reason: str) -> None:
    """Cancel campaign REF: recipients not sent are recorded cancelled."""
    settings = load_settings(ctx)
    with _errors():
        found, n = cancel(settings, ref, reason)
    click.echo(f"campaign {found.name!r} cancelled: {n} recipients recorded cancelled")


def cancel(settings: Settings, ref: str, reason: str) -> tuple[Campaign, int]:
    """Commit the cancel (recording the recipients not claimed yet ``cancelled``), then
    announce it to every worker; returns the campaign and how many were recorded (also used
    by ``nudge message cancel``)."""
    from workers.store import campaigns

    with database(settings, write=True) as conn:
        found = _find(conn, ref)
        round_, n = campaigns.cancel(conn, found, reason)
    _announce(settings, control=(found.id, "cancel", round_))
    return found, n


@campaign.command("retry-failed")
@click.argument("ref")
@click.pass_context
def campaign_retry_failed(ctx: click.Context, ref: str) -> None:
    """Send campaign REF again to the recipients whose outcome is failed, and nobody else."""
    from workers.store import campaigns

    settings = load_settings(ctx)
    with _errors():
        with database(settings, write=True) as conn:
            found = _find(conn, ref)
            round_, n = campaigns.retry_failed(conn, found)
        if n:
            _announce(settings, plan=(found.id, round_), control=(found.id, "resume", round_))
    click.echo(
        f"campaign {found.name!r}: {n} failed recipients planned again"
        if n
        else f"campaign {found.name!r}: no failed recipients"
    )


def campaign_summary(conn: Connection, found: Campaign) -> dict[str, Any]:
    """What `campaign status --json` prints for one campaign."""
    from workers.recipients import UNFINISHED
    from workers.store import audiences, campaigns, tracking

    counts = campaigns.progress(conn, found)
    counts.update(tracking.counts(conn, found.id))
    total = found.planned
    remaining = sum(counts[s.value] for s in UNFINISHED)
    done = total - remaining
    rate = eta = None
    if found.started_at is not None and done:
        end = found.finished_at or datetime.now(UTC)
        elapsed = max((end - found.started_at).total_seconds(), 1e-3)
        rate = round(done / elapsed, 1)
        eta = round(remaining / rate, 1) if remaining and found.state == "sending" else None
    return {
        "id": found.id,
        "name": found.name,
        "state": found.state,
        "reason": found.status_reason,
        "template": found.template,
        "channel": found.channel,
        "audience": audiences.describe(found.audience),
        "exclude": {
            "events": found.exclude_events,
            "scope": found.exclude_scope,
            "within_seconds": found.exclude_within_seconds,
        },
        "recipients": total,
        "done": done,
        "remaining": remaining,
        "counts": counts,
        "rate_per_second": rate,
        "eta_seconds": eta,
        "round": found.plan_round,
        "start_at": found.start_at,
        "started_at": found.started_at,
        "finished_at": found.finished_at,
    }


def exclusion_text(exclude: dict[str, Any]) -> str:
    """``unless the recipient did E1 or E2 <scope>`` for a campaign's exclusion events."""
    from workers.durations import format_duration

    scope = {
        "ever": "ever",
        "since_scheduled": "since the campaign was created",
    }.get(exclude["scope"]) or (
        f"within {format_duration(timedelta(seconds=exclude['within_seconds']))} before the send"
    )
    return f"unless the recipient did {' or '.join(exclude['events'])} {scope}"


def progress_line(s: dict[str, Any]) -> str:
    """One line of a campaign's progress: final/recipients, rate, ETA, counts."""
    counts = s["counts"]
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    rate = f", {s['rate_per_second']}/s" if s["rate_per_second"] else ""
    eta = f", ETA {s['eta_seconds']:.0f} s" if s["eta_seconds"] is not None else ""
    return f"{s['done']}/{s['recipients']} final{rate}{eta}" + (f" ({shown})" if shown else "")


@campaign.command("status")
@click.argument("ref")
@page_options(limit=0)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def campaign_status(
    ctx: click.Context, ref: str, limit: int, status: str | None, after: int, as_json: bool
) -> None:
    """Progress of campaign REF: recipients per outcome, read, opened and clicked (emails),
    rate and ETA; with --limit or --status, a page of its recipients too (with --status
    alone, 50 of them)."""
    settings = load_settings(ctx)
    if status is not None and limit == 0:
        limit = 50
    with _errors(), database(settings) as conn:
        s = campaign_summary(conn, _find(conn, ref))
        if limit:
            s["recipients_page"] = recipient_page(conn, s["id"], status, after, limit)
    if as_json:
        print_json(s)
        return
    click.echo(
        f"campaign {s['name']!r} (id {s['id']}): {s['state']}"
        + (f" ({s['reason']})" if s["reason"] else "")
    )
    click.echo(f"  {s['template']} via {s['channel']} to {s['audience']}")
    if s["exclude"]["events"]:
        click.echo(f"  {exclusion_text(s['exclude'])}")
    click.echo(f"  {progress_line(s)}")
    if limit:
        echo_page(s["recipients_page"], status)


@campaign.command("watch")
@click.argument("ref")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1))
@click.pass_context
def campaign_watch(ctx: click.Context, ref: str, interval: float) -> None:
    """A live progress bar of campaign REF until it completes or is cancelled."""
    settings = load_settings(ctx)
    with _errors():
        with database(settings) as conn:
            s = campaign_summary(conn, _find(conn, ref))
        with click.progressbar(
            length=max(1, s["recipients"]), label=s["name"], show_pos=True, show_percent=True
        ) as bar:
            shown = 0
            while True:
                with database(settings) as conn:
                    s = campaign_summary(conn, _find(conn, str(s["id"])))
                bar.length = max(1, s["recipients"])
                bar.update(s["done"] - shown)
                shown = s["done"]
                bar.label = f"{s['name']} [{s['state']}]"
                if s["state"] in ("completed", "cancelled"):
                    break
                time.sleep(interval)
    click.echo(f"campaign {s['name']!r} {s['state']}: {progress_line(s)}")


@campaign.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def campaign_list(ctx: click.Context, as_json: bool) -> None:
    """Every campaign with its state and progress."""
    from workers.store import campaigns

    settings = load_settings(ctx)
    with _errors(), database(settings) as conn:
        rows = [campaign_summary(conn, c) for c in campaigns.all_campaigns(conn)]
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no campaigns")
    for s in rows:
        click.echo(f"{s['id']:>5}  {s['name']:<24} {s['state']:<10} {progress_line(s)}")
