"""count the takeovers of a recipient's claim

A claim whose lease ran out is taken over by another worker; when the claimers keep dying
after the send, each takeover may send again. The count caps it (``NUDGE_MAX_TAKEOVERS``).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "message_items",
        sa.Column("takeovers", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    op.drop_column("message_items", "takeovers")
