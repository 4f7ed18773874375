"""drop the partial index of sending recipients

Every claim inserted an entry into it and every finalise left that entry dead until the next
vacuum, and the planner, whose statistics never see many rows ``sending`` at once, chose to
read the whole index (dead entries and all) for each batch's finalise: a campaign of a million
recipients slowed down as it went. The window checks find in-flight claims through
``ix_message_items_contact_id_sent_at`` instead (a contact has few rows).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-21 11:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index(
        "ix_message_items_sending",
        table_name="message_items",
        postgresql_where=sa.text("status = 'sending'"),
    )


def downgrade() -> None:
    op.create_index(
        "ix_message_items_sending",
        "message_items",
        ["contact_id"],
        unique=False,
        postgresql_where=sa.text("status = 'sending'"),
    )
