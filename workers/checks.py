"""What a dispatch worker decides for a claimed recipient, in this order: status,
expiry, subscription, exclusion events, recent interaction, category dedup, frequency cap,
quiet hours, and only then a send. Pure functions over facts fetched for the whole batch.

Every decision not to send, or not yet, carries a :class:`~workers.reasons.Reason`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from workers.durations import format_duration
from workers.policies import Policy
from workers.reasons import Reason, ReasonRule
from workers.recipients import Claimed, Event, ItemStatus, MessageStatus, Sent


@dataclass(frozen=True)
class Send:
    """Go ahead."""


@dataclass(frozen=True)
class Record:
    """Do not send; record ``status`` with ``reason``."""

    status: ItemStatus
    reason: Reason


@dataclass(frozen=True)
class Defer:
    """Not now: check again at ``until``."""

    until: datetime
    reason: Reason


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
    interactions: Sequence[Event],
    sent: Sequence[Sent],
) -> Decision:
    """The decision for one recipient; ``sent`` is what the contact was sent recently (or is
    being sent), including earlier sends decided in the same batch."""
    if c.message_status == MessageStatus.CANCELLED:
        return Record(ItemStatus.CANCELLED, Reason(ReasonRule.CANCELLED, "message cancelled"))
    if c.expires_at is not None and c.expires_at <= now:
        return Record(ItemStatus.EXPIRED, Reason(ReasonRule.EXPIRED, f"at {_at(c.expires_at)}"))
    if not c.subscribed and not policy.bypass_subscription:
        return Record(
            ItemStatus.SUPPRESSED, Reason(ReasonRule.UNSUBSCRIBED, "the contact unsubscribed")
        )
    if excluded_by is not None:
        return Record(
            ItemStatus.EXCLUDED,
            Reason(ReasonRule.EXCLUDED, f"{excluded_by.name} at {_at(excluded_by.occurred_at)}"),
        )
    since = now - timedelta(seconds=policy.interaction_window_seconds)
    for event in interactions:
        if event.name in policy.interaction_events and event.occurred_at >= since:
            return Record(
                ItemStatus.EXCLUDED,
                Reason(
                    ReasonRule.INTERACTION,
                    f"{event.name} at {_at(event.occurred_at)}, "
                    f"within {_span(policy.interaction_window_seconds)}",
                ),
            )
    if not policy.bypass_caps:
        capped = _caps(c, policy, now, sent)
        if capped is not None:
            return capped
    quiet_until = policy.quiet_until(now, c.timezone)
    if quiet_until is not None:
        return Defer(
            quiet_until,
            Reason(
                ReasonRule.QUIET_HOURS,
                f"{policy.quiet_hours} in "
                f"{c.timezone or policy.default_timezone}, until {_at(quiet_until)}",
            ),
        )
    return SEND


#: While a recipient waits for the events role, it is checked again this often.
EVENTS_POLL_SECONDS = 0.25


def await_events(
    c: Claimed, recorded_until: datetime | None, now: datetime, wait_seconds: float
) -> Defer | None:
    """Before sending a message that lists exclusion events: None once every event published
    to ``nudge.events`` before the message was due is recorded (``recorded_until``, None
    when no events consumer runs); else check again shortly, and past ``wait_seconds`` after
    the due time, ``wait_seconds`` later."""
    if recorded_until is not None and recorded_until >= c.deliver_at:
        return None
    behind = (
        "no events consumer is running"
        if recorded_until is None
        else f"events recorded up to {recorded_until.isoformat(timespec='milliseconds')}"
    )
    due = f"due at {c.deliver_at.isoformat(timespec='milliseconds')}"
    if now - c.deliver_at < timedelta(seconds=wait_seconds):
        return Defer(
            now + timedelta(seconds=EVENTS_POLL_SECONDS),
            Reason(ReasonRule.EVENTS_BEHIND, f"{behind}, {due}: waiting"),
        )
    return Defer(
        now + timedelta(seconds=wait_seconds),
        Reason(
            ReasonRule.EVENTS_BEHIND,
            f"{behind}, {due}: not sent after waiting {_span(wait_seconds)}",
        ),
    )


def _caps(c: Claimed, policy: Policy, now: datetime, sent: Sequence[Sent]) -> Decision | None:
    if policy.category_window_seconds is not None and c.category is not None:
        since = now - timedelta(seconds=policy.category_window_seconds)
        same = [s.at for s in sent if s.category == c.category and s.at >= since]
        if same:
            return Record(
                ItemStatus.SUPPRESSED,
                Reason(
                    ReasonRule.CATEGORY,
                    f"{c.category} sent at "
                    f"{_at(max(same))}, within {_span(policy.category_window_seconds)}",
                ),
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
        reason = Reason(
            ReasonRule.FREQUENCY,
            f"{len(times)} sent on {scope} within "
            f"{_span(policy.frequency_window_seconds)} (cap {cap})",
        )
        if policy.cap_action == "defer":
            # the window frees when enough of the oldest sends in it age out
            return Defer(times[len(times) - cap] + window, reason)
        return Record(ItemStatus.SUPPRESSED, reason)
    return None
