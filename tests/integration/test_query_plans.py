"""The statements run per batch keep cheap plans when Postgres's statistics are stale, as they
are while a campaign sends: rows go planned -> sending -> final by the thousand between two
ANALYZEs, and a prepared statement is planned once (generic) for the life of a connection.

A plan that scans instead (a finalise reading every ``sending`` row, dead entries included,
because the statistics say almost none is ``sending``; a completion check walking over every
finished recipient) slows a million-recipient campaign down as it goes. These tests look at
the plans, not at a clock: the finalise must find each recipient by key (at 100,000 rows; on a
small table a scan is rightly cheaper), and completion must read the unfinished recipients
from the highest contact id down, not walk up from the lowest.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, TextClause, text

from workers.recipients import MessageStatus
from workers.store.campaigns import _COMPLETE
from workers.store.messages import _FINALISE

N = 100_000


def _plan(engine: Engine, clause: TextClause, params: dict[str, Any]) -> str:
    sql = str(clause.compile(dialect=engine.dialect))
    dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        rows = conn.execute(f"EXPLAIN {sql}", params, prepare=True).fetchall()
        conn.rollback()
    return "\n".join(r[0] for r in rows)


@pytest.fixture
def campaign_midway(engine: Engine) -> int:
    """A campaign of N recipients, analyzed when all were planned, three quarters sent since."""
    with engine.begin() as conn:
        # the partition that holds the campaign's recipients (a partitioned table has no
        # storage parameters of its own)
        conn.execute(text("ALTER TABLE message_items_initial SET (autovacuum_enabled = false)"))
        conn.execute(
            text(
                "INSERT INTO contacts (external_id) SELECT 'c-' || g FROM generate_series(1, :n) g"
            ),
            {"n": N},
        )
        mid = conn.execute(
            text(
                "INSERT INTO messages (kind, idempotency_key, template, channel, priority, "
                "scheduled_at, deliver_at, status) VALUES ('campaign', 'campaign:plans', 'tip', "
                "'log', 'campaign', now(), now(), 1) RETURNING id"
            )
        ).scalar_one()
        conn.execute(
            text(
                "INSERT INTO message_items (message_id, contact_id, status) "
                "SELECT :m, id, 'planned' FROM contacts"
            ),
            {"m": mid},
        )
    with engine.connect() as conn:
        conn.execute(text("ANALYZE message_items"))
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE message_items SET status = 'sending', attempts = 1, "
                "claimed_at = now() WHERE contact_id <= :k"
            ),
            {"k": N * 3 // 4},
        )
        conn.execute(
            text("UPDATE message_items SET status = 'sent', sent_at = now() WHERE contact_id < :k"),
            {"k": N * 3 // 4 - 250},
        )
    return int(mid)


def test_the_finalise_probes_each_recipient_by_key_whatever_the_statistics_say(
    engine: Engine, campaign_midway: int
) -> None:
    n = 250
    first = N * 3 // 4 - n + 1
    plan = _plan(
        engine,
        _FINALISE,
        {
            "mids": [campaign_midway] * n,
            "cids": list(range(first, first + n)),
            "attempts": [1] * n,
            "statuses": ["sent"] * n,
            "reasons": [None] * n,
            "errors": [None] * n,
            "nexts": [None] * n,
            "failed": [0] * n,
            "versions": [None] * n,
            "not_started": int(MessageStatus.NOT_STARTED),
            "sending": int(MessageStatus.SENDING),
            "completed": int(MessageStatus.COMPLETED),
        },
    )
    # one index probe per recipient, not a scan of every row or index entry then a hash
    assert "Index Cond: ((message_id = v.message_id) AND (contact_id = v.contact_id))" in plan
    assert "Hash Join" not in plan, plan
    # (the empty partitions of the coming months may be scanned: nothing to read there)
    assert "Seq Scan on message_items_initial" not in plan, plan
    assert "Bitmap" not in plan, plan


def test_completion_looks_for_an_unfinished_recipient_from_the_top(
    engine: Engine, campaign_midway: int
) -> None:
    plan = _plan(
        engine,
        _COMPLETE,
        {
            "id": campaign_midway,
            "sending": int(MessageStatus.SENDING),
            "completed": int(MessageStatus.COMPLETED),
        },
    )
    # the index's copy on the partitions (Postgres names them)
    with engine.connect() as conn:
        names = conn.execute(
            text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'ix_message_items_unfinished'::regclass"
            )
        ).scalars()
        wanted = {f"Index Only Scan Backward using {name}" for name in names}
    assert any(w in plan for w in wanted), plan
