"""Time partitions of ``messages``, ``message_items`` and ``contact_events``: creating them
ahead of time, moving the message id sequence at each month boundary, and dropping the old
ones that nothing pending still needs (``nudge db partitions``, ``nudge db prune``, and the
``scheduler`` role on a timer; docs/operations.md, "Retention").

``messages`` and ``message_items`` are partitioned by RANGE of the message id: the partition
of month *k* holds ids ``[(k - EPOCH_MONTH) << 32, (k + 1 - EPOCH_MONTH) << 32)``, and the
maintenance moves the id sequence to the start of the month's partition when the month
begins. A message and its recipients are therefore in the partitions of the same month, a
lookup by message id reads one partition, and the primary keys contain the partition key.
The partition ``*_initial`` holds every id below the first month's (the rows from before
partitioning). ``contact_events`` is partitioned by RANGE of ``occurred_at``, one partition
per calendar month, with ``contact_events_default`` for times outside them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Connection, ForeignKeyConstraint, TextClause, text

from workers.recipients import MessageStatus
from workers.store import policies as policies_repo

if TYPE_CHECKING:
    from workers.config import Settings

#: Month numbers count ``year * 12 + month - 1``; message ids of month k start at
#: ``(k - EPOCH_MONTH) << ID_BITS`` (January 2020 is 0).
EPOCH_MONTH = 2020 * 12
ID_BITS = 32
#: How many months ahead of the current one the maintenance creates partitions.
AHEAD_MONTHS = 2

MESSAGE_TABLES = ("messages", "message_items")
EVENTS = "contact_events"
PARTITIONED = (*MESSAGE_TABLES, EVENTS)

#: Serialises maintenance and prune across processes (``pg_advisory_xact_lock``).
LOCK_KEY = 7342016

_NAME = re.compile(
    r"^(?P<table>messages|message_items|contact_events)_"
    r"(?:y(?P<year>\d{4})m(?P<month>\d{2})|(?P<special>initial|default))$"
)

#: The statuses of a message that is not finished (singles and rules until their recipient is
#: final; campaigns until completed or cancelled).
_OPEN_STATUSES = (
    int(MessageStatus.NOT_STARTED),
    int(MessageStatus.SENDING),
    int(MessageStatus.PAUSED),
)


_IDENTIFIER = re.compile(r"^(?:[a-z][a-z0-9_.]*|\d{4}-\d{2}-01 00:00:00\+00)$")


def _sql(template: str, **names: object) -> TextClause:
    """``template`` with table names (and partition bounds) filled in, each checked to be a
    plain identifier, a number or the start of a month: they come from this module and
    ``pg_catalog``, never from input."""
    for value in names.values():
        if not (isinstance(value, int) or _IDENTIFIER.match(str(value))):
            raise ValueError(f"not an identifier: {value!r}")
    return text(template.format(**names))


def is_partition(name: str) -> bool:
    """Whether ``name`` is one of the partitions this module creates (the schema comparison
    leaves them out: they are not in :mod:`workers.store.schema`)."""
    return _NAME.match(name) is not None


def in_schema(obj: object, name: str | None, kind: str, reflected: bool, _: object) -> bool:
    """Alembic's ``include_object`` for comparing the database with the declared schema:
    leaves out the partitions and the copies of foreign keys Postgres keeps per partition."""
    if kind == "table":
        return not is_partition(str(name))
    if kind == "foreign_key_constraint" and isinstance(obj, ForeignKeyConstraint):
        return not is_partition(obj.referred_table.name) and not is_partition(obj.table.name)
    return True


def month_of(at: datetime) -> int:
    return at.year * 12 + at.month - 1


def month_start(month: int) -> datetime:
    return datetime(month // 12, month % 12 + 1, 1, tzinfo=UTC)


def first_id(month: int) -> int:
    """The first message id of ``month``'s partition."""
    return (month - EPOCH_MONTH) << ID_BITS


def suffix(month: int) -> str:
    return f"y{month // 12:04d}m{month % 12 + 1:02d}"


