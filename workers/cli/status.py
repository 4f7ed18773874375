"""``nudge status``: what waits in RabbitMQ and what Postgres recorded, on one screen.

Queues come from the RabbitMQ management API (``NUDGE_RABBITMQ_MGMT_URL``): depth, ready,
unacked, consumers and the publish/deliver rates RabbitMQ measures. Outcomes come from
Postgres: recipients by status, in all and over the recent window, and the rate at which
they reach a final status. Campaigns will add a section here.
"""

from __future__ import annotations

import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import Any

import click
import httpx

from shared import brokers, topology
from shared.errors import BrokerUnavailable
from workers.cli.base import DURATION, database, errors, load_settings, print_json
from workers.config import Settings
from workers.store import stats


def queues(settings: Settings) -> list[dict[str, Any]]:
    """Nudge's queues in the configured vhost, the delay ladder summed into one row."""
    mgmt = urllib.parse.urlsplit(settings.rabbitmq_mgmt_url)
    vhost = brokers.vhost(settings.amqp_url)
    url = f"{mgmt.scheme}://{mgmt.hostname}:{mgmt.port}/api/queues/"
    try:
        r = httpx.get(
            url + urllib.parse.quote(vhost, safe=""),
            timeout=10,
            auth=(mgmt.username or "guest", mgmt.password or "guest"),
        )
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise BrokerUnavailable(f"RabbitMQ management API at {url}: {exc}") from exc
    ours = {q.name for q in topology.build("tiers").queues} | {topology.DUE_QUEUE}
    rows: dict[str, dict[str, Any]] = {}
    for q in r.json():
        name = q["name"]
        if name not in ours and not name.startswith("nudge."):
            continue
        key = "nudge.delay.*" if name.startswith("nudge.delay.") else name
        stats_ = q.get("message_stats", {})
        row = rows.setdefault(
            key,
            {
                "queue": key,
                "messages": 0,
                "ready": 0,
                "unacked": 0,
                "consumers": 0,
                "publish_rate": 0.0,
                "deliver_rate": 0.0,
            },
        )
        row["messages"] += q.get("messages", 0)
        row["ready"] += q.get("messages_ready", 0)
        row["unacked"] += q.get("messages_unacknowledged", 0)
        row["consumers"] += q.get("consumers", 0)
        row["publish_rate"] += stats_.get("publish_details", {}).get("rate", 0.0)
        row["deliver_rate"] += stats_.get("deliver_get_details", {}).get("rate", 0.0)
    return sorted(rows.values(), key=lambda row: str(row["queue"]))


@click.command("status")
@click.option(
    "--window",
    type=DURATION,
    default="5m",
    show_default=True,
    help="The recent period for outcomes and their rate.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, window: timedelta, as_json: bool) -> None:
    """Queues (depth, consumers, rates), recipient outcomes (in all, recently, rate) and the
    campaigns that are not finished."""
    from workers.cli.campaigns import campaign_summary, progress_line
    from workers.store import campaigns as campaigns_repo

    settings = load_settings(ctx)
    with errors():
        rows = queues(settings)
        with database(settings) as conn:
            outcomes = stats.outcomes(conn, window)
            active = [
                s
                for s in (campaign_summary(conn, c) for c in campaigns_repo.all_campaigns(conn))
                if s["state"] not in ("completed", "cancelled")
            ]
    now = datetime.now(UTC)
    oldest = outcomes.oldest_sending
    doc = {
        "queues": rows,
        "outcomes": {
            "window_seconds": window.total_seconds(),
            "total": outcomes.total,
            "recent": outcomes.recent,
            "final_per_second": round(outcomes.rate, 2),
            "scheduled_not_due": outcomes.scheduled,
            "oldest_sending_seconds": round((now - oldest).total_seconds(), 1) if oldest else None,
        },
        "campaigns": active,
    }
    if as_json:
        print_json(doc)
        return
    click.echo(
        f"{'queue':<16} {'messages':>9} {'ready':>8} {'unacked':>8} {'consumers':>9} "
        f"{'in/s':>8} {'out/s':>8}"
    )
    for q in rows:
        click.echo(
            f"{q['queue']:<16} {q['messages']:>9} {q['ready']:>8} {q['unacked']:>8} "
            f"{q['consumers']:>9} {q['publish_rate']:>8.1f} {q['deliver_rate']:>8.1f}"
        )
    click.echo("")
    statuses = sorted(set(outcomes.total) | set(outcomes.recent))
    click.echo(f"{'outcome':<16} {'total':>9} {'last ' + _short(window):>12}")
    for s in statuses:
        click.echo(f"{s:<16} {outcomes.total.get(s, 0):>9} {outcomes.recent.get(s, 0):>12}")
    click.echo(
        f"\nfinal outcomes: {outcomes.rate:.1f}/s over the last {_short(window)}; "
        f"{outcomes.scheduled} messages scheduled, not yet due"
    )
    if oldest is not None:
        click.echo(f"oldest sending claim: {(now - oldest).total_seconds():.0f} s ago")
    click.echo("")
    if not active:
        click.echo("no campaign in progress")
    for c in active:
        click.echo(f"campaign {c['name']!r} {c['state']}: {progress_line(c)}")


def _short(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
