"""Repository for campaigns: ``messages`` rows of kind ``campaign`` and their recipients.

A campaign's lifecycle is draft → scheduled → sending ⇄ paused → completed, cancelled from any
non-final state. Every transition is one conditional UPDATE, so two operators (or an operator
and the auto-pause) racing on one campaign cannot both win. Starting freezes the audience:
every recipient gets a ``planned`` row in ``message_items`` in the same transaction, and from
then on what is recorded per recipient, not a cursor, says who still needs the message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

from psycopg.types.json import Jsonb
from sqlalchemy import Connection, select, text

from shared.errors import InvalidTransition
from workers.reasons import Reason, ReasonRule
from workers.recipients import ItemStatus, MessageStatus
from workers.store import audiences
from workers.store.campaign_states import ALLOWED as ALLOWED  # the states, also read from here
from workers.store.campaign_states import check_state, state_name
from workers.store.db import autocommit
from workers.store.schema import messages

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


@dataclass(frozen=True)
class Campaign:
    """A campaign as stored."""

    id: int
    name: str
    template: str
    channel: str
    category: str | None
    priority: str
    data: dict[str, Any]
    audience: dict[str, Any]
    status: int
    status_reason: str | None
    start_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    expires_after_seconds: float | None
    batch_size: int
    chunk_size: int
    rate_per_second: float | None
    auto_pause_threshold: float | None
    auto_pause_window: int | None
    plan_round: int
    planned_through: int | None
    plan_done: bool
    planned: int
    created_at: datetime
    #: Checked at send time, per recipient, like a single message's (dispatch check 4).
    exclude_events: list[str]
    exclude_scope: str
    exclude_within_seconds: float | None

    @property
    def state(self) -> str:
        return state_name(self.status, self.start_at)


_COLUMNS = [messages.c[f.name] for f in fields(Campaign)]


def _campaign(row: Any) -> Campaign:
    return Campaign(**row._mapping)


def check(campaign: Campaign, action: str) -> None:
    """Raise :class:`InvalidTransition` unless ``action`` is allowed in the campaign's state."""
    check_state(campaign.name, campaign.state, action)


@dataclass(frozen=True)
class NewCampaign:
    """What ``nudge campaign create`` validated."""

    name: str
    template: str
    channel: str
    category: str | None
    priority: str
    data: dict[str, Any]
    audience: dict[str, Any]
    batch_size: int
    chunk_size: int
    rate_per_second: float | None
    auto_pause_threshold: float | None
    auto_pause_window: int | None
    expires_after_seconds: float | None
    #: Exclusion events and their scope, as a single message's (``since_scheduled`` counts
    #: from the campaign's creation, less the workers' buffer).
    exclude_events: tuple[str, ...] = ()
    exclude_scope: str = "since_scheduled"
    exclude_within_seconds: float | None = None


_CREATE = text("""
WITH key AS (
    -- names are unique through the message's idempotency key (message_keys)
    INSERT INTO message_keys (key, message_id)
    VALUES ('campaign:' || :name, nextval(pg_get_serial_sequence('messages', 'id')))
    ON CONFLICT (key) DO NOTHING
    RETURNING message_id
)
INSERT INTO messages (id, kind, idempotency_key, template, channel, category, priority, data,
                      scheduled_at, deliver_at, name, audience, batch_size, chunk_size,
                      rate_per_second, auto_pause_threshold, auto_pause_window,
                      expires_after_seconds, exclude_events, exclude_scope,
                      exclude_within_seconds)
SELECT key.message_id, 'campaign', 'campaign:' || :name, :template, :channel,
       coalesce(:category, (SELECT category FROM templates WHERE name = :template
                             ORDER BY version DESC LIMIT 1)),
       :priority, :data,
       now(), now(), :name, :audience, :batch_size, :chunk_size, :rate_per_second,
       :auto_pause_threshold, :auto_pause_window, :expires_after_seconds, :exclude_events,
       :exclude_scope, :exclude_within_seconds
  FROM key
RETURNING id
""")


def create(conn: Connection, new: NewCampaign) -> int | None:
    """Store a draft; None when the name is taken. Without a category, the campaign takes
    its template's."""
    params = {f.name: getattr(new, f.name) for f in fields(NewCampaign)}
    params["data"], params["audience"] = Jsonb(new.data), Jsonb(new.audience)
    params["exclude_events"] = Jsonb(list(new.exclude_events))
    return conn.execute(_CREATE, params).scalar()


