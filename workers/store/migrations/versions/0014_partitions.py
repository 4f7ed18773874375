"""partitions: messages, message_items and contact_events partitioned by time

``messages`` and ``message_items`` become partitioned by RANGE of the message id (one
partition per month of ids, see ``workers/store/partitions.py``); every existing row goes
into ``*_initial``, which covers every id below the first id of next month.
``contact_events`` becomes partitioned by RANGE of ``occurred_at``: one partition per month
from its oldest event (at most three years back) to two months ahead, and
``contact_events_default`` for the rest. The unique idempotency keys (and with them campaign
names) move to ``message_keys``; the unique event id becomes (event_id, occurred_at). A partial
index of campaigns by status lets the prune find the unfinished ones without a scan.

Each table is copied into a new partitioned table, which then takes the old one's name,
indexes and constraints; the id sequences keep their positions.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 17:30:00
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# The layout of workers/store/partitions.py, copied so this migration stays as it is.
EPOCH_MONTH = 2020 * 12
ID_BITS = 32
EVENTS_MONTHS_BACK = 36
AHEAD_MONTHS = 2


def _first_id(month: int) -> int:
    return (month - EPOCH_MONTH) << ID_BITS


def _month_start(month: int) -> str:
    return datetime(month // 12, month % 12 + 1, 1, tzinfo=UTC).isoformat()


def _suffix(month: int) -> str:
    return f"y{month // 12:04d}m{month % 12 + 1:02d}"


def _month(at: datetime) -> int:
    return at.year * 12 + at.month - 1


def _copy(table: str, partition_by: str) -> None:
    """``{table}_new``: partitioned, same columns, defaults, identity and checks, the rows."""
    op.execute(
        f"CREATE TABLE {table}_new (LIKE {table} INCLUDING DEFAULTS INCLUDING IDENTITY "
        f"INCLUDING CONSTRAINTS) PARTITION BY RANGE ({partition_by})"
    )


def _swap(table: str, sequence: bool) -> None:
    if sequence:
        op.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}_new', 'id'), s.last_value, "  # noqa: S608 (a constant)
            f"s.is_called) FROM {table}_id_seq s"
        )
    op.execute(f"DROP TABLE {table} CASCADE")
    op.execute(f"ALTER TABLE {table}_new RENAME TO {table}")
    if sequence:
        op.execute(f"ALTER SEQUENCE {table}_new_id_seq RENAME TO {table}_id_seq")


def upgrade() -> None:
    bind = op.get_bind()
    now = bind.exec_driver_sql("SELECT now()").scalar_one()
    current = _month(now)
    first_month_id = _first_id(current + 1)
    top = bind.exec_driver_sql("SELECT coalesce(max(id), 0) FROM messages").scalar_one()
    if top >= first_month_id:
        raise RuntimeError(f"messages.id reaches {top}: above {first_month_id}, cannot partition")

    # idempotency keys (and campaign names, whose key is 'campaign:<name>')
    op.execute("""
        CREATE TABLE message_keys (
            key text NOT NULL,
            message_id bigint NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_message_keys PRIMARY KEY (key))
    """)
    op.execute(
        "INSERT INTO message_keys (key, message_id, created_at) "
        "SELECT idempotency_key, id, created_at FROM messages"
    )

    # messages and message_items, by message id
    for table, key in (("messages", "id"), ("message_items", "message_id")):
        _copy(table, key)
        op.execute(
            f"CREATE TABLE {table}_initial PARTITION OF {table}_new "
            f"FOR VALUES FROM (MINVALUE) TO ({first_month_id})"
        )
        op.execute(f"INSERT INTO {table}_new SELECT * FROM {table}")  # noqa: S608 (a constant)
    op.execute("ALTER TABLE message_opens DROP CONSTRAINT fk_message_opens_message_items")
    op.execute("ALTER TABLE message_clicks DROP CONSTRAINT fk_message_clicks_message_items")
    _swap("message_items", sequence=False)
    _swap("messages", sequence=True)
    op.execute("""
        ALTER TABLE messages ADD CONSTRAINT pk_messages PRIMARY KEY (id);
        ALTER TABLE messages ADD CONSTRAINT fk_messages_contact_id_contacts
            FOREIGN KEY (contact_id) REFERENCES contacts (id) ON DELETE CASCADE;
        CREATE INDEX ix_messages_contact_id ON messages (contact_id);
        CREATE INDEX ix_messages_pending_singles ON messages (deliver_at)
            WHERE kind <> 'campaign' AND status IN (0, 1) AND contact_id IS NOT NULL;
        CREATE INDEX ix_messages_campaigns ON messages (status) WHERE kind = 'campaign';
        ALTER TABLE message_items ADD CONSTRAINT pk_message_items
            PRIMARY KEY (message_id, contact_id);
        ALTER TABLE message_items ADD CONSTRAINT fk_message_items_contact_id_contacts
            FOREIGN KEY (contact_id) REFERENCES contacts (id) ON DELETE CASCADE;
        ALTER TABLE message_items ADD CONSTRAINT fk_message_items_message_id_messages
            FOREIGN KEY (message_id) REFERENCES messages (id) ON DELETE CASCADE;
        CREATE INDEX ix_message_items_contact_id_sent_at ON message_items (contact_id, sent_at);
        CREATE INDEX ix_message_items_unfinished ON message_items (message_id, contact_id)
            WHERE status IN ('planned', 'sending', 'deferred');
        CREATE INDEX ix_message_items_deferred ON message_items (next_attempt_at)
            WHERE status = 'deferred';
        ALTER TABLE message_opens ADD CONSTRAINT fk_message_opens_message_items
            FOREIGN KEY (message_id, contact_id)
            REFERENCES message_items (message_id, contact_id) ON DELETE CASCADE;
        ALTER TABLE message_clicks ADD CONSTRAINT fk_message_clicks_message_items
            FOREIGN KEY (message_id, contact_id)
            REFERENCES message_items (message_id, contact_id) ON DELETE CASCADE;
    """)

    # contact_events, by event time
    oldest = bind.exec_driver_sql("SELECT min(occurred_at) FROM contact_events").scalar_one()
    start = max(_month(oldest), current - EVENTS_MONTHS_BACK) if oldest else current
    _copy("contact_events", "occurred_at")
    op.execute("CREATE TABLE contact_events_default PARTITION OF contact_events_new DEFAULT")
    for month in range(start, current + AHEAD_MONTHS + 1):
        op.execute(
            f"CREATE TABLE contact_events_{_suffix(month)} PARTITION OF contact_events_new "
            f"FOR VALUES FROM ('{_month_start(month)}') TO ('{_month_start(month + 1)}')"
        )
    op.execute("INSERT INTO contact_events_new SELECT * FROM contact_events")
    _swap("contact_events", sequence=True)
    op.execute("""
        ALTER TABLE contact_events ADD CONSTRAINT pk_contact_events PRIMARY KEY (id, occurred_at);
        ALTER TABLE contact_events ADD CONSTRAINT uq_contact_events_event_id_occurred_at
            UNIQUE (event_id, occurred_at);
        ALTER TABLE contact_events ADD CONSTRAINT fk_contact_events_contact_id_contacts
            FOREIGN KEY (contact_id) REFERENCES contacts (id) ON DELETE CASCADE;
        CREATE INDEX ix_contact_events_contact_id_name_occurred_at
            ON contact_events (contact_id, name, occurred_at);
    """)
    for table in ("messages", "message_items", "contact_events", "message_keys"):
        op.execute(f"ANALYZE {table}")


def downgrade() -> None:
    raise NotImplementedError(
        "0014 (partitions) has no downgrade: restore the database from a backup taken before it"
    )
