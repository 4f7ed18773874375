"""Repository for messages, their recipients (``message_items``) and contacts.

Batch work takes a constant number of statements per batch: ``unnest`` over arrays, never one
round trip per recipient.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection, bindparam, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.contract import ScheduleMessage
from workers.reasons import Reason, ReasonRule
from workers.recipients import Claimed, ItemOutcome, ItemState, ItemStatus, Key, MessageStatus
from workers.store import contacts as contacts_repo
from workers.store.db import Statement
from workers.store.schema import contacts, message_items, message_keys, messages


@dataclass(frozen=True)
class StoredMessage:
    """What the scheduler needs to publish a message into the delay."""

    id: int
    contact_id: int
    deliver_at: datetime
    idempotency_key: str


#: The claim query's columns, in the order of :class:`Claimed`'s fields.
_CLAIMED_COLUMNS = tuple(f.name for f in fields(Claimed))


_INSERT_SINGLES = text("""
WITH given AS (
    SELECT DISTINCT ON (idempotency_key) * FROM unnest(
        CAST(:keys AS text[]), CAST(:contact_ids AS bigint[]), CAST(:templates AS text[]),
        CAST(:channels AS text[]), CAST(:categories AS text[]), CAST(:priorities AS text[]),
        CAST(:excludes AS jsonb[]), CAST(:scopes AS text[]), CAST(:withins AS float8[]),
        CAST(:data AS jsonb[]), CAST(:deliver_ats AS timestamptz[]),
        CAST(:expires_ats AS timestamptz[]), CAST(:exclude_sinces AS timestamptz[]),
        CAST(:kinds AS text[])) WITH ORDINALITY
      AS t(idempotency_key, contact_id, template, channel, category, priority,
           exclude_events, exclude_scope, exclude_within_seconds, data, deliver_at, expires_at,
           exclude_since, kind, ord)
     ORDER BY idempotency_key, ord
), keys AS (
    -- the keys' uniqueness: messages is partitioned, message_keys is not; ids in the
    -- batch's order (a volatile function runs after the sort)
    INSERT INTO message_keys (key, message_id)
    SELECT g.idempotency_key, nextval(pg_get_serial_sequence('messages', 'id')) FROM given g
     ORDER BY g.ord
    ON CONFLICT (key) DO NOTHING
    RETURNING key, message_id
), inserted AS (
    INSERT INTO messages (id, kind, idempotency_key, contact_id, template, channel, category,
                          priority, exclude_events, exclude_scope, exclude_within_seconds,
                          data, scheduled_at, deliver_at, expires_at, planned, exclude_since)
    SELECT k.message_id, g.kind, g.idempotency_key, g.contact_id, g.template, g.channel,
           -- a message without a category takes its template's (newest version)
           coalesce(g.category, (SELECT t.category FROM templates t WHERE t.name = g.template
                                  ORDER BY t.version DESC LIMIT 1)),
           g.priority, g.exclude_events, g.exclude_scope, g.exclude_within_seconds, g.data,
           :now, g.deliver_at, g.expires_at, 1, g.exclude_since
      FROM given g JOIN keys k ON k.key = g.idempotency_key
    RETURNING id, contact_id, deliver_at, idempotency_key
)
SELECT id, contact_id, deliver_at, idempotency_key, true AS new FROM inserted
UNION ALL
SELECT m.id, m.contact_id, m.deliver_at, m.idempotency_key, false
  FROM given g
  JOIN message_keys k ON k.key = g.idempotency_key
  JOIN messages m ON m.id = k.message_id
