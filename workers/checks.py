"""What a dispatch worker decides for a claimed recipient, in this order: status,
expiry, subscription, exclusion events, recent interaction, category dedup, frequency cap,
quiet hours, and only then a send. Pure functions over facts fetched for the whole batch.

A reason always reads ``rule: detail``; the rule is the metrics label.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from workers.durations import format_duration
from workers.policies import Policy
from workers.store.checks import Event, Sent
from workers.store.messages import Claimed
from workers.store.schema import ItemStatus, MessageStatus


@dataclass(frozen=True)
class Send:
    """Go ahead."""


@dataclass(frozen=True)
class Record:
    """Do not send; record ``status`` with ``reason``."""

    status: ItemStatus
    reason: str


@dataclass(frozen=True)
class Defer:
    """Not now: check again at ``until``."""

    until: datetime
    reason: str


Decision = Send | Record | Defer
SEND = Send()


def _at(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def _span(seconds: float) -> str:
    return format_duration(timedelta(seconds=seconds))


def decide(
    c: Claimed,
    policy: Policy,
    now: datetime,
    *,
    excluded_by: Event | None,
    interactions: list[Event],
    sent: list[Sent],
) -> Decision:
    """The decision for one recipient; ``sent`` is what the contact was sent recently (or is
    being sent), including earlier sends decided in the same batch."""
    if c.message_status == MessageStatus.CANCELLED:
        return Record(ItemStatus.CANCELLED, "cancelled: message cancelled")
    if c.expires_at is not None and c.expires_at <= now:
        return Record(ItemStatus.EXPIRED, f"expired: at {_at(c.expires_at)}")
    if not c.subscribed and not policy.bypass_subscription:
        return Record(ItemStatus.SUPPRESSED, "unsubscribed: the contact unsubscribed")
    if excluded_by is not None:
        return Record(
            ItemStatus.EXCLUDED, f"excluded: {excluded_by.name} at {_at(excluded_by.occurred_at)}"
        )
    since = now - timedelta(seconds=policy.interaction_window_seconds)
    for event in interactions:
        if event.name in policy.interaction_events and event.occurred_at >= since:
            return Record(
                ItemStatus.EXCLUDED,
                f"interaction: {event.name} at "
                f"{_at(event.occurred_at)}, within "
                f"{_span(policy.interaction_window_seconds)}",
            )
    if not policy.bypass_caps:
        capped = _caps(c, policy, now, sent)
        if capped is not None:
            return capped
    quiet_until = policy.quiet_until(now, c.timezone)
    if quiet_until is not None:
        return Defer(
            quiet_until,
            f"quiet_hours: {policy.quiet_hours} in "
            f"{c.timezone or policy.default_timezone}, until {_at(quiet_until)}",
        )
    return SEND


def _caps(c: Claimed, policy: Policy, now: datetime, sent: list[Sent]) -> Decision | None:
    if policy.category_window_seconds is not None and c.category is not None:
        since = now - timedelta(seconds=policy.category_window_seconds)
        same = [s.at for s in sent if s.category == c.category and s.at >= since]
        if same:
            return Record(
                ItemStatus.SUPPRESSED,
                f"category: {c.category} sent at "
                f"{_at(max(same))}, within {_span(policy.category_window_seconds)}",
            )
    window = timedelta(seconds=policy.frequency_window_seconds)
    for cap, scope in (
        (policy.frequency_cap, "all channels"),
        (policy.channel_cap, f"channel {c.channel}"),
    ):
        if cap is None:
            continue
        times = sorted(
            s.at
            for s in sent
            if s.at >= now - window and (scope == "all channels" or s.channel == c.channel)
        )
        if len(times) < cap:
            continue
        reason = (
            f"frequency: {len(times)} sent on {scope} within "
            f"{_span(policy.frequency_window_seconds)} (cap {cap})"
        )
        if policy.cap_action == "defer":
            # the window frees when enough of the oldest sends in it age out
            return Defer(times[len(times) - cap] + window, reason)
        return Record(ItemStatus.SUPPRESSED, reason)
    return None
