"""The checks before a send, at the edges of every window (one second inside, one second
outside), on the pure decision function with an exact clock."""

from __future__ import annotations

import ast
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from workers import checks
from workers.checks import SEND, Defer, Record, decide
from workers.policies import DEFAULTS, Policy
from workers.reasons import Reason, ReasonRule
from workers.recipients import Claimed, Event, ItemStatus, MessageStatus, Sent

NOW = datetime(2026, 6, 15, 12, 0, 0, tzinfo=UTC)
S = timedelta(seconds=1)
DAY = timedelta(days=1)

CLAIMED = Claimed(
    message_id=1,
    contact_id=7,
    attempts=1,
    failures=0,
    message_status=0,
    idempotency_key="k",
    template="trial_end",
    channel="webhook",
    category="billing",
    priority="automation",
    data={},
    deliver_at=NOW,
    expires_at=None,
    external_id="42",
    email=None,
    phone=None,
    timezone=None,
    attributes={},
    subscribed=True,
)
POLICY = Policy()


def run(
    c: Claimed = CLAIMED,
    policy: Policy = POLICY,
    *,
    excluded_by: Event | None = None,
    interactions: list[Event] | None = None,
    sent: list[Sent] | None = None,
) -> object:
    return decide(
        c, policy, NOW, excluded_by=excluded_by, interactions=interactions or [], sent=sent or []
    )


def test_a_clean_recipient_is_sent() -> None:
    assert run() == SEND


def test_cancelled_and_expired_come_first() -> None:
    cancelled = replace(CLAIMED, message_status=int(MessageStatus.CANCELLED), subscribed=False)
    assert run(cancelled) == Record(
        ItemStatus.CANCELLED, Reason(ReasonRule.CANCELLED, "message cancelled")
    )
    expired = replace(CLAIMED, expires_at=NOW)
    decision = run(expired)
    assert isinstance(decision, Record)
    assert decision.status is ItemStatus.EXPIRED
    assert run(replace(CLAIMED, expires_at=NOW + S)) == SEND


def test_unsubscribed_contacts_are_suppressed_unless_the_policy_bypasses() -> None:
    gone = replace(CLAIMED, subscribed=False)
    assert run(gone) == Record(
        ItemStatus.SUPPRESSED, Reason(ReasonRule.UNSUBSCRIBED, "the contact unsubscribed")
    )
    assert run(gone, DEFAULTS["transactional"]) == SEND  # type: ignore[index]


def test_an_exclusion_event_names_itself() -> None:
    decision = run(excluded_by=Event("upgrade_subscription", NOW - DAY))
    assert decision == Record(
        ItemStatus.EXCLUDED,
        Reason(ReasonRule.EXCLUDED, "upgrade_subscription at 2026-06-14T12:00:00+00:00"),
    )


def test_recent_interaction_edges() -> None:
    policy = Policy(interaction_events=("support_open",), interaction_window_seconds=7200)
    inside = run(policy=policy, interactions=[Event("support_open", NOW - 2 * 3600 * S + S)])
    assert isinstance(inside, Record)
    assert inside.status is ItemStatus.EXCLUDED
    assert str(inside.reason).startswith("interaction: support_open at")
    outside = run(policy=policy, interactions=[Event("support_open", NOW - 2 * 3600 * S - S)])
    assert outside == SEND
    other = run(policy=policy, interactions=[Event("login", NOW)])
    assert other == SEND


def test_category_dedup_edges() -> None:
    window = 72 * 3600 * S
    inside = run(sent=[Sent(NOW - window + S, "log", "billing")])
    assert isinstance(inside, Record)
    assert inside.status is ItemStatus.SUPPRESSED
    assert str(inside.reason).startswith("category: billing sent at")
    assert run(sent=[Sent(NOW - window - S, "log", "billing")]) == SEND
    assert run(sent=[Sent(NOW, "log", "other")]) == SEND


def test_frequency_cap_edges() -> None:
    policy = Policy(category_window_seconds=None)
    two = [Sent(NOW - timedelta(hours=h), "log", None) for h in (1, 2)]
    assert run(policy=policy, sent=[*two, Sent(NOW - DAY - S, "log", None)]) == SEND
    capped = run(policy=policy, sent=[*two, Sent(NOW - DAY + S, "log", None)])
    assert capped == Record(
        ItemStatus.SUPPRESSED,
        Reason(ReasonRule.FREQUENCY, "3 sent on all channels within 1d (cap 3)"),
    )


def test_a_capped_message_is_deferred_to_when_the_window_frees() -> None:
    policy = Policy(category_window_seconds=None, cap_action="defer")
    sends = [Sent(NOW - timedelta(hours=h), "log", None) for h in (20, 5, 1)]
    decision = run(policy=policy, sent=sends)
    assert isinstance(decision, Defer)
    assert decision.until == NOW - timedelta(hours=20) + DAY  # the oldest ages out


def test_the_channel_cap_counts_only_its_channel() -> None:
    policy = Policy(frequency_cap=None, channel_cap=1, category_window_seconds=None)
    assert run(policy=policy, sent=[Sent(NOW, "log", None)]) == SEND
    decision = run(policy=policy, sent=[Sent(NOW, "webhook", None)])
    assert isinstance(decision, Record)
    assert str(decision.reason).startswith("frequency: 1 sent on channel webhook")


def test_transactional_messages_bypass_caps_and_dedup() -> None:
    many = [Sent(NOW, "webhook", "billing")] * 10
    assert run(policy=DEFAULTS["transactional"], sent=many) == SEND  # type: ignore[index]


@pytest.mark.parametrize(
    ("zone", "local_now", "opening"),
    [
        # quiet 22:00-08:00, crossing midnight: at 23:30 local it opens at 08:00 the next day
        ("Asia/Tokyo", "2026-06-15T23:30:00+09:00", "2026-06-16T08:00:00+09:00"),
        # at 02:00 local, the same night: it opens at 08:00 that day
        ("America/New_York", "2026-06-15T02:00:00-04:00", "2026-06-15T08:00:00-04:00"),
    ],
)
def test_quiet_hours_defer_to_the_local_opening(zone: str, local_now: str, opening: str) -> None:
    policy = Policy(quiet_hours="22:00-08:00")
    now = datetime.fromisoformat(local_now).astimezone(UTC)
    c = replace(CLAIMED, timezone=zone)
    decision = decide(c, policy, now, excluded_by=None, interactions=[], sent=[])
    assert isinstance(decision, Defer)
    assert decision.until == datetime.fromisoformat(opening)
    assert str(decision.reason).startswith(f"quiet_hours: 22:00-08:00 in {zone}")


def test_quiet_hours_edges() -> None:
    policy = Policy(quiet_hours="22:00-08:00")

    def at(hms: str) -> datetime:
        return datetime.fromisoformat(f"2026-06-15T{hms}+00:00")

    for awake in ("21:59:59", "08:00:00"):
        assert policy.quiet_until(at(awake), "UTC") is None, awake
    for asleep in ("22:00:00", "07:59:59"):
        assert policy.quiet_until(at(asleep), "UTC") is not None, asleep
    daytime = Policy(quiet_hours="12:00-14:00")
    assert daytime.quiet_until(at("13:00:00"), "UTC") == at("14:00:00")
    assert daytime.quiet_until(at("14:00:01"), "UTC") is None


def test_the_decision_core_imports_no_store_module() -> None:
    tree = ast.parse(Path(checks.__file__).read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert [m for m in imported if m and m.startswith("workers.store")] == []
