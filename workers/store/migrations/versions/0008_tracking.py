"""email tracking: per-template flags, opens and clicks per recipient; messages by contact

The web role records the first open (and how many times the pixel loaded) and every click
with its link, per message_items row; templates say whether their HTML gets a pixel and click
redirects. ``nudge contact show`` finds a contact's single messages not yet due through an
index of messages by contact.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_messages_contact_id", "messages", ["contact_id"], unique=False)
    op.add_column(
        "templates",
        sa.Column("track_opens", sa.Boolean(), server_default=sa.text("true"), nullable=False),
    )
    op.add_column(
        "templates",
        sa.Column("track_clicks", sa.Boolean(), server_default=sa.text("true"), nullable=False),
    )
    op.create_table(
        "message_opens",
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("contact_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "first_opened_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("opens", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id", "contact_id"],
            ["message_items.message_id", "message_items.contact_id"],
            name="fk_message_opens_message_items",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("message_id", "contact_id", name="pk_message_opens"),
    )
    op.create_table(
        "message_clicks",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("contact_id", sa.BigInteger(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column(
            "clicked_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["message_id", "contact_id"],
            ["message_items.message_id", "message_items.contact_id"],
            name="fk_message_clicks_message_items",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_message_clicks"),
    )
    op.create_index(
        "ix_message_clicks_message_id_contact_id",
        "message_clicks",
        ["message_id", "contact_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_message_clicks_message_id_contact_id", table_name="message_clicks")
    op.drop_table("message_clicks")
    op.drop_table("message_opens")
    op.drop_column("templates", "track_clicks")
    op.drop_column("templates", "track_opens")
    op.drop_index("ix_messages_contact_id", table_name="messages")
