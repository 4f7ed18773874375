"""rules

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21 07:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("exclude_since", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "rules",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("events", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("definition", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("name ~ '^[A-Za-z0-9_.:-]{1,200}$'", name=op.f("ck_rules_name")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_rules")),
    )
    op.create_table(
        "rule_runs",
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("contact_id", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column(
            "fired_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["rule"], ["rules.name"], name=op.f("fk_rule_runs_rule_rules"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["contact_id"],
            ["contacts.id"],
            name=op.f("fk_rule_runs_contact_id_contacts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("rule", "contact_id", name=op.f("pk_rule_runs")),
    )


def downgrade() -> None:
    op.drop_table("rule_runs")
    op.drop_table("rules")
    op.drop_column("messages", "exclude_since")