@dataclass(frozen=True)
class Partition:
    table: str
    name: str
    #: The month it covers; for ``*_initial``, the month its ids end with; None for the
    #: default partition of ``contact_events``.
    month: int | None
    initial: bool = False

    @property
    def ends_at(self) -> datetime | None:
        """When the month it covers ends (None: the default partition)."""
        return None if self.month is None else month_start(self.month + 1)

    @property
    def id_range(self) -> tuple[int | None, int]:
        """Message ids ``[low, high)`` (``low`` None: no lower bound)."""
        assert self.month is not None
        return (None if self.initial else first_id(self.month)), first_id(self.month + 1)


_LIST = text("""
SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
  FROM pg_inherits i
  JOIN pg_class c ON c.oid = i.inhrelid
  JOIN pg_class p ON p.oid = i.inhparent
 WHERE p.relname = :table AND p.relnamespace = 'public'::regnamespace
""")
_UPPER = re.compile(r"TO \('?(-?\d+)'?\)")


def partitions(conn: Connection, table: str) -> list[Partition]:
    """The partitions of ``table``, oldest first (the default partition last)."""
    out: list[Partition] = []
    for row in conn.execute(_LIST, {"table": table}):
        found = _NAME.match(row.name)
        if found is None:
            raise ValueError(f"{table}: partition {row.name!r} was not created by nudge")
        if found["special"] == "default":
            out.append(Partition(table, row.name, None))
        elif found["special"] == "initial":
            upper = _UPPER.search(row.bound)
            assert upper is not None, row.bound
            month = (int(upper[1]) >> ID_BITS) + EPOCH_MONTH - 1
            out.append(Partition(table, row.name, month, initial=True))
        else:
            out.append(
                Partition(table, row.name, int(found["year"]) * 12 + int(found["month"]) - 1)
            )
    return sorted(out, key=lambda p: (p.month is None, p.month or 0, not p.initial))


def _covered(existing: Sequence[Partition], month: int) -> bool:
    return any(
        p.month is not None and (p.month == month or (p.initial and month <= p.month))
        for p in existing
    )


def _create_message_partition(conn: Connection, table: str, month: int) -> str:
    name = f"{table}_{suffix(month)}"
    conn.execute(
        _sql(
            "CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM ({low}) TO ({high})",
            name=name,
            table=table,
            low=first_id(month),
            high=first_id(month + 1),
        )
    )
    return name


def create_events_partition(conn: Connection, month: int) -> str:
    """Create ``contact_events``' partition of ``month``, moving into it the rows of the
    default partition that belong to it."""
    name = f"{EVENTS}_{suffix(month)}"
    bounds = {"low": month_start(month), "high": month_start(month + 1)}
    conn.execute(_sql("CREATE TABLE {name} (LIKE {t} INCLUDING DEFAULTS)", name=name, t=EVENTS))
    conn.execute(
        _sql(
            """
            WITH moved AS (
                DELETE FROM {t}_default WHERE occurred_at >= :low AND occurred_at < :high
                RETURNING *)
            INSERT INTO {name} SELECT * FROM moved
            """,
            t=EVENTS,
            name=name,
        ),
        bounds,
    )
    conn.execute(
        _sql(
            "ALTER TABLE {t} ATTACH PARTITION {name} FOR VALUES FROM ('{low}') TO ('{high}')",
            t=EVENTS,
            name=name,
            low=f"{month // 12:04d}-{month % 12 + 1:02d}-01 00:00:00+00",
            high=f"{(month + 1) // 12:04d}-{(month + 1) % 12 + 1:02d}-01 00:00:00+00",
        )
    )
    return name


def _sequence(conn: Connection) -> str:
    name = conn.execute(text("SELECT pg_get_serial_sequence('messages', 'id')")).scalar_one()
    return str(name)