def find(conn: Connection, ref: str) -> Campaign | None:
    """A campaign by name or numeric id."""
    cond = messages.c.name == ref
    if ref.isdigit():
        cond = cond | (messages.c.id == int(ref))
    row = conn.execute(
        select(*_COLUMNS).where(messages.c.kind == "campaign", cond).limit(1)
    ).first()
    return _campaign(row) if row else None


def all_campaigns(conn: Connection) -> list[Campaign]:
    rows = conn.execute(
        select(*_COLUMNS).where(messages.c.kind == "campaign").order_by(messages.c.id)
    )
    return [_campaign(r) for r in rows]


async def load(conn: AsyncConnection, campaign_id: int) -> Campaign | None:
    """A campaign by id, for the workers."""
    row = (
        await conn.execute(
            select(*_COLUMNS).where(messages.c.kind == "campaign", messages.c.id == campaign_id)
        )
    ).first()
    return _campaign(row) if row else None


def schedule(conn: Connection, campaign: Campaign, at: datetime) -> None:
    check(campaign, "schedule")
    _one(
        conn,
        campaign,
        "schedule",
        "UPDATE messages SET start_at = :at, deliver_at = :at "
        "WHERE id = :id AND status = :not_started RETURNING plan_round",
        at=at,
        not_started=int(MessageStatus.NOT_STARTED),
    )


_START_SQL = """
UPDATE messages
   SET status = :sending, plan_round = plan_round + 1, started_at = now(), deliver_at = now(),
       expires_at = now() + make_interval(secs => expires_after_seconds),
       planned_through = NULL, plan_done = false, status_reason = NULL
 WHERE id = :id AND kind = 'campaign' AND status = :not_started {due}
RETURNING plan_round, audience
"""
_START = text(_START_SQL.format(due=""))
# A scheduled start that arrives early (clock skew) or after a reschedule to later is ignored;
# the start message of the later time will come.
_START_DUE = text(_START_SQL.format(due="AND start_at <= now() + interval '2 seconds'"))
_START_PARAMS = {
    "not_started": int(MessageStatus.NOT_STARTED),
    "sending": int(MessageStatus.SENDING),
}
_PLANNED = text("UPDATE messages SET planned = :n WHERE id = :id")


def start(conn: Connection, campaign: Campaign) -> tuple[int, int]:
    """Freeze the audience and start sending: returns (round, recipients)."""
    check(campaign, "start")
    row = conn.execute(_START, {"id": campaign.id, **_START_PARAMS}).first()
    if row is None:
        _raced(conn, campaign, "start")
        raise AssertionError  # _raced always raises
    n = audiences.freeze(conn, campaign.id, row.audience)
    conn.execute(_PLANNED, {"id": campaign.id, "n": n})
    return int(row.plan_round), n


async def start_scheduled(conn: AsyncConnection, campaign_id: int) -> int | None:
    """The planner's half of a scheduled start: freeze and start if still scheduled and due;
    returns the round, or None when there is nothing to start."""
    row = (await conn.execute(_START_DUE, {"id": campaign_id, **_START_PARAMS})).first()
    if row is None:
        return None
    n = await audiences.freeze_async(conn, campaign_id, row.audience)
    await conn.execute(_PLANNED, {"id": campaign_id, "n": n})
    return int(row.plan_round)


_NEXT_ROUND = (
    "UPDATE messages SET status = :sending, plan_round = plan_round + 1, "
    "planned_through = NULL, plan_done = false, status_reason = NULL, finished_at = NULL "
    "WHERE id = :id AND status = ANY(CAST(:from_ AS smallint[])) RETURNING plan_round"
)


def _next_round(conn: Connection, campaign: Campaign, action: str, *from_: MessageStatus) -> int:
    """A new planning round from any of the statuses ``from_``; returns the round."""
    return _one(
        conn,
        campaign,
        action,
        _NEXT_ROUND,
        sending=int(MessageStatus.SENDING),
        from_=[int(s) for s in from_],
    )


def resume(conn: Connection, campaign: Campaign) -> int:
    """Resume from what is recorded per recipient: a new planning round over every recipient
    without a final outcome. Returns the round."""
    check(campaign, "resume")
    return _next_round(conn, campaign, "resume", MessageStatus.PAUSED)