""")


async def insert_single_messages(
    conn: AsyncConnection,
    requests: Sequence[tuple[str, ScheduleMessage]],
    now: datetime,
    *,
    from_rules: Collection[str] = (),
) -> list[StoredMessage]:
    """Store scheduled messages keyed by idempotency key, in one statement; a key seen before
    keeps its first row. The keys in ``from_rules`` are automation rules' messages (kind
    ``rule``), the others kind ``single``; a message without a category takes its template's.
    Returns every message of the batch, new or old, so the caller can (re)publish it."""
    ids, created = await contacts_repo.ensure_created(conn, (req.contact for _, req in requests))
    result = await conn.execute(
        _INSERT_SINGLES,
        {
            "keys": [key for key, _ in requests],
            "contact_ids": [ids[req.contact.id] for _, req in requests],
            "templates": [req.template for _, req in requests],
            "channels": [req.channel.value for _, req in requests],
            "categories": [req.category for _, req in requests],
            "priorities": [req.priority.value for _, req in requests],
            "excludes": [Jsonb(list(req.exclude_events)) for _, req in requests],
            "scopes": [req.exclude_scope for _, req in requests],
            "withins": [req.exclude_within_seconds for _, req in requests],
            "data": [Jsonb(req.data) for _, req in requests],
            "deliver_ats": [req.deliver_at for _, req in requests],
            "expires_ats": [req.expires_at for _, req in requests],
            "exclude_sinces": [req.exclude_since for _, req in requests],
            "kinds": ["rule" if key in from_rules else "single" for key, _ in requests],
            "now": now,
        },
    )
    stored: dict[str, StoredMessage] = {}
    new: set[str] = set()
    for r in result:
        stored[r.idempotency_key] = StoredMessage(
            r.id, r.contact_id, r.deliver_at, r.idempotency_key
        )
        if r.new:
            new.add(r.idempotency_key)
    # a re-published request does not apply its (possibly stale) contact fields again; a
    # contact this batch created holds its new requests' fields already, unless an old one
    # named it too
    fresh = created - {req.contact.id for key, req in requests if key not in new}
    await contacts_repo.update(
        conn, (req.contact for key, req in requests if key in new and req.contact.id not in fresh)
    )
    return list(stored.values())


_CLAIM = text("""
WITH wanted AS (
    SELECT * FROM unnest(CAST(:mids AS bigint[]), CAST(:cids AS bigint[]),
                         CAST(:attempts AS int[])) AS t(message_id, contact_id, attempt)
), claimed AS (
    INSERT INTO message_items AS mi (message_id, contact_id, status, attempts, claimed_at,
                                     updated_at)
    SELECT w.message_id, w.contact_id, 'sending', w.attempt, now(), now() FROM wanted w
     WHERE EXISTS (SELECT 1 FROM messages m WHERE m.id = w.message_id AND m.status <> :paused
                      AND (m.kind <> 'campaign' AND m.contact_id = w.contact_id
                           OR EXISTS (SELECT 1 FROM message_items r
                                       WHERE r.message_id = w.message_id
                                         AND r.contact_id = w.contact_id)))
     ORDER BY w.message_id, w.contact_id
    ON CONFLICT (message_id, contact_id) DO UPDATE
       SET status = CASE WHEN mi.status = 'sending' AND mi.takeovers >= :max_takeovers
                         THEN 'failed' ELSE 'sending' END,
           reason = CASE WHEN mi.status = 'sending' AND mi.takeovers >= :max_takeovers
                         THEN :lease_reason ELSE mi.reason END,
           takeovers = mi.takeovers + CAST(mi.status = 'sending' AS int),
           claimed_at = now(), updated_at = now(),
           attempts = CASE WHEN mi.status = 'deferred' THEN excluded.attempts
                           ELSE mi.attempts + 1 END
     WHERE (mi.status = 'deferred' AND excluded.attempts > mi.attempts)
        OR mi.status = 'planned'
        OR (mi.status = 'sending' AND mi.claimed_at < now() - make_interval(secs => :lease))
    RETURNING mi.message_id, mi.contact_id, mi.attempts, mi.failures, mi.status
), lease_failed AS (
    UPDATE messages SET status = :completed
     WHERE id IN (SELECT message_id FROM claimed WHERE status = 'failed')
       AND kind <> 'campaign' AND status IN (:not_started, :sending)
)
SELECT c.message_id, c.contact_id, c.attempts, c.failures, m.status AS message_status,
       m.idempotency_key, m.template,
       m.channel, m.category, m.priority, m.data, m.deliver_at, m.expires_at,
       k.external_id, k.email, k.phone, k.timezone, k.attributes, k.subscribed
  FROM claimed c
  JOIN messages m ON m.id = c.message_id
  JOIN contacts k ON k.id = c.contact_id
 WHERE c.status = 'sending'