def next_message_id(conn: Connection) -> int:
    """The id the next message will get (without taking it)."""
    row = conn.execute(_sql("SELECT last_value, is_called FROM {s}", s=_sequence(conn))).one()
    return int(row.last_value) + (1 if row.is_called else 0)


def lock(conn: Connection, *, wait: bool = True) -> bool:
    """Take the maintenance lock until the transaction ends: one maintenance or prune at a
    time across processes. Without ``wait``, False when another process holds it."""
    if wait:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        return True
    return bool(
        conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": LOCK_KEY}).scalar()
    )


def maintain(conn: Connection, now: datetime, ahead: int = AHEAD_MONTHS) -> list[str]:
    """Create the partitions of this month and the next ``ahead`` ones that do not exist,
    and move the message id sequence to this month's partition when it is still below it.
    Run in a transaction holding :func:`lock`. Returns what it did.

    Creating a partition locks its table against every reader and writer for an instant; a
    lock not granted within a few seconds fails the round, to be tried again at the next."""
    conn.execute(text("SET LOCAL lock_timeout = '5s'"))
    done: list[str] = []
    current = month_of(now)
    for table in MESSAGE_TABLES:
        existing = partitions(conn, table)
        for month in range(current, current + ahead + 1):
            if not _covered(existing, month):
                done.append(f"created {_create_message_partition(conn, table, month)}")
    existing = partitions(conn, EVENTS)
    for month in range(current, current + ahead + 1):
        if not _covered(existing, month):
            done.append(f"created {create_events_partition(conn, month)}")
    this_month = [p for p in partitions(conn, "messages") if p.month == current and not p.initial]
    if this_month and next_message_id(conn) < first_id(current):
        conn.execute(
            text("SELECT setval(pg_get_serial_sequence('messages', 'id'), :v, false)"),
            {"v": first_id(current)},
        )
        done.append(f"message ids now start at {first_id(current)}")
    return done


@dataclass(frozen=True)
class Retention:
    """How long each table's rows are kept at least (``NUDGE_RETENTION_*``)."""

    events_days: float
    messages_days: float
    message_keys_days: float
    #: None: rule runs are kept for ever (a run-once rule fires again for a contact whose
    #: run was deleted).
    rule_runs_days: float | None
    #: ``NUDGE_EXCLUSION_BUFFER_SECONDS``: ``since_scheduled`` scopes reach back this far.
    exclusion_buffer_seconds: float

    @classmethod
    def of(cls, settings: Settings) -> Retention:
        return cls(
            events_days=settings.retention_events_days,
            messages_days=settings.retention_messages_days,
            message_keys_days=settings.retention_message_keys_days,
            rule_runs_days=settings.retention_rule_runs_days,
            exclusion_buffer_seconds=settings.exclusion_buffer_seconds,
        )


@dataclass(frozen=True)
class Decision:
    partition: str
    drop: bool
    why: str

    def line(self) -> str:
        return f"{'drop' if self.drop else 'keep'} {self.partition}: {self.why}"


_EXCLUSION_REACH = text("""
SELECT m.id, m.exclude_scope,
       -- epoch seconds: 'ever' reaches back to -Infinity
       extract(epoch FROM CASE m.exclude_scope
         WHEN 'ever' THEN '-infinity'::timestamptz
         WHEN 'within' THEN CAST(:now AS timestamptz)
                            - make_interval(secs => m.exclude_within_seconds)
         ELSE coalesce(m.exclude_since, m.scheduled_at - make_interval(secs => :buffer))
       END)::float8 AS reach
  FROM messages m
 WHERE jsonb_array_length(m.exclude_events) > 0
   AND m.id IN (
         -- each has a partial index: no need to read the whole history
         SELECT id FROM messages
          WHERE kind <> 'campaign' AND status IN (0, 1) AND contact_id IS NOT NULL
         UNION ALL
         SELECT id FROM messages WHERE kind = 'campaign' AND status IN (0, 1, 2)
         UNION ALL
         SELECT message_id FROM message_items
          WHERE status IN ('planned', 'sending', 'deferred'))
 ORDER BY reach
 LIMIT 1
""")


