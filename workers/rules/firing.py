"""Firing automation rules: for each recorded event, the enabled rules it triggers become
scheduled messages, published to ``nudge.intake`` like :meth:`producer.Producer.schedule`
does, so the scheduler stores them and puts them in the delay.

Idempotent per (rule, event): the idempotency key is made of the rule's name and the event id,
so a redelivered or re-published event schedules nothing twice. A run-once rule claims
(rule, contact) in ``rule_runs`` in the same transaction that records the event: of two
concurrent events, one fires, and a redelivery of that one fires again under the same key.

The message's exclusion events count from just after the trigger event, so the trigger never
excludes its own message (an inactivity rule's exclusion is its own trigger).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from shared import contract
from shared.contract import ContactRef, ScheduleMessage, TrackEvent
from shared.errors import InvalidMessage
from workers.rules.definitions import Rule
from workers.rules.delay_policies import ByContact, ContactFacts
from workers.store import rules as rules_repo
from workers.store.rules import ActivityQuery, Contact

log = structlog.get_logger("nudge.rules")

#: The AMQP header naming the rule on the messages rules publish to ``nudge.intake``: the
#: scheduler stores them as kind ``rule`` (a service's own messages are kind ``single``).
RULE_HEADER = "x-nudge-rule"

#: Timestamps are stored to the microsecond: events from this long after the trigger exclude.
AFTER_TRIGGER = timedelta(microseconds=1)


def message_key(rule: str, event_id: str) -> str:
    """The idempotency key of the message ``rule`` schedules for event ``event_id``."""
    key = f"rule:{rule}:{event_id}"
    if len(key) <= 200:
        return key
    digest = hashlib.sha256(f"{rule}\0{event_id}".encode()).hexdigest()
    return f"rule:{rule[:100]}:{digest}"


def activity_query(
    rule: Rule, contact: Contact, event_id: str, event: TrackEvent
) -> ActivityQuery | None:
    """What the rule's delay policy needs to know about the contact's recent activity."""
    policy = rule.delay
    if not isinstance(policy, ByContact) or policy.active is None:
        return None
    return ActivityQuery(
        contact.id,
        event_id,
        event.occurred_at,
        policy.active.within.total_seconds(),
        policy.active.events,
    )


def request(
    rule: Rule, contact: Contact, event: TrackEvent, facts: ContactFacts
) -> ScheduleMessage:
    """The scheduled message ``rule`` makes of ``event``; raises :class:`InvalidMessage`."""
    plan = rule.plan(event.occurred_at, facts)
    return contract.build(
        ScheduleMessage,
        contact=ContactRef(id=contact.external_id),
        template=rule.template,
        channel=rule.channel,
        deliver_at=plan.deliver_at,
        expires_at=plan.deliver_at + rule.expires_after if rule.expires_after else None,
        exclude_events=rule.exclude_events,
        exclude_since=event.occurred_at + AFTER_TRIGGER,
        category=rule.category,
        priority=rule.priority,
        data={**rule.data, **event.data},
    )


@dataclass(frozen=True)
class Firing:
    """A message to publish to ``nudge.intake`` under ``key``."""

    rule: str
    key: str
    request: ScheduleMessage


async def fire(conn: AsyncConnection, events: Sequence[tuple[str, TrackEvent]]) -> list[Firing]:
    """The messages the enabled rules make of ``events`` (already recorded in this
    transaction), in a constant number of statements. A rule whose message would be invalid
    is logged and skipped: the event stays recorded."""
    rules = await rules_repo.matching(conn, {e.name for _, e in events})
    if not rules:
        return []
    ordered = sorted(dict(events).items(), key=lambda p: (p[1].occurred_at, p[0]))
    found = await rules_repo.contacts(conn, {e.contact.id for _, e in ordered})
    pairs = [
        (rule, event_id, event, found[event.contact.id])
        for event_id, event in ordered
        for rule in rules
        if event.name in rule.event and event.contact.id in found
    ]
    queries = [activity_query(r, c, i, e) for r, i, e, c in pairs]
    asked = [q for q in queries if q is not None]
    answers = iter(await rules_repo.last_active(conn, asked))
    active = [next(answers) if q is not None else None for q in queries]
    claimed = await rules_repo.claim_runs(
        conn, [(r.name, c.id, i) for r, i, _, c in pairs if r.run_once]
    )
    out: list[Firing] = []
    for (rule, event_id, event, contact), active_at in zip(pairs, active, strict=True):
        if rule.run_once and (rule.name, contact.id, event_id) not in claimed:
            continue
        facts = ContactFacts(contact.attributes, contact.timezone, active_at)
        try:
            req = request(rule, contact, event, facts)
        except InvalidMessage as exc:
            log.error(
                "rule makes an invalid message, skipped",
                rule=rule.name,
                event_id=event_id,
                reason=exc.reason,
            )
            continue
        out.append(Firing(rule.name, message_key(rule.name, event_id), req))
    return out