_CANCEL_ITEMS = text("""
UPDATE message_items SET status = 'cancelled', reason = :reason, updated_at = now()
 WHERE message_id = :id AND status IN ('planned', 'deferred')
""")


def cancel(conn: Connection, campaign: Campaign, reason: str) -> tuple[int, int]:
    """Cancel and record every recipient not claimed yet ``cancelled``; returns (round,
    recipients cancelled). Recipients being sent right now finish as they finish."""
    check(campaign, "cancel")
    round_ = _one(
        conn,
        campaign,
        "cancel",
        "UPDATE messages SET status = :cancelled, status_reason = :reason, finished_at = now() "
        "WHERE id = :id AND status = ANY(CAST(:from_ AS smallint[])) RETURNING plan_round",
        reason=reason,
        cancelled=int(MessageStatus.CANCELLED),
        from_=[
            int(MessageStatus.NOT_STARTED),
            int(MessageStatus.SENDING),
            int(MessageStatus.PAUSED),
        ],
    )
    n = conn.execute(
        _CANCEL_ITEMS,
        {"id": campaign.id, "reason": str(Reason(ReasonRule.CANCELLED, reason))},
    )
    return round_, int(n.rowcount)


_REPLAN_FAILED = text("""
UPDATE message_items SET status = 'planned', failures = 0, reason = NULL, updated_at = now()
 WHERE message_id = :id AND status = 'failed'
""")


def retry_failed(conn: Connection, campaign: Campaign) -> tuple[int, int]:
    """Plan again exactly the recipients whose outcome is ``failed``; returns (round, how
    many). Nothing changes when there are none."""
    check(campaign, "retry-failed")
    n = int(conn.execute(_REPLAN_FAILED, {"id": campaign.id}).rowcount)
    if n == 0:
        return campaign.plan_round, 0
    round_ = _next_round(
        conn,
        campaign,
        "retry-failed",
        MessageStatus.SENDING,
        MessageStatus.PAUSED,
        MessageStatus.COMPLETED,
    )
    return round_, n


def _one(conn: Connection, campaign: Campaign, action: str, sql: str, **params: Any) -> int:
    row = conn.execute(text(sql), {"id": campaign.id, **params}).first()
    if row is None:
        _raced(conn, campaign, action)
    return int(row[0]) if row and len(row) else 0


def _raced(conn: Connection, campaign: Campaign, action: str) -> NoReturn:
    now = find(conn, str(campaign.id))
    assert now is not None
    check(now, action)  # someone changed it in between: say what it is now
    raise InvalidTransition(f"campaign {campaign.name!r} changed while you asked; try again")


# The workers' side.

#: The advisory lock namespace of campaign planning.
#: The first key of a campaign's planning lock (``pg_advisory_lock(space, campaign id)``).
PLANNING_LOCK_SPACE = 2
_TRY_LOCK = text("SELECT pg_try_advisory_lock(:space, :id)")
_UNLOCK = text("SELECT pg_advisory_unlock(:space, :id)")


@asynccontextmanager
async def planning_lock(engine: AsyncEngine, campaign_id: int) -> AsyncIterator[bool]:
    """Try to become the one planner of ``campaign_id``: yields whether the lock was taken,
    and releases it on the way out. A session lock on a connection of its own, so the
    planner's transactions may commit while it holds it; a lost connection releases it.
    Driver errors leave as :class:`~shared.errors.StoreError`."""
    params = {"space": PLANNING_LOCK_SPACE, "id": campaign_id}
    async with autocommit(engine) as conn:
        taken = bool(await conn.scalar(_TRY_LOCK, params))
        try:
            yield taken
        finally:
            if taken:
                await conn.execute(_UNLOCK, params)


@dataclass(frozen=True)
class Unfinished:
    """A recipient without a final outcome, as the planner pages them."""

    contact_id: int
    attempts: int
    #: A ``deferred`` recipient's retry time while it is still ahead (a backoff after a
    #: failed send, a frequency window, quiet hours): it must not be sent before.
    retry_at: datetime | None = None


