"""campaigns: campaign columns on messages, 'planned' recipients, the unfinished index

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21 07:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_BEFORE = (
    "'sending', 'deferred', 'sent', 'failed', 'excluded', 'suppressed', 'expired', 'cancelled'"
)
_AFTER = (
    "'sending', 'deferred', 'planned', 'sent', 'failed', 'excluded', 'suppressed', "
    "'expired', 'cancelled'"
)

_COLUMNS = (
    ("name", sa.Text()),
    ("audience", JSONB()),
    ("batch_size", sa.Integer()),
    ("chunk_size", sa.Integer()),
    ("rate_per_second", sa.Float()),
    ("auto_pause_threshold", sa.Float()),
    ("auto_pause_window", sa.Integer()),
    ("expires_after_seconds", sa.Float()),
    ("start_at", sa.DateTime(timezone=True)),
    ("started_at", sa.DateTime(timezone=True)),
    ("finished_at", sa.DateTime(timezone=True)),
    ("status_reason", sa.Text()),
    ("planned_through", sa.BigInteger()),
)


def upgrade() -> None:
    for name, type_ in _COLUMNS:
        op.add_column("messages", sa.Column(name, type_, nullable=True))
    op.add_column(
        "messages",
        sa.Column("plan_round", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "messages",
        sa.Column("plan_done", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.create_unique_constraint(op.f("uq_messages_name"), "messages", ["name"])
    op.drop_constraint(op.f("ck_message_items_status"), "message_items", type_="check")
    op.create_check_constraint(
        op.f("ck_message_items_status"), "message_items", f"status IN ({_AFTER})"
    )
    op.create_index(
        "ix_message_items_unfinished",
        "message_items",
        ["message_id", "contact_id"],
        postgresql_where=sa.text("status IN ('planned', 'sending', 'deferred')"),
    )


def downgrade() -> None:
    op.drop_index("ix_message_items_unfinished", table_name="message_items")
    op.execute("DELETE FROM message_items WHERE status = 'planned'")
    op.drop_constraint(op.f("ck_message_items_status"), "message_items", type_="check")
    op.create_check_constraint(
        op.f("ck_message_items_status"), "message_items", f"status IN ({_BEFORE})"
    )
    op.drop_constraint(op.f("uq_messages_name"), "messages", type_="unique")
    for name in ("plan_done", "plan_round", *(n for n, _ in reversed(_COLUMNS))):
        op.drop_column("messages", name)