def _windows(conn: Connection) -> tuple[float, float]:
    """The longest interaction window and the longest cap or dedup window of the policies."""
    stored = policies_repo.from_rows(conn.execute(*policies_repo.LOAD_ALL)).values()
    interaction = max(p.interaction_window_seconds for p in stored)
    caps = max(max(p.frequency_window_seconds, p.category_window_seconds or 0) for p in stored)
    return interaction, caps


def _days(seconds: float) -> str:
    return f"{seconds / 86400:g} days"


def plan_prune(conn: Connection, now: datetime, retention: Retention) -> list[Decision]:
    """For every partition, whether a prune drops it and why (nothing is changed)."""
    interaction_window, caps_window = _windows(conn)
    decisions: list[Decision] = []

    # contact_events: by event time
    events_cutoff = now - timedelta(days=retention.events_days)
    interactions_from = now - timedelta(seconds=interaction_window)
    reach = conn.execute(
        _EXCLUSION_REACH, {"now": now, "buffer": retention.exclusion_buffer_seconds}
    ).first()
    for p in partitions(conn, EVENTS):
        ends = p.ends_at
        if ends is None:
            decisions.append(Decision(p.name, False, "the default partition (times outside)"))
        elif ends > events_cutoff:
            why = f"has events newer than the retention ({_days(retention.events_days * 86400)})"
            decisions.append(Decision(p.name, False, why))
        elif ends > interactions_from:
            why = f"within the longest interaction window ({_days(interaction_window)})"
            decisions.append(Decision(p.name, False, why))
        elif reach is not None and ends.timestamp() > reach.reach:
            back = (
                "the beginning"
                if reach.reach == float("-inf")
                else f"{datetime.fromtimestamp(reach.reach, UTC):%Y-%m-%d %H:%M}"
            )
            why = (
                f"pending message {reach.id} (exclusion scope {reach.exclude_scope}) "
                f"checks events back to {back}"
            )
            decisions.append(Decision(p.name, False, why))
        else:
            decisions.append(Decision(p.name, True, "older than the retention, not needed"))

    # messages and message_items: by message id, one month's pair at a time
    messages_cutoff = now - timedelta(days=retention.messages_days)
    horizon = min(messages_cutoff, now - timedelta(seconds=caps_window))
    next_id = next_message_id(conn)
    items = {p.month: p for p in partitions(conn, "message_items")}
    for p in partitions(conn, "messages"):
        pair = f"{p.name} and {items[p.month].name}" if p.month in items else p.name
        _, high = p.id_range
        ends = p.ends_at
        assert ends is not None
        if next_id < high:
            decisions.append(Decision(pair, False, "the id sequence has not passed it"))
            continue
        if ends > horizon:
            recent = (
                f"newer than the retention ({_days(retention.messages_days * 86400)}) "
                f"or the longest cap or dedup window ({_days(caps_window)})"
            )
            decisions.append(Decision(pair, False, recent))
            continue
        needed = _still_needed(conn, p, items.get(p.month), horizon)
        drop = needed is None
        decisions.append(Decision(pair, drop, needed or "older than the retention, not needed"))
    return decisions


def _still_needed(
    conn: Connection, p: Partition, items: Partition | None, horizon: datetime
) -> str | None:
    """Why a month of messages is still needed, or None."""
    row = conn.execute(
        _sql(
            "SELECT id, status FROM {p} WHERE status = ANY(CAST(:open AS smallint[])) LIMIT 1",
            p=p.name,
        ),
        {"open": list(_OPEN_STATUSES)},
    ).first()
    if row is not None:
        return f"message {row.id} is not finished ({MessageStatus(row.status).name.lower()})"
    if items is not None:
        row = conn.execute(
            _sql(
                "SELECT message_id, contact_id, status FROM {p} "
                "WHERE status IN ('planned', 'sending', 'deferred') LIMIT 1",
                p=items.name,
            )
        ).first()
        if row is not None:
            return f"recipient {row.contact_id} of message {row.message_id} is {row.status}"
    row = conn.execute(
        _sql(
            "SELECT id FROM {p} WHERE created_at >= :h OR deliver_at >= :h "
            "OR finished_at >= :h LIMIT 1",
            p=p.name,
        ),
        {"h": horizon},
    ).first()
    if row is not None:
        return f"message {row.id} was active after {horizon:%Y-%m-%d}"
    if items is not None:
        row = conn.execute(
            _sql("SELECT message_id FROM {p} WHERE updated_at >= :h LIMIT 1", p=items.name),
            {"h": horizon},
        ).first()
        if row is not None:
            return f"a recipient of message {row.message_id} changed after {horizon:%Y-%m-%d}"
    return None