""")

_STATES = text("""
SELECT mi.message_id, mi.contact_id, mi.status, mi.attempts, mi.claimed_at,
       mi.next_attempt_at, m.status = :paused AS paused
  FROM message_items mi
  JOIN messages m ON m.id = mi.message_id
  JOIN unnest(CAST(:mids AS bigint[]), CAST(:cids AS bigint[])) AS t(message_id, contact_id)
    ON mi.message_id = t.message_id AND mi.contact_id = t.contact_id
""")


def claim_statement(
    wanted: Sequence[tuple[int, int, int]], lease_seconds: float, max_takeovers: int
) -> Statement:
    """Claim recipient rows for sending, in one statement for the whole batch; read with
    :func:`claimed_from`, then ask :func:`states_statement` about the rest.

    ``wanted`` holds (message_id, contact_id, attempt) without duplicates. Only a recipient
    of the message is claimed: a single message's contact (its row is created by the first
    claim), or a contact that has a row already (a started campaign's ``planned``
    recipient); any other pair is left unclaimed, with no row, and dispatch parks its due
    message. A row is claimed when it does not exist yet, when it is ``deferred`` and this is
    a later attempt, or when it is ``sending`` but its claimer's lease ran out (the claimer
    crashed between send and finalise), or it is a campaign's ``planned`` recipient. A
    ``sending`` row already taken over ``max_takeovers`` times is recorded ``failed`` with
    the reason ``lease`` instead: it may have been sent each time, and is never sent again.
    Nothing of a paused message is claimed: its recipients wait for resume.
    """
    return _CLAIM, {
        "mids": [w[0] for w in wanted],
        "cids": [w[1] for w in wanted],
        "attempts": [w[2] for w in wanted],
        "lease": lease_seconds,
        "max_takeovers": max_takeovers,
        "lease_reason": str(lease_reason(max_takeovers)),
        "paused": int(MessageStatus.PAUSED),
        "not_started": int(MessageStatus.NOT_STARTED),
        "sending": int(MessageStatus.SENDING),
        "completed": int(MessageStatus.COMPLETED),
    }


def lease_reason(max_takeovers: int) -> Reason:
    """Why a recipient whose claims kept expiring is recorded ``failed``."""
    return Reason(
        ReasonRule.LEASE,
        f"the lease ran out {max_takeovers + 1} times before the outcome was recorded "
        f"(NUDGE_MAX_TAKEOVERS={max_takeovers}); not sent again",
    )


def claimed_from(rows: Sequence[Any]) -> list[Claimed]:
    if rows and tuple(rows[0]._fields) != _CLAIMED_COLUMNS:  # positional: keep them in step
        raise AssertionError(f"claim columns {rows[0]._fields} != {_CLAIMED_COLUMNS}")
    return [Claimed(*row) for row in rows]


def states_statement(rest: Sequence[Key]) -> Statement:
    """The states of recipient rows this worker did not claim; read with
    :func:`states_from` (a key with no row names a message or contact that does not exist)."""
    return _STATES, {
        "mids": [k[0] for k in rest],
        "cids": [k[1] for k in rest],
        "paused": int(MessageStatus.PAUSED),
    }


def states_from(rows: Sequence[Any]) -> dict[Key, ItemState]:
    return {
        (r.message_id, r.contact_id): ItemState(
            ItemStatus(r.status), r.attempts, r.claimed_at, r.next_attempt_at, r.paused
        )
        for r in rows
    }


# ``mi.status || ''`` on purpose: with a plain ``mi.status = 'sending'`` the planner may read
# the partial index of unfinished rows whole (its statistics, taken between bursts of
# claims, say almost no row is ``sending``), dead entries and all, once per batch. Hiding the
# predicate leaves the primary key probe per recipient, whatever the statistics say.
_FINALISE = text("""
WITH finalised AS (
    UPDATE message_items AS mi
       SET status = v.status, reason = v.reason, last_error = coalesce(v.error, mi.last_error),
           next_attempt_at = v.next_attempt_at, failures = mi.failures + v.failed,
           sent_at = CASE WHEN v.status = 'sent' THEN now() ELSE mi.sent_at END,
           template_version = coalesce(v.template_version, mi.template_version),
           updated_at = now()
      FROM unnest(CAST(:mids AS bigint[]), CAST(:cids AS bigint[]), CAST(:attempts AS int[]),
                  CAST(:statuses AS text[]), CAST(:reasons AS text[]), CAST(:errors AS text[]),
                  CAST(:nexts AS timestamptz[]), CAST(:failed AS int[]),
                  CAST(:versions AS int[]))
           AS v(message_id, contact_id, attempts, status, reason, error, next_attempt_at,
                failed, template_version)
     WHERE mi.message_id = v.message_id AND mi.contact_id = v.contact_id
       AND mi.status || '' = 'sending' AND mi.attempts = v.attempts
    RETURNING mi.message_id, mi.status
), completed AS (
    UPDATE messages SET status = :completed
     WHERE id IN (SELECT message_id FROM finalised
                   WHERE status NOT IN ('sending', 'deferred', 'planned'))
       AND kind <> 'campaign' AND status IN (:not_started, :sending)
    RETURNING id
)
SELECT (SELECT count(*) FROM finalised) AS finalised, (SELECT count(*) FROM completed)
""")


async def finalise(conn: AsyncConnection, outcomes: Sequence[ItemOutcome]) -> int:
    """:func:`finalise_statement`, run (nothing to run without outcomes); how many rows it
    finalised (fewer than ``outcomes``: a row was taken over, or its claim was lost)."""
    if not outcomes:
        return 0
    return int((await conn.execute(*finalise_statement(outcomes))).scalar_one())


# The claim commits without waiting for the disk (the sends need it visible, not durable: the
# finalise commits synchronously after them, and the WAL reaches the disk in order). If
# Postgres crashed in between, the claim is gone: the row is missing, or still holds the
# attempt before ours. Then, and only then, the outcome is written here. A row whose attempts
# passed ours was taken over by another worker after our lease: it is left alone.
_REPAIR = text("""
WITH v AS (
    SELECT * FROM unnest(
        CAST(:mids AS bigint[]), CAST(:cids AS bigint[]), CAST(:attempts AS int[]),
        CAST(:statuses AS text[]), CAST(:reasons AS text[]), CAST(:errors AS text[]),
        CAST(:nexts AS timestamptz[]), CAST(:failed AS int[]), CAST(:versions AS int[]))
      AS v(message_id, contact_id, attempts, status, reason, error, next_attempt_at, failed,
           template_version)
), repaired AS (
    INSERT INTO message_items AS mi (message_id, contact_id, status, attempts, reason,
                                     last_error, next_attempt_at, failures, sent_at,
                                     template_version, claimed_at, updated_at)
    SELECT message_id, contact_id, status, attempts, reason, error, next_attempt_at, failed,
           CASE WHEN status = 'sent' THEN now() END, template_version, now(), now()
      FROM v ORDER BY message_id, contact_id
    ON CONFLICT (message_id, contact_id) DO UPDATE
       SET status = excluded.status, attempts = excluded.attempts, reason = excluded.reason,
           last_error = coalesce(excluded.last_error, mi.last_error),
           next_attempt_at = excluded.next_attempt_at,
           failures = mi.failures + excluded.failures,
           sent_at = CASE WHEN excluded.status = 'sent' THEN now() ELSE mi.sent_at END,
           template_version = coalesce(excluded.template_version, mi.template_version),
           claimed_at = now(), updated_at = now()
     WHERE mi.attempts < excluded.attempts
    RETURNING mi.message_id, mi.status
), completed AS (
    UPDATE messages SET status = :completed
     WHERE id IN (SELECT message_id FROM repaired
                   WHERE status NOT IN ('sending', 'deferred', 'planned'))
       AND kind <> 'campaign' AND status IN (:not_started, :sending)
    RETURNING id
)
SELECT (SELECT count(*) FROM repaired) AS repaired, (SELECT count(*) FROM completed)
""")


async def repair(conn: AsyncConnection, outcomes: Sequence[ItemOutcome]) -> int:
    """Write the outcomes whose claim was lost (see ``_REPAIR``); how many there were."""
    if not outcomes:
        return 0
    _, params = finalise_statement(outcomes)
    return int((await conn.execute(_REPAIR, params)).scalar_one())


#: Text from outside (a receiver's error body) is stored at most this long.
MAX_STORED_TEXT = 1000


def stored_text(text: str) -> str:
    """``text`` as it can be stored: without NUL characters (Postgres refuses them in text),
    at most :data:`MAX_STORED_TEXT` characters."""
    cleaned = text.replace("\x00", "\ufffd")
    if len(cleaned) > MAX_STORED_TEXT:
        cleaned = cleaned[: MAX_STORED_TEXT - 1] + "\u2026"
    return cleaned


def finalise_statement(outcomes: Sequence[ItemOutcome]) -> Statement:
    """Record the outcome of claimed rows, and complete the single-recipient messages (kinds
    ``single`` and ``rule``) among them, in one statement (safe to run in autocommit: it
    commits whole or not at all)."""
    return (
        _FINALISE,
        {
            "mids": [o.message_id for o in outcomes],
            "cids": [o.contact_id for o in outcomes],
            "attempts": [o.attempts for o in outcomes],
            "statuses": [o.status.value for o in outcomes],
            "reasons": [None if o.reason is None else stored_text(str(o.reason)) for o in outcomes],
            "errors": [None if o.error is None else stored_text(o.error) for o in outcomes],
            "nexts": [o.next_attempt_at for o in outcomes],
            "failed": [int(o.failed) for o in outcomes],
            "versions": [o.template_version for o in outcomes],
            "not_started": int(MessageStatus.NOT_STARTED),
            "sending": int(MessageStatus.SENDING),
            "completed": int(MessageStatus.COMPLETED),
        },
    )


def cancel(conn: Connection, message_id: int) -> bool:
    """Mark a message cancelled; recipients still pending will be recorded ``cancelled`` when
    they fall due. A campaign is cancelled as ``nudge campaign cancel`` does it: its recipients
    not claimed yet are recorded ``cancelled`` at once. Returns False when it had already
    completed or been cancelled."""
    from workers.store import campaigns

    campaign = campaigns.find(conn, str(message_id))
    if campaign is not None:
        if campaign.state not in campaigns.ALLOWED["cancel"]:
            return False
        campaigns.cancel(conn, campaign, "cancelled by an operator")
        return True
    result = conn.execute(
        update(messages)
        .where(
            messages.c.id == message_id,
            messages.c.status.in_(
                [
                    int(MessageStatus.NOT_STARTED),
                    int(MessageStatus.SENDING),
                    int(MessageStatus.PAUSED),
                ]
            ),
        )
        .values(status=int(MessageStatus.CANCELLED))
    )
    return result.rowcount == 1


def find(conn: Connection, ref: str) -> dict[str, Any] | None:
    """A message by numeric id or idempotency key (its recipients: :func:`recipients`)."""
    by_key = select(message_keys.c.message_id).where(message_keys.c.key == ref)
    cond = (messages.c.id == int(ref)) if ref.isdigit() else messages.c.id.in_(by_key)
    row = conn.execute(select(messages).where(cond)).mappings().first()
    return dict(row) if row is not None else None


@dataclass(frozen=True)
class Page:
    """One page of a message's recipients, by contact id."""

    items: list[dict[str, Any]]
    #: Recipients matching the filter, on every page.
    total: int
    #: The ``after`` of the next page; None on the last one.
    next_after: int | None


def recipients(
    conn: Connection,
    message_id: int,
    *,
    status: ItemStatus | None = None,
    after: int = 0,
    limit: int = 50,
) -> Page:
    """The recipients of a message with contact id above ``after``, ``limit`` of them (keyset
    on the primary key, never OFFSET), only those with ``status`` if given."""
    cond = [message_items.c.message_id == bindparam("mid")]
    if status is not None:
        cond.append(message_items.c.status == status.value)
    rows = (
        conn.execute(
            select(message_items, contacts.c.external_id)
            .join(contacts, contacts.c.id == message_items.c.contact_id)
            .where(*cond, message_items.c.contact_id > after)
            .order_by(message_items.c.contact_id)
            .limit(limit + 1),
            {"mid": message_id},
        )
        .mappings()
        .all()
    )
    total = conn.execute(
        select(func.count()).select_from(message_items).where(*cond), {"mid": message_id}
    ).scalar_one()
    items = [dict(r) for r in rows[:limit]]
    more = len(rows) > limit and items
    return Page(items, int(total), items[-1]["contact_id"] if more else None)
