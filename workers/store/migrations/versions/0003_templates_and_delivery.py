"""templates

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 07:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "templates",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("text_body", sa.Text(), nullable=False),
        sa.Column("html_body", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_templates_version")),
        sa.CheckConstraint("name ~ '^[A-Za-z0-9_.-]{1,100}$'", name=op.f("ck_templates_name")),
        sa.PrimaryKeyConstraint("name", "version", name=op.f("pk_templates")),
    )


def downgrade() -> None:
    op.drop_table("templates")
