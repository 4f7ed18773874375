"""A message's recipients as dispatch decides them: the statuses of messages and recipients,
the claimed recipient with its contact, the facts the checks read about that contact, and the
outcome recorded for it. The store builds these from its rows; :mod:`workers.checks` reads
them and imports no store module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from workers.reasons import Reason

#: A recipient: (message_id, contact_id).
Key = tuple[int, int]


class MessageStatus(enum.IntEnum):
    """``messages.status``."""

    NOT_STARTED = 0
    SENDING = 1
    PAUSED = 2
    COMPLETED = 3
    CANCELLED = 4


class ItemStatus(enum.StrEnum):
    """``message_items.status``: ``sending`` while claimed, ``deferred`` while waiting for a
    retry or a window; every other value is final."""

    SENDING = "sending"
    DEFERRED = "deferred"
    #: A campaign recipient frozen into the audience, not yet claimed by a dispatch worker.
    PLANNED = "planned"
    SENT = "sent"
    FAILED = "failed"
    EXCLUDED = "excluded"
    SUPPRESSED = "suppressed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self not in UNFINISHED


#: Statuses a recipient leaves: a campaign completes when none of its rows has one.
UNFINISHED = frozenset({ItemStatus.SENDING, ItemStatus.DEFERRED, ItemStatus.PLANNED})


@dataclass(frozen=True)
class Claimed:
    """A recipient this worker now owns, with everything needed to decide and deliver."""

    message_id: int
    contact_id: int
    attempts: int
    failures: int
    message_status: int
    idempotency_key: str
    template: str
    channel: str
    category: str | None
    priority: str
    data: dict[str, Any]
    deliver_at: datetime
    expires_at: datetime | None
    external_id: str
    email: str | None
    phone: str | None
    timezone: str | None
    attributes: dict[str, Any]
    subscribed: bool


@dataclass(frozen=True)
class ItemState:
    """A recipient row this worker could not claim: final, or someone else's for now."""

    status: ItemStatus
    attempts: int
    claimed_at: datetime | None
    next_attempt_at: datetime | None
    #: Its message (a campaign) is paused: the recipient is left for resume.
    paused: bool = False


@dataclass(frozen=True)
class Event:
    """Something the contact did (an exclusion or interaction event)."""

    name: str
    occurred_at: datetime


@dataclass(frozen=True)
class Sent:
    """A message sent to a contact (or being sent right now by some worker)."""

    at: datetime
    channel: str
    category: str | None


@dataclass(frozen=True)
class ItemOutcome:
    """How a claimed recipient ended (or why it waits): what its row is finalised with."""

    message_id: int
    contact_id: int
    #: The claim this outcome finalises (``attempts`` when claimed): a worker whose lease ran
    #: out cannot overwrite the outcome of the worker that took over.
    attempts: int
    status: ItemStatus
    reason: Reason | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    #: The send failed (counts towards the attempts limit).
    failed: bool = False
    #: The template version the recipient was rendered with, when it was rendered.
    template_version: int | None = None
