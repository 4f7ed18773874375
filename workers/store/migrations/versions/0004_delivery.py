"""delivery: the template version each recipient was rendered with

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 07:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("message_items", sa.Column("template_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("message_items", "template_version")
