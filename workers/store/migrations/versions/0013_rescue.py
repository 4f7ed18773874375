"""rescue: find the recipients whose due message never came back from the delay

A delayed message can be lost by the broker (the x-delayed-message plugin drops those whose
time passed while its node was down). ``messages.rescued_at`` records when the scheduler last
published one of them again; two partial indexes find the overdue ones without reading
history: single and rule messages still pending by due time, and deferred recipients by retry time.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("rescued_at", sa.DateTime(timezone=True)))
    op.create_index(
        "ix_messages_pending_singles",
        "messages",
        ["deliver_at"],
        postgresql_where=sa.text(
            "kind <> 'campaign' AND status IN (0, 1) AND contact_id IS NOT NULL"
        ),
    )
    op.create_index(
        "ix_message_items_deferred",
        "message_items",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'deferred'"),
    )


def downgrade() -> None:
    op.drop_index("ix_message_items_deferred", table_name="message_items")
    op.drop_index("ix_messages_pending_singles", table_name="messages")
    op.drop_column("messages", "rescued_at")
