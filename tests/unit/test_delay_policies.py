"""The delay policies give exactly the delay they promise: a base per tier, a factor for
active contacts, bounds, and wall-clock times in the contact's time zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import TypeAdapter

from workers.rules.delay_policies import Absolute, ByContact, ContactFacts, DelayPolicy, Fixed

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ACTIVE = T0 - timedelta(hours=3)
POLICY = ByContact.model_validate(
    {
        "policy": "contact",
        "attribute": "tier",
        "base": {"vip": "1h", "normal": "2h"},
        "otherwise": "24h",
        "active": {"events": ["login"], "within": "24h", "factor": 0.6},
        "min": "30m",
        "max": "20h",
    }
)


@pytest.mark.parametrize(
    ("tier", "active", "expected"),
    [
        ("vip", False, timedelta(hours=1)),
        ("vip", True, timedelta(minutes=36)),
        ("normal", False, timedelta(hours=2)),
        ("normal", True, timedelta(minutes=72)),
        ("trial", False, timedelta(hours=20)),  # 24h, bounded by max
        ("trial", True, timedelta(hours=14, minutes=24)),
        (None, False, timedelta(hours=20)),
        (None, True, timedelta(hours=14, minutes=24)),
    ],
)
def test_the_contact_policy_gives_the_tier_base_times_the_activity_factor_within_bounds(
    tier: str | None, active: bool, expected: timedelta
) -> None:
    facts = ContactFacts({"tier": tier} if tier else {}, None, ACTIVE if active else None)
    plan = POLICY.plan(T0, facts)
    assert plan.deliver_at - T0 == expected
    assert ("active at" in plan.why) == active


def test_the_minimum_holds_when_the_factor_would_go_below_it() -> None:
    assert POLICY.active is not None
    quick = POLICY.model_copy(update={"active": POLICY.active.model_copy(update={"factor": 0.1})})
    plan = quick.plan(T0, ContactFacts({"tier": "vip"}, None, ACTIVE))
    assert plan.deliver_at - T0 == timedelta(minutes=30)
    assert "bounded to 30m..20h" in plan.why


def test_a_numeric_attribute_matches_its_written_form() -> None:
    policy = TypeAdapter(DelayPolicy).validate_python(
        {"policy": "contact", "attribute": "level", "base": {"3": "5m"}, "otherwise": "1h"}
    )
    assert policy.plan(T0, ContactFacts({"level": 3}, None)).deliver_at - T0 == timedelta(minutes=5)


def test_a_bare_duration_is_a_fixed_delay() -> None:
    policy = TypeAdapter(DelayPolicy).validate_python("15m")
    assert isinstance(policy, Fixed)
    assert policy.plan(T0, ContactFacts({}, None)).deliver_at == T0 + timedelta(minutes=15)


@pytest.mark.parametrize(
    ("timezone", "expected"),
    [
        ("Europe/Paris", datetime(2026, 6, 2, 7, 0, tzinfo=UTC)),  # CEST, UTC+2
        ("America/New_York", datetime(2026, 6, 2, 13, 0, tzinfo=UTC)),  # EDT, UTC-4
        ("Asia/Tokyo", datetime(2026, 6, 2, 0, 0, tzinfo=UTC)),  # already 21:00 on June 1
        (None, datetime(2026, 6, 2, 9, 0, tzinfo=UTC)),  # the policy's default, UTC
    ],
)
def test_absolute_is_nine_the_next_day_in_the_contacts_time_zone(
    timezone: str | None, expected: datetime
) -> None:
    policy = Absolute(policy="absolute", at="09:00", days_after=1)
    assert policy.plan(T0, ContactFacts({}, timezone)).deliver_at == expected


def test_absolute_across_a_daylight_saving_change_keeps_the_wall_clock() -> None:
    # Paris moves to summer time in the night of 28 to 29 March 2026.
    evening = datetime(2026, 3, 28, 20, 0, tzinfo=UTC)  # 21:00 in Paris (CET)
    policy = Absolute(policy="absolute", at="09:00")
    assert policy.plan(evening, ContactFacts({}, "Europe/Paris")).deliver_at == datetime(
        2026, 3, 29, 7, 0, tzinfo=UTC
    )


def test_absolute_the_same_day_waits_for_tomorrow_once_the_time_has_passed() -> None:
    policy = Absolute(policy="absolute", at="09:00", days_after=0)
    morning = datetime(2026, 6, 1, 6, 0, tzinfo=UTC)
    assert policy.plan(morning, ContactFacts({}, None)).deliver_at == datetime(
        2026, 6, 1, 9, 0, tzinfo=UTC
    )
    assert policy.plan(T0, ContactFacts({}, None)).deliver_at == datetime(
        2026, 6, 2, 9, 0, tzinfo=UTC
    )
