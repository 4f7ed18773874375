"""A campaign's states as an operator sees them, the actions each allows, and the pause.

The pause is here, written with psycopg alone, because ``nudge campaign pause`` is the command
an operator runs when a campaign is going wrong, and every recipient sent while it starts up is
one too many: importing SQLAlchemy (and the repository modules built on it) was most of its
start-up. It is the same transition as every other of :mod:`workers.store.campaigns`: one
conditional UPDATE, committed before the workers are told.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

from shared.errors import InvalidTransition, NotFound, StoreError, StoreUnavailable
from workers.recipients import MessageStatus

#: The states an operator sees, and which actions each allows.
ALLOWED: dict[str, frozenset[str]] = {
    "schedule": frozenset({"draft", "scheduled"}),
    "start": frozenset({"draft", "scheduled"}),
    "pause": frozenset({"sending"}),
    "resume": frozenset({"paused"}),
    "cancel": frozenset({"draft", "scheduled", "sending", "paused"}),
    "retry-failed": frozenset({"sending", "paused", "completed"}),
}


def state_name(status: int, start_at: datetime | None) -> str:
    """The state an operator sees of a campaign with ``messages.status`` ``status``."""
    s = MessageStatus(status)
    if s is MessageStatus.NOT_STARTED:
        return "scheduled" if start_at is not None else "draft"
    return {
        MessageStatus.SENDING: "sending",
        MessageStatus.PAUSED: "paused",
        MessageStatus.COMPLETED: "completed",
        MessageStatus.CANCELLED: "cancelled",
    }[s]


def check_state(name: str, state: str, action: str) -> None:
    """Raise :class:`InvalidTransition` unless ``action`` is allowed in ``state``."""
    if state not in ALLOWED[action]:
        allowed = ", ".join(sorted(ALLOWED[action]))
        raise InvalidTransition(
            f"cannot {action} campaign {name!r}: it is {state} "
            f"({action} needs a campaign that is {allowed})"
        )


@dataclass(frozen=True)
class Paused:
    """The campaign paused, and the planning round it was paused in."""

    id: int
    name: str
    round: int


# FOR UPDATE: a concurrent transition commits first or waits for this one; either way the
# state checked is the state changed.
_FIND = """
SELECT id, name, status, start_at FROM messages
 WHERE kind = 'campaign' AND (name = %(ref)s OR id = %(id)s) LIMIT 1 FOR UPDATE
"""
_PAUSE = """
UPDATE messages SET status = %(paused)s, status_reason = %(reason)s
 WHERE id = %(id)s AND status = %(sending)s RETURNING plan_round
"""


def pause(database_url: str, ref: str, reason: str) -> Paused:
    """Pause campaign ``ref`` (its name or id) and commit; raises :class:`NotFound`,
    :class:`InvalidTransition` when it is not sending, and :class:`StoreError` (or
    :class:`StoreUnavailable`) for what Postgres says."""
    conninfo = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        with psycopg.connect(conninfo) as conn:  # one transaction, committed on the way out
            found = conn.execute(
                _FIND, {"ref": ref, "id": int(ref) if ref.isdigit() else None}
            ).fetchone()
            if found is None:
                raise NotFound(f"no campaign {ref!r} (give its name or id; `nudge campaign list`)")
            id_, name, status, start_at = found
            check_state(name, state_name(status, start_at), "pause")
            row = conn.execute(
                _PAUSE,
                {
                    "id": id_,
                    "reason": reason,
                    "paused": int(MessageStatus.PAUSED),
                    "sending": int(MessageStatus.SENDING),
                },
            ).fetchone()
            assert row is not None  # locked and sending: the update matches it
            return Paused(id_, name, int(row[0]))
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"postgres: {_first_line(exc)}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"postgres: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)
