"""templates carry a category

A message stored without a ``category`` takes its template's (the newest version's), so the
category dedup window holds without the producers' help.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("templates", sa.Column("category", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("templates", "category")
