"""The Postgres schema, as SQLAlchemy Core tables. Alembic migrations create it; a test proves
the migrations and these tables agree.

``messages`` and ``message_items`` are partitioned by RANGE of the message id, one partition
per month, and ``contact_events`` by RANGE of ``occurred_at`` (workers/store/partitions.py):
their partitions are not declared here.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from workers.recipients import ItemStatus, MessageStatus

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _now() -> Column[object]:
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now())


contacts = Table(
    "contacts",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("external_id", Text, nullable=False, unique=True),
    Column("email", Text),
    Column("phone", Text),
    Column("timezone", Text),
    Column("attributes", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("subscribed", Boolean, nullable=False, server_default=text("true")),
    _now(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

contact_events = Table(
    "contact_events",
    metadata,
    Column("id", BigInteger, Identity(always=False), nullable=False),
    Column("contact_id", BigInteger, ForeignKey("contacts.id", ondelete="CASCADE"), nullable=False),
    Column("name", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("event_id", Text, nullable=False),
    Column("data", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # keys contain the partition key (migration 0014): a redelivered event carries the same
    # occurred_at, so (event_id, occurred_at) still records it once
    PrimaryKeyConstraint("id", "occurred_at"),
    UniqueConstraint("event_id", "occurred_at"),
    # "did contact C do any of E1..En since T"
    Index(None, "contact_id", "name", "occurred_at"),
    postgresql_partition_by="RANGE (occurred_at)",
)

messages = Table(
    "messages",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("kind", Text, nullable=False),
    #: Unique through ``message_keys`` (a partitioned table has no global unique index).
    Column("idempotency_key", Text, nullable=False),
    Column("contact_id", BigInteger, ForeignKey("contacts.id", ondelete="CASCADE")),
    Column("template", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("category", Text),
    Column("priority", Text, nullable=False),
    Column("exclude_events", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("exclude_scope", Text, nullable=False, server_default=text("'since_scheduled'")),
    Column("exclude_within_seconds", Float),
    #: With ``since_scheduled``, exclusion events count from here (rules: after the trigger).
    Column("exclude_since", DateTime(timezone=True)),
    Column("data", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("scheduled_at", DateTime(timezone=True), nullable=False),
    Column("deliver_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("status", SmallInteger, nullable=False, server_default=text("0")),
    Column("planned", Integer, nullable=False, server_default=text("0")),
    #: When the scheduler last published this message's due message again because it had not
    #: come back from the delay (migration 0013; ``workers/store/rescue.py``).
    Column("rescued_at", DateTime(timezone=True)),
    _now(),
    CheckConstraint("kind IN ('single', 'campaign', 'rule')", name="kind"),
    CheckConstraint("priority IN ('transactional', 'automation', 'campaign')", name="priority"),
    CheckConstraint(
        f"status BETWEEN {min(MessageStatus):d} AND {max(MessageStatus):d}", name="status"
    ),
    CheckConstraint("exclude_scope IN ('since_scheduled', 'ever', 'within')", name="exclude_scope"),
    # a contact's single messages not yet due, for `nudge contact show` (migration 0008)
    Index(None, "contact_id"),
    # the rescue: single and rule messages still pending, by due time (migration 0013); its
    # `contact_id IS NOT NULL`, which only the rescue asks, keeps the finalise's completion of
    # a message on the primary key
    Index(
        "ix_messages_pending_singles",
        "deliver_at",
        postgresql_where=text("kind <> 'campaign' AND status IN (0, 1) AND contact_id IS NOT NULL"),
    ),
    # campaigns by status, a handful of rows: the prune's "which campaigns are not finished"
    # (migration 0014)
    Index("ix_messages_campaigns", "status", postgresql_where=text("kind = 'campaign'")),
    # one partition per month of ids (workers/store/partitions.py, migration 0014)
    postgresql_partition_by="RANGE (id)",
)

_item_statuses = ", ".join(f"'{s.value}'" for s in ItemStatus)

message_items = Table(
    "message_items",
    metadata,
    Column("message_id", BigInteger, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("contact_id", BigInteger, ForeignKey("contacts.id", ondelete="CASCADE"), nullable=False),
    Column("status", Text, nullable=False),
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    #: Failed sends so far; ``attempts`` also counts claims that ended deferred by a window.
    Column("failures", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("claimed_at", DateTime(timezone=True)),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("sent_at", DateTime(timezone=True)),
    Column("read_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    #: The version of the message's template this recipient was rendered with (migration 0004).
    Column("template_version", Integer),
    #: How many times a claim of it ran out of its lease (migration 0010): capped by
    #: ``NUDGE_MAX_TAKEOVERS``.
    Column("takeovers", Integer, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("message_id", "contact_id"),
    CheckConstraint(f"status IN ({_item_statuses})", name="status"),
    # window checks: what was sent to this contact lately, and what is being sent now (no
    # partial index of ``sending`` rows: see migration 0007)
    Index(None, "contact_id", "sent_at"),
    # campaigns: the planner's keyset over recipients still to send, and "is it finished?"
    Index(
        "ix_message_items_unfinished",
        "message_id",
        "contact_id",
        postgresql_where=text("status IN ('planned', 'sending', 'deferred')"),
    ),
    # the rescue: deferred recipients by retry time (migration 0013)
    Index(
        "ix_message_items_deferred",
        "next_attempt_at",
        postgresql_where=text("status = 'deferred'"),
    ),
    # with its message's partition: the same month of message ids (migration 0014)
    postgresql_partition_by="RANGE (message_id)",
)

#: The idempotency key of every message (migration 0014), written in the transaction that
#: stores the message: the key's global uniqueness, which the partitioned ``messages`` cannot
#: hold. A campaign's key is ``campaign:<name>``, so it makes names unique too. A key is
#: deleted by ``nudge db prune`` once older than ``NUDGE_RETENTION_MESSAGE_KEYS_DAYS`` and its
#: message is gone.
message_keys = Table(
    "message_keys",
    metadata,
    Column("key", Text, primary_key=True),
    Column("message_id", BigInteger, nullable=False),
    _now(),
)

policies = Table(
    "policies",
    metadata,
    Column("name", Text, primary_key=True),
    Column("settings", JSONB, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("name IN ('transactional', 'automation', 'campaign')", name="name"),
)

templates = Table(
    "templates",
    metadata,
    Column("name", Text, nullable=False),
    #: Versions count up from 1 per name; a message_item records the version it was sent with.
    Column("version", Integer, nullable=False),
    Column("subject", Text),
    Column("text_body", Text, nullable=False),
    Column("html_body", Text),
    _now(),
    #: Email tracking (migration 0008): an open pixel, and links rewritten to click redirects.
    Column("track_opens", Boolean, nullable=False, server_default=text("true")),
    Column("track_clicks", Boolean, nullable=False, server_default=text("true")),
    #: The category of messages that give none (migration 0012), for the dedup window.
    Column("category", Text),
    PrimaryKeyConstraint("name", "version"),
    CheckConstraint("version >= 1", name="version"),
    CheckConstraint("name ~ '^[A-Za-z0-9_.-]{1,100}$'", name="name"),
)

# Email tracking (migration 0008), served by the web role: per recipient, the first open
# and how many times the pixel loaded, and every click with its link.
message_opens = Table(
    "message_opens",
    metadata,
    Column("message_id", BigInteger, nullable=False),
    Column("contact_id", BigInteger, nullable=False),
    Column("first_opened_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("opens", Integer, nullable=False, server_default=text("1")),
    PrimaryKeyConstraint("message_id", "contact_id"),
    ForeignKeyConstraint(
        ["message_id", "contact_id"],
        ["message_items.message_id", "message_items.contact_id"],
        name="fk_message_opens_message_items",
        ondelete="CASCADE",
    ),
)

message_clicks = Table(
    "message_clicks",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("message_id", BigInteger, nullable=False),
    Column("contact_id", BigInteger, nullable=False),
    Column("url", Text, nullable=False),
    Column("clicked_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    ForeignKeyConstraint(
        ["message_id", "contact_id"],
        ["message_items.message_id", "message_items.contact_id"],
        name="fk_message_clicks_message_items",
        ondelete="CASCADE",
    ),
    Index(None, "message_id", "contact_id"),
)

rules = Table(
    "rules",
    metadata,
    Column("name", Text, primary_key=True),
    #: The events that trigger the rule (``definition.event``), for matching by overlap.
    Column("events", ARRAY(Text), nullable=False),
    #: The validated rule (:class:`workers.rules.definitions.Rule`) as JSON.
    Column("definition", JSONB, nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    #: Counts up each time a load changes the definition.
    Column("version", Integer, nullable=False, server_default=text("1")),
    _now(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("name ~ '^[A-Za-z0-9_.:-]{1,200}$'", name="name"),
)

rule_runs = Table(
    "rule_runs",
    metadata,
    Column("rule", Text, ForeignKey("rules.name", ondelete="CASCADE"), nullable=False),
    Column("contact_id", BigInteger, ForeignKey("contacts.id", ondelete="CASCADE"), nullable=False),
    #: The event that fired the run-once rule for this contact: a redelivery of it fires
    #: again (idempotently), any other event does not.
    Column("event_id", Text, nullable=False),
    Column("fired_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("rule", "contact_id"),
)


#: The next free send slot of each rate-limited channel, shared by every dispatch process
#: (workers/store/rates.py).
rate_slots = Table(
    "rate_slots",
    metadata,
    Column("channel", Text, primary_key=True),
    Column("next_at", DateTime(timezone=True), nullable=False),
)

#: Per running ``events`` consumer: every event published to ``nudge.events`` before
#: ``recorded_until`` is in ``contact_events``. Dispatch reads the minimum over the live
#: consumers before sending a message that lists exclusion events.
events_watermarks = Table(
    "events_watermarks",
    metadata,
    Column("consumer", Text, primary_key=True),
    Column("recorded_until", DateTime(timezone=True), nullable=False),
    Column("beat_at", DateTime(timezone=True), nullable=False),
)

# Campaigns (migration 0005) are ``messages`` rows of kind ``campaign``; these columns are
# null for other kinds. Draft is status 0 without ``start_at``; scheduled is status 0 with it.
CAMPAIGN_COLUMNS = (
    #: Unique through ``message_keys`` (key ``campaign:<name>``).
    Column("name", Text),
    #: Who receives it, validated (see workers/store/audiences.py); frozen at start.
    Column("audience", JSONB),
    Column("batch_size", Integer),
    Column("chunk_size", Integer),
    #: Recipients per second for the whole campaign, enforced by the planner (None: no limit).
    Column("rate_per_second", Float),
    #: Pause when more than this fraction of the last ``auto_pause_window`` sends failed.
    Column("auto_pause_threshold", Float),
    Column("auto_pause_window", Integer),
    #: Recipients not sent this long after the start are recorded ``expired``.
    Column("expires_after_seconds", Float),
    Column("start_at", DateTime(timezone=True)),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    #: Why it is paused or cancelled (an operator, or the auto-pause and its figures).
    Column("status_reason", Text),
    #: Each start, resume and retry-failed begins a new planning round from the first contact.
    Column("plan_round", Integer, nullable=False, server_default=text("0")),
    #: The planner's keyset cursor in this round: the last contact id published.
    Column("planned_through", BigInteger),
    Column("plan_done", Boolean, nullable=False, server_default=text("false")),
)
for _column in CAMPAIGN_COLUMNS:
    messages.append_column(_column)