def _drop(conn: Connection, table: str, name: str) -> None:
    conn.execute(_sql("ALTER TABLE {t} DETACH PARTITION {p}", t=table, p=name))
    conn.execute(_sql("DROP TABLE {p}", p=name))


def _delete_batched(conn: Connection, sql: str, params: dict[str, object]) -> int:
    total = 0
    while True:
        deleted = conn.execute(text(sql), params).rowcount
        total += deleted
        if deleted < 10_000:
            return total


def prune(
    conn: Connection, now: datetime, retention: Retention, *, dry_run: bool = False
) -> tuple[list[Decision], list[str]]:
    """Drop the partitions :func:`plan_prune` finds not needed, and delete the old rows of
    the small tables (idempotency keys, rule runs). Run in a transaction holding
    :func:`lock`. Returns the decisions and what else was deleted."""
    # a drop waits for the transactions reading the table: never for long, never for ever
    conn.execute(text("SET LOCAL lock_timeout = '10s'"))
    decisions = plan_prune(conn, now, retention)
    deleted: list[str] = []
    if dry_run:
        return decisions, deleted
    by_name = {p.name: p for t in PARTITIONED for p in partitions(conn, t)}
    for d in decisions:
        if not d.drop:
            continue
        # recipients first: the messages partition's detach checks none refers to it
        for name in reversed(d.partition.split(" and ")):
            p = by_name[name]
            if p.table == "message_items":
                low, high = p.id_range
                for tracking in ("message_opens", "message_clicks"):
                    conn.execute(
                        _sql(
                            "DELETE FROM {t} WHERE message_id < :high AND message_id >= :low",
                            t=tracking,
                        ),
                        {"low": -(2**63) if low is None else low, "high": high},
                    )
            _drop(conn, p.table, p.name)
    keys_cutoff = now - timedelta(days=retention.message_keys_days)
    n = _delete_batched(
        conn,
        "DELETE FROM message_keys WHERE key IN (SELECT k.key FROM message_keys k "
        "WHERE k.created_at < :cutoff AND NOT EXISTS "
        "(SELECT 1 FROM messages m WHERE m.id = k.message_id) LIMIT 10000)",
        {"cutoff": keys_cutoff},
    )
    deleted.append(f"deleted {n} idempotency keys")
    if retention.rule_runs_days is not None:
        n = _delete_batched(
            conn,
            "DELETE FROM rule_runs WHERE ctid IN (SELECT ctid FROM rule_runs "
            "WHERE fired_at < :cutoff LIMIT 10000)",
            {"cutoff": now - timedelta(days=retention.rule_runs_days)},
        )
        deleted.append(f"deleted {n} rule runs")
    return decisions, deleted


def scheduled_round(conn: Connection, retention: Retention, prune_too: bool) -> list[str]:
    """One round of the scheduler's schedule: maintain (and with ``prune_too``, prune) unless
    another scheduler holds the lock; the lines say what was done."""
    if not lock(conn, wait=False):
        return []
    now = datetime.now(UTC)
    done = maintain(conn, now)
    if prune_too:
        decisions, deleted = prune(conn, now, retention)
        done += [d.line() for d in decisions if d.drop] + deleted
    return done