_PAGE = text("""
SELECT contact_id, attempts,
       CASE WHEN status = 'deferred' AND next_attempt_at > now() THEN next_attempt_at END
         AS retry_at
  FROM message_items
 WHERE message_id = :id AND status IN ('planned', 'sending', 'deferred') AND contact_id > :after
 ORDER BY contact_id LIMIT :n
""")


async def page(conn: AsyncConnection, campaign_id: int, after: int, n: int) -> list[Unfinished]:
    """The next ``n`` recipients without a final outcome after contact ``after`` (keyset on
    the partial index of unfinished rows)."""
    rows = await conn.execute(_PAGE, {"id": campaign_id, "after": after, "n": n})
    return [Unfinished(r.contact_id, r.attempts, r.retry_at) for r in rows]


async def advance(conn: AsyncConnection, campaign_id: int, round_: int, through: int) -> None:
    """Record how far the planner got in ``round_``."""
    await conn.execute(
        text("UPDATE messages SET planned_through = :t WHERE id = :id AND plan_round = :r"),
        {"id": campaign_id, "r": round_, "t": through},
    )


async def finish_round(conn: AsyncConnection, campaign_id: int, round_: int) -> None:
    await conn.execute(
        text("UPDATE messages SET plan_done = true WHERE id = :id AND plan_round = :r"),
        {"id": campaign_id, "r": round_},
    )


# Looks for an unfinished recipient from the highest contact id down: the planner goes up, so
# while a campaign sends the first entry is a live one, where NOT EXISTS would walk forward
# over every recipient finished since the last vacuum (dead index entries) for each batch.
_COMPLETE = text("""
UPDATE messages m SET status = :completed, finished_at = now()
 WHERE m.kind = 'campaign' AND m.status = :sending AND (:id = 0 OR m.id = :id)
   AND (SELECT mi.contact_id FROM message_items mi
         WHERE mi.message_id = m.id AND mi.status IN ('planned', 'sending', 'deferred')
         ORDER BY mi.message_id DESC, mi.contact_id DESC LIMIT 1) IS NULL
RETURNING m.id
""")


async def complete_finished(conn: AsyncConnection, campaign_id: int = 0) -> list[int]:
    """Mark sending campaigns whose every recipient is final ``completed`` (one campaign, or
    all with 0). Run after the outcomes committed, so two workers finishing the last
    recipients at once cannot both miss it."""
    params = {
        "id": campaign_id,
        "sending": int(MessageStatus.SENDING),
        "completed": int(MessageStatus.COMPLETED),
    }
    return [r.id for r in await conn.execute(_COMPLETE, params)]


async def auto_pause(conn: AsyncConnection, campaign_id: int, round_: int, reason: str) -> bool:
    """Pause a campaign still sending in ``round_``; False if it was not."""
    result = await conn.execute(
        text(
            "UPDATE messages SET status = :paused, status_reason = :reason "
            "WHERE id = :id AND status = :sending AND plan_round = :r"
        ),
        {
            "id": campaign_id,
            "r": round_,
            "reason": reason,
            "paused": int(MessageStatus.PAUSED),
            "sending": int(MessageStatus.SENDING),
        },
    )
    return bool(result.rowcount)


async def recent_outcomes(
    conn: AsyncConnection, campaign_id: int, contact_ids: Sequence[int], since: datetime
) -> list[tuple[ItemStatus, Reason | None]]:
    """(status, reason) of those recipients recorded since ``since``: for the auto-pause."""
    rows = await conn.execute(
        text(
            "SELECT status, reason FROM message_items WHERE message_id = :id "
            "AND contact_id = ANY(CAST(:cids AS bigint[])) AND updated_at >= :since"
        ),
        {"id": campaign_id, "cids": list(contact_ids), "since": since},
    )
    return [
        (ItemStatus(r.status), None if r.reason is None else Reason.parse(r.reason)) for r in rows
    ]


_PROGRESS = text("""
SELECT status, count(*) AS n, count(read_at) AS read
  FROM message_items WHERE message_id = :id GROUP BY status
""")


def progress(conn: Connection, campaign: Campaign) -> dict[str, int]:
    """Recipients per status, and how many read it."""
    counts = {s.value: 0 for s in ItemStatus}
    counts["read"] = 0
    for row in conn.execute(_PROGRESS, {"id": campaign.id}):
        counts[row.status] = int(row.n)
        counts["read"] += int(row.read)
    return counts
