"""Behavioural targeting: campaign audiences by what contacts did (or did not do) within a
window, with attribute filters, frozen at start; and campaign exclusion events checked at
send time like a single message's. The nudge CLI in subprocesses, real workers."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, text

from producer import Producer
from tests.support import Worker, nudge, wait_for
from workers.config import Settings
from workers.store import templates
from workers.store.schema import contact_events

pytestmark = pytest.mark.acceptance

FINAL = ("sent", "failed", "excluded", "suppressed", "expired", "cancelled")


def ok(settings: Settings, *args: str) -> str:
    done = nudge(settings, *args)
    assert done.returncode == 0, f"nudge {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def track(settings: Settings, engine: Engine, *events: tuple[str, str, str, float]) -> None:
    """(contact, tier, event, days ago) each, recorded by the events worker."""
    now = datetime.now(UTC)
    with Producer(settings.amqp_url) as producer:
        for contact, tier, event, days in events:
            producer.track(
                {"id": contact, "attributes": {"tier": tier}},
                event,
                occurred_at=now - timedelta(days=days),
            )
    with engine.connect() as conn:
        wait_for(
            lambda: len(conn.execute(select(contact_events.c.id)).all()) >= len(events),
            message="the events recorded",
        )


def outcomes(engine: Engine, campaign: str) -> dict[str, tuple[str, str | None]]:
    """external id -> (status, reason) of each recipient of ``campaign``."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.external_id, mi.status, mi.reason FROM message_items mi "
                "JOIN messages m ON m.id = mi.message_id JOIN contacts c ON c.id = mi.contact_id "
                "WHERE m.name = :n"
            ),
            {"n": campaign},
        )
        return {r.external_id: (r.status, r.reason) for r in rows}


def run(settings: Settings, engine: Engine, name: str, *options: str) -> dict[str, Any]:
    """Create, start and wait for campaign ``name``; its recipients' outcomes."""
    ok(
        settings,
        "campaign",
        "create",
        name,
        "--template",
        "promo",
        "--channel",
        "webhook",
        *options,
    )
    ok(settings, "campaign", "start", name)
    wait_for(
        lambda: (
            json.loads(ok(settings, "campaign", "status", name, "--json"))["state"] == "completed"
        ),
        timeout=60,
        interval=0.3,
        message=f"campaign {name} to complete",
    )
    return outcomes(engine, name)


@pytest.fixture
def setup(settings: Settings, engine: Engine, start_worker: Callable[..., Worker]) -> None:
    with engine.begin() as conn:
        templates.add(conn, "promo", "Hello {{ contact.id }}", "News", None)
    start_worker("events", "dispatch", "planner", concurrency=1)
    track(
        settings,
        engine,
        ("recent-vip", "vip", "purchased", 10),
        ("old-vip", "vip", "purchased", 40),
        ("recent-free", "free", "purchased", 5),
        ("never-vip", "vip", "login", 1),
    )


def test_an_audience_by_behaviour_and_attributes_reaches_exactly_the_matching_contacts(
    setup: None, settings: Settings, engine: Engine
) -> None:
    created = ok(
        settings,
        "campaign",
        "create",
        "loyal",
        "--template",
        "promo",
        "--channel",
        "webhook",
        "--where",
        "tier=vip",
        "--did",
        "purchased:30d",
    )
    assert "contacts where tier=vip, who did purchased within 30d, 1 matching now" in created
    ok(settings, "campaign", "start", "loyal")
    assert set(outcomes(engine, "loyal")) == {"recent-vip"}, "frozen at start"
    lapsed = run(settings, engine, "lapsed", "--where", "tier=vip", "--did-not", "purchased:30d")
    assert lapsed == {"old-vip": ("sent", None), "never-vip": ("sent", None)}
    buyers = run(settings, engine, "buyers", "--did", "purchased:30d")
    assert buyers == {"recent-vip": ("sent", None), "recent-free": ("sent", None)}
    shown = json.loads(ok(settings, "campaign", "status", "buyers", "--json"))
    assert shown["audience"] == "contacts who did purchased within 30d"


def test_a_campaigns_exclusion_events_are_checked_at_send_time_with_a_single_messages_scopes(
    setup: None, settings: Settings, engine: Engine
) -> None:
    # an upgrade long ago, and one after the campaign was created
    track(settings, engine, ("upgraded-long-ago", "vip", "upgrade_subscription", 3))
    ok(
        settings,
        "campaign",
        "create",
        "upsell",
        "--template",
        "promo",
        "--channel",
        "webhook",
        "--all",
        "--exclude-event",
        "upgrade_subscription",
    )
    track(settings, engine, ("upgraded-now", "free", "upgrade_subscription", 0))
    ok(settings, "campaign", "start", "upsell")
    wait_for(
        lambda: all(s in FINAL for s, _ in outcomes(engine, "upsell").values()),
        message="every recipient final",
    )
    upsell = outcomes(engine, "upsell")
    status, reason = upsell.pop("upgraded-now")
    assert status == "excluded"
    assert reason is not None
    assert reason.startswith("excluded: upgrade_subscription at ")
    # since the campaign was created: the old upgrade does not count
    assert {s for s, _ in upsell.values()} == {"sent"}
    shown = ok(settings, "campaign", "status", "upsell")
    assert "unless the recipient did upgrade_subscription since the campaign was created" in shown
    ever = run(
        settings,
        engine,
        "ever",
        "--all",
        "--exclude-event",
        "upgrade_subscription",
        "--exclude-scope",
        "ever",
    )
    assert {c for c, (s, _) in ever.items() if s == "excluded"} == {
        "upgraded-long-ago",
        "upgraded-now",
    }
    within = run(
        settings,
        engine,
        "within",
        "--all",
        "--exclude-event",
        "upgrade_subscription",
        "--exclude-scope",
        "within",
        "--exclude-within",
        "1d",
    )
    assert {c for c, (s, _) in within.items() if s == "excluded"} == {"upgraded-now"}


def test_bad_targeting_options_are_refused_naming_the_option(
    settings: Settings, engine: Engine
) -> None:
    with engine.begin() as conn:
        templates.add(conn, "promo", "Hello {{ contact.id }}", "News", None)
    base = ("campaign", "create", "x", "--template", "promo", "--channel", "webhook")
    for extra, expected in (
        (("--did", "purchased"), "audience: bad --did 'purchased': expected EVENT:WINDOW"),
        (("--did-not", "purchased:soon"), "audience: bad --did-not 'purchased:soon': the window"),
        (
            ("--all", "--exclude-event", "x", "--exclude-scope", "within"),
            "exclude_within: --exclude-within is required with --exclude-scope within",
        ),
        (("--all", "--exclude-event", "bad name"), "exclude_events: 'bad name' is not an event"),
    ):
        done = nudge(settings, *base, *extra)
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr
