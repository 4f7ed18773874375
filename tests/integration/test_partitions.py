"""History ends: ``contact_events``, ``messages`` and ``message_items`` are partitioned by
month, and a prune drops whole old months, never one that a pending message's checks still
read. The migration to the partitioned tables keeps every row."""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import Connection, Engine, create_engine, text

from producer import Producer
from tests.support import Worker, final_row, nudge, wait_for
from workers.config import Settings
from workers.store import partitions
from workers.store.db import upgrade

RETENTION = partitions.Retention(
    events_days=30,
    messages_days=30,
    message_keys_days=30,
    rule_runs_days=None,
    exclusion_buffer_seconds=5,
)


def _tables(conn: Connection) -> set[str]:
    return set(
        conn.execute(
            text("SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace")
        ).scalars()
    )


def _message(conn: Connection, key: str, contact_id: int, status: int = 3) -> int:
    mid = conn.execute(
        text(
            "INSERT INTO messages (kind, idempotency_key, contact_id, template, channel, "
            "priority, scheduled_at, deliver_at, status) VALUES ('single', :key, :c, 'welcome', "
            "'webhook', 'automation', now(), now(), :status) RETURNING id"
        ),
        {"key": key, "c": contact_id, "status": status},
    ).scalar_one()
    conn.execute(
        text("INSERT INTO message_keys (key, message_id) VALUES (:key, :m)"),
        {"key": key, "m": mid},
    )
    return int(mid)


def test_an_old_event_a_pending_message_excludes_on_survives_the_prune_and_still_excludes(
    settings: Settings, engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    old = datetime.now(UTC) - timedelta(days=400)
    month = partitions.suffix(partitions.month_of(old))
    with engine.begin() as conn:
        partitions.create_events_partition(conn, partitions.month_of(old))
    start_worker("events")
    with Producer(settings.amqp_url) as producer:
        producer.track("ever", "upgrade_subscription", occurred_at=old)
    with engine.connect() as conn:
        wait_for(
            lambda: conn.execute(
                text(f"SELECT count(*) FROM contact_events_{month}")  # noqa: S608 (a constant)
            ).scalar(),
            timeout=20,
            message="the old event recorded in its month",
        )
    # with nothing pending, that month is older than every retention: a prune would drop it
    dry = nudge(settings, "db", "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would drop contact_events_{month}: older than the retention" in dry.stdout

    start_worker("scheduler", "dispatch")
    with Producer(settings.amqp_url) as producer:
        producer.schedule(
            "ever",
            "trial_end",
            "webhook",
            delay=12,
            idempotency_key="ever",
            exclude_events=["upgrade_subscription"],
            exclude_scope="ever",
        )
    with engine.connect() as conn:
        wait_for(
            lambda: conn.execute(
                text("SELECT 1 FROM messages WHERE idempotency_key = 'ever' AND status = 0")
            ).first(),
            timeout=10,
            message="the message stored, not yet due",
        )
    pruned = nudge(settings, "db", "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert f"keep contact_events_{month}: pending message" in pruned.stdout
    assert "(exclusion scope ever)" in pruned.stdout

    row = final_row(engine, "ever", timeout=40)
    assert row["status"] == "excluded", row
    assert "upgrade_subscription" in row["reason"], row


def test_a_month_boundary_moves_the_message_ids_to_the_next_month_partition(
    engine: Engine,
) -> None:
    now = datetime.now(UTC)
    next_month = partitions.month_of(now) + 1
    boundary = partitions.month_start(next_month) + timedelta(minutes=1)
    with engine.begin() as conn:
        before = partitions.next_message_id(conn)
        partitions.lock(conn)
        done = partitions.maintain(conn, boundary)
        assert done[-1] == f"message ids now start at {partitions.first_id(next_month)}"
        assert partitions.next_message_id(conn) == partitions.first_id(next_month) > before
        contact = conn.execute(
            text("INSERT INTO contacts (external_id) VALUES ('c') RETURNING id")
        ).scalar_one()
        mid = _message(conn, "after", contact)
        where = conn.execute(
            text("SELECT tableoid::regclass::text FROM messages WHERE id = :m"), {"m": mid}
        ).scalar()
        assert where == f"messages_{partitions.suffix(next_month)}"
        assert {f"messages_{partitions.suffix(next_month + 2)}"} <= _tables(conn)
        # a second round in the same month changes nothing
        assert partitions.maintain(conn, boundary) == []


def test_a_prune_drops_an_old_month_nothing_needs_whole_and_keeps_the_rest(
    engine: Engine,
) -> None:
    now = datetime.now(UTC)
    this = partitions.month_of(now)
    with engine.begin() as conn:
        c = conn.execute(
            text("INSERT INTO contacts (external_id) VALUES ('c') RETURNING id")
        ).scalar_one()
        old = _message(conn, "old", c)
        params = {"m": old, "c": c}
        conn.execute(
            text(
                "INSERT INTO message_items (message_id, contact_id, status, sent_at) "
                "VALUES (:m, :c, 'sent', now())"
            ),
            params,
        )
        conn.execute(
            text("INSERT INTO message_opens (message_id, contact_id) VALUES (:m, :c)"), params
        )
        conn.execute(
            text(
                "INSERT INTO contact_events (contact_id, name, occurred_at, event_id) "
                "VALUES (:c, 'clicked', now(), 'e-1')"
            ),
            params,
        )
        # next month, a message still pending lands in next month's partition; the month
        # after, the ids move on
        partitions.lock(conn)
        partitions.maintain(conn, partitions.month_start(this + 1))
        pending = _message(conn, "pending", c, status=0)
        partitions.maintain(conn, partitions.month_start(this + 2))

    later = partitions.month_start(this + 4)
    with engine.begin() as conn:
        partitions.lock(conn)
        decisions, deleted = partitions.prune(conn, later, RETENTION)
        tables = _tables(conn)
    by_name = {d.partition: d for d in decisions}
    assert by_name["messages_initial and message_items_initial"].drop
    assert by_name[f"contact_events_{partitions.suffix(this)}"].drop
    kept = by_name[
        f"messages_{partitions.suffix(this + 1)} and message_items_{partitions.suffix(this + 1)}"
    ]
    assert not kept.drop
    assert kept.why == f"message {pending} is not finished (not_started)"
    assert "deleted 1 idempotency keys" in deleted
    assert not {"messages_initial", "message_items_initial"} & tables
    assert f"contact_events_{partitions.suffix(this)}" not in tables
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM messages")).scalars().all() == [pending]
        assert conn.execute(text("SELECT count(*) FROM message_items")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM message_opens")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM contact_events")).scalar() == 0
        assert conn.execute(text("SELECT key FROM message_keys")).scalars().all() == ["pending"]


@pytest.fixture
def empty_database(database_url: str) -> Iterator[str]:
    """A database with nothing in it, on the test server."""
    name = f"nudge_mig_{uuid.uuid4().hex[:12]}"
    parts = urllib.parse.urlsplit(database_url)
    admin = urllib.parse.urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_COUNTS = {
    "contacts": "count(*), sum(id)",
    "messages": "count(*), sum(id), count(DISTINCT idempotency_key), count(name)",
    "message_items": "count(*), sum(message_id + contact_id), count(sent_at)",
    "contact_events": "count(*), sum(id), count(DISTINCT event_id), min(occurred_at)",
    "message_opens": "count(*), sum(opens)",
    "message_clicks": "count(*), sum(id)",
}


def _counts(conn: Connection) -> dict[str, tuple[object, ...]]:
    return {
        table: tuple(conn.execute(text(f"SELECT {c} FROM {table}")).one())  # noqa: S608 (constants)
        for table, c in _COUNTS.items()
    }


def test_the_migration_to_partitions_keeps_every_row(empty_database: str) -> None:
    upgrade(empty_database, "0013")
    engine = create_engine(empty_database)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("""
                INSERT INTO contacts (external_id) SELECT 'c-' || g FROM generate_series(1, 200) g;
                INSERT INTO messages (kind, idempotency_key, contact_id, template, channel,
                                      priority, scheduled_at, deliver_at, status)
                SELECT 'single', 'k-' || g, g, 'welcome', 'webhook', 'automation',
                       now(), now(), 3 FROM generate_series(1, 200) g;
                INSERT INTO messages (kind, idempotency_key, template, channel, priority,
                                      scheduled_at, deliver_at, name)
                VALUES ('campaign', 'campaign:spring', 'tip', 'log', 'campaign', now(), now(),
                        'spring');
                INSERT INTO message_items (message_id, contact_id, status, sent_at)
                SELECT id, coalesce(contact_id, 1), 'sent', now() FROM messages;
                INSERT INTO message_items (message_id, contact_id, status)
                SELECT m.id, c.id, 'planned' FROM messages m, contacts c
                 WHERE m.kind = 'campaign' AND c.id > 1;
                INSERT INTO contact_events (contact_id, name, occurred_at, event_id)
                SELECT 1 + g % 200, 'clicked', now() - g * interval '1 day', 'e-' || g
                  FROM generate_series(1, 2000) g;
                INSERT INTO message_opens (message_id, contact_id)
                SELECT message_id, contact_id FROM message_items WHERE status = 'sent';
                INSERT INTO message_clicks (message_id, contact_id, url)
                SELECT message_id, contact_id, 'https://example.com' FROM message_items
                 WHERE status = 'sent';
                """)
            )
            before = _counts(conn)
            top = conn.execute(text("SELECT max(id) FROM messages")).scalar_one()
        upgrade(empty_database)
        with engine.begin() as conn:
            after = _counts(conn)
            assert after == before
            assert conn.execute(text("SELECT count(*) FROM message_keys")).scalar() == 201
            # the events are in their months (three years back), older ones in the default
            assert (
                conn.execute(text("SELECT count(*) FROM contact_events_default")).scalar_one() > 0
            )
            assert conn.execute(text("SELECT count(*) FROM ONLY contact_events")).scalar() == 0
            # ids continue after the copied ones
            nxt = conn.execute(
                text(
                    "INSERT INTO messages (kind, idempotency_key, template, channel, priority, "
                    "scheduled_at, deliver_at) VALUES ('single', 'new', 'welcome', 'webhook', "
                    "'automation', now(), now()) RETURNING id"
                )
            ).scalar_one()
            assert nxt == top + 1
    finally:
        engine.dispose()
