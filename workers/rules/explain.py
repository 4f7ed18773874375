"""``nudge rules explain``: what a rule would do for one contact if its event happened now.

The delay comes from the rule's own policy with the contact's stored facts; the checks are the
dispatch worker's (:func:`workers.checks.decide`) over the facts the store's check queries
fetch, each check asked on its own (the others switched off) and then all together, as
dispatch would decide if the message fell due now.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime

from shared.contract import ContactRef, TrackEvent
from shared.errors import NotFound
from workers import checks
from workers.checks import Decision, Defer, Record
from workers.policies import Policy
from workers.recipients import Claimed, Event, MessageStatus, Sent
from workers.rules import firing
from workers.rules.definitions import Rule
from workers.rules.delay_policies import ContactFacts, Plan
from workers.store import checks as checks_repo
from workers.store import policies as policies_repo
from workers.store import rules as rules_repo
from workers.store.db import async_engine, transaction


@dataclass(frozen=True)
class Check:
    """One check's verdict now: ``pass``, ``fail`` or ``defer``, and why."""

    name: str
    verdict: str
    detail: str


@dataclass(frozen=True)
class Explanation:
    rule: str
    contact: str
    now: datetime
    plan: Plan
    priority: str
    checks: list[Check]
    decision: Check


def _verdict(name: str, decision: Decision) -> Check:
    if isinstance(decision, Record):
        return Check(name, "fail", f"{decision.status.value}: {decision.reason}")
    if isinstance(decision, Defer):
        return Check(name, "defer", str(decision.reason))
    return Check(name, "pass", "")


def judge(
    rule: Rule,
    claimed: Claimed,
    policy: Policy,
    now: datetime,
    interactions: list[Event],
    sent: list[Sent],
) -> tuple[list[Check], Check]:
    """Each check alone, then the whole decision, for a message of ``rule`` due ``now``."""
    off: dict[str, object] = {"bypass_caps": True, "interaction_events": (), "quiet_hours": None}
    caps = {**off, "bypass_caps": policy.bypass_caps}
    willing = dataclasses.replace(claimed, subscribed=True)
    unless = ", ".join(rule.exclude_events) or "none"
    # (check, who, only this check switched on, the facts it reads)
    alone: list[tuple[str, Claimed, dict[str, object], list[Event], list[Sent]]] = [
        ("subscription", claimed, off, [], []),
        (
            "interaction",
            willing,
            {**off, "interaction_events": policy.interaction_events},
            interactions,
            [],
        ),
        ("category", willing, {**caps, "frequency_cap": None, "channel_cap": None}, [], sent),
        ("frequency", willing, {**caps, "category_window_seconds": None}, [], sent),
        ("quiet_hours", willing, {**off, "quiet_hours": policy.quiet_hours}, [], []),
    ]
    out = [
        _verdict(
            name,
            checks.decide(
                c,
                policy.model_copy(update=update),
                now,
                excluded_by=None,
                interactions=events,
                sent=history,
            ),
        )
        for name, c, update, events, history in alone
    ]
    out.insert(
        1, Check("exclusion", "pass", f"only events after the trigger exclude (unless: {unless})")
    )
    overall = checks.decide(
        claimed, policy, now, excluded_by=None, interactions=interactions, sent=sent
    )
    return out, _verdict("decision", overall)


async def explain(database_url: str, rule: Rule, external_id: str, now: datetime) -> Explanation:
    """Explain ``rule`` for the contact ``external_id``; raises :class:`NotFound`."""
    engine = async_engine(database_url, pool_size=1)
    try:
        async with transaction(engine) as conn:
            found = await rules_repo.contacts(conn, [external_id])
            if external_id not in found:
                raise NotFound(f"no contact {external_id!r}: it appears with its first event")
            contact = found[external_id]
            event = TrackEvent(
                contact=ContactRef(id=external_id), name=rule.event[0], occurred_at=now
            )
            query = firing.activity_query(rule, contact, "", event)
            active = (await rules_repo.last_active(conn, [query]))[0] if query else None
            plan = rule.plan(now, ContactFacts(contact.attributes, contact.timezone, active))
            policy = (await policies_repo.load_all(conn))[rule.priority.value]
            interactions = await checks_repo.interactions(
                conn, [contact.id], policy.interaction_events, policy.interaction_window_seconds
            )
            window = max(policy.frequency_window_seconds, policy.category_window_seconds or 0)
            sent = await checks_repo.history(conn, [contact.id], window, [])
    finally:
        await engine.dispose()
    claimed = Claimed(
        message_id=0,
        contact_id=contact.id,
        attempts=1,
        failures=0,
        message_status=int(MessageStatus.NOT_STARTED),
        idempotency_key="",
        template=rule.template,
        channel=rule.channel.value,
        category=rule.category,
        priority=rule.priority.value,
        data=dict(rule.data),
        deliver_at=now,
        expires_at=None,
        external_id=external_id,
        email=None,
        phone=None,
        timezone=contact.timezone,
        attributes=contact.attributes,
        subscribed=contact.subscribed,
    )
    found_checks, decision = judge(
        rule, claimed, policy, now, interactions[contact.id], sent[contact.id]
    )
    return Explanation(
        rule.name, external_id, now, plan, rule.priority.value, found_checks, decision
    )
