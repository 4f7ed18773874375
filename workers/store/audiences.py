"""Audiences: who a campaign goes to, validated when the campaign is created and frozen into
``message_items`` when it starts.

An audience is stored as JSON on the campaign's ``messages`` row:

- ``{"kind": "subscribed"}``: every subscribed contact;
- ``{"kind": "filter", "conditions": [...]}``: contacts whose attributes match every
  condition (unsubscribed ones are frozen too, and recorded ``suppressed`` by the checks,
  so nobody disappears silently);
- ``{"kind": "ids", "ids": [...]}``: these external ids (also what a CSV audience becomes).

Any kind may also carry ``"behaviour": [{"event": E, "did": true|false, "within_seconds": S},
...]``: of those contacts, only the ones who did (or did not do) event E within the S seconds
before the audience is counted or frozen. All conditions must hold. A ``filter`` audience
may have behaviour conditions and no attribute conditions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    Text,
    and_,
    exists,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import insert

from shared.errors import InvalidMessage
from workers.durations import format_duration, parse_duration
from workers.recipients import ItemStatus
from workers.store.schema import contact_events, contacts, message_items, messages

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

_CONDITION = re.compile(
    r"^\s*(?P<attr>[A-Za-z_][A-Za-z0-9_.-]{0,63})\s*"
    r"(?:(?P<op>!=|=)\s*(?P<value>.*?)|\s+(?P<in>in)\s+(?P<values>.+?)|\s+(?P<exists>exists))\s*$"
)
_FORMS = "ATTRIBUTE=VALUE, ATTRIBUTE!=VALUE, ATTRIBUTE in V1,V2 or ATTRIBUTE exists"


def parse_condition(text: str) -> dict[str, Any]:
    """One ``--where`` condition as stored JSON; raises :class:`InvalidMessage` naming what
    forms are valid."""
    match = _CONDITION.match(text)
    if match is None:
        raise InvalidMessage(f"audience: bad filter {text!r}: expected {_FORMS}")
    attr = match["attr"]
    if match["exists"]:
        return {"attribute": attr, "op": "exists"}
    if match["in"]:
        values = [v.strip() for v in match["values"].split(",")]
        if not all(values):
            raise InvalidMessage(f"audience: bad filter {text!r}: empty value in the list")
        return {"attribute": attr, "op": "in", "values": values}
    if match["value"] == "":
        raise InvalidMessage(f"audience: bad filter {text!r}: no value after {match['op']!r}")
    return {
        "attribute": attr,
        "op": "eq" if match["op"] == "=" else "ne",
        "values": [match["value"]],
    }


_BEHAVIOUR = re.compile(r"^\s*(?P<event>[A-Za-z0-9_.:\-]{1,200})\s*:\s*(?P<window>\S.*?)\s*$")
#: The longest look-back of a behaviour condition.
MAX_WINDOW_SECONDS = 5 * 366 * 86400.0


def parse_behaviour(text: str, *, did: bool) -> dict[str, Any]:
    """One ``--did`` / ``--did-not`` condition (``EVENT:WINDOW``, e.g. ``purchased:30d``) as
    stored JSON; raises :class:`InvalidMessage` naming what is valid."""
    option = "--did" if did else "--did-not"
    match = _BEHAVIOUR.match(text)
    if match is None:
        raise InvalidMessage(
            f"audience: bad {option} {text!r}: expected EVENT:WINDOW, e.g. purchased:30d "
            "(event names: letters, digits, '_', '.', ':' or '-')"
        )
    try:
        window = parse_duration(match["window"]).total_seconds()
    except ValueError as exc:
        raise InvalidMessage(f"audience: bad {option} {text!r}: the window {exc}") from exc
    if not 0 < window <= MAX_WINDOW_SECONDS:
        raise InvalidMessage(
            f"audience: bad {option} {text!r}: the window must be more than 0 and at most "
            f"{format_duration(timedelta(seconds=MAX_WINDOW_SECONDS))}"
        )
    return {"event": match["event"], "did": did, "within_seconds": window}


def with_behaviour(
    audience: dict[str, Any] | None, did: Sequence[str], did_not: Sequence[str]
) -> dict[str, Any]:
    """``audience`` narrowed to the contacts who did ``did`` and did not do ``did_not``
    within their windows; with no audience, every contact (a filter without attributes)."""
    behaviour = [parse_behaviour(t, did=True) for t in did]
    behaviour += [parse_behaviour(t, did=False) for t in did_not]
    base = audience if audience is not None else {"kind": "filter", "conditions": []}
    return {**base, "behaviour": behaviour} if behaviour else base


def subscribed() -> dict[str, Any]:
    return {"kind": "subscribed"}


def filtered(conditions: Sequence[str]) -> dict[str, Any]:
    return {"kind": "filter", "conditions": [parse_condition(c) for c in conditions]}


def explicit(ids: Sequence[str]) -> dict[str, Any]:
    cleaned = sorted({i.strip() for i in ids if i.strip()})
    if not cleaned:
        raise InvalidMessage("audience: the list of external ids is empty")
    return {"kind": "ids", "ids": cleaned}


def describe(audience: dict[str, Any]) -> str:
    """A short human description."""
    behaviour = [
        f"{'did' if b['did'] else 'did not do'} {b['event']} within "
        f"{format_duration(timedelta(seconds=b['within_seconds']))}"
        for b in audience.get("behaviour", ())
    ]
    base = _describe_base(audience)
    if not behaviour:
        return base
    if audience["kind"] == "filter" and not audience["conditions"]:
        return "contacts who " + " and ".join(behaviour)
    return f"{base}, who " + " and ".join(behaviour)


def _describe_base(audience: dict[str, Any]) -> str:
    kind = audience["kind"]
    if kind == "subscribed":
        return "all subscribed contacts"
    if kind == "ids":
        return f"{len(audience['ids'])} listed contacts"
    parts = []
    for c in audience["conditions"]:
        if c["op"] == "exists":
            parts.append(f"{c['attribute']} exists")
        elif c["op"] == "in":
            parts.append(f"{c['attribute']} in {','.join(c['values'])}")
        else:
            parts.append(f"{c['attribute']}{'=' if c['op'] == 'eq' else '!='}{c['values'][0]}")
    return "contacts where " + " and ".join(parts)


def _condition(c: dict[str, Any]) -> ColumnElement[bool]:
    value: ColumnElement[str] = contacts.c.attributes[c["attribute"]].astext
    if c["op"] == "exists":
        exists: ColumnElement[bool] = contacts.c.attributes.has_key(c["attribute"])
        return exists
    if c["op"] == "eq":
        return value.in_(c["values"][:1])
    if c["op"] == "ne":
        return or_(value.is_(None), value != c["values"][0])
    return value.in_(c["values"])


def _behaviour(b: dict[str, Any]) -> ColumnElement[bool]:
    # on the (contact_id, name, occurred_at) index of contact_events
    did = exists().where(
        contact_events.c.contact_id == contacts.c.id,
        contact_events.c.name == b["event"],
        contact_events.c.occurred_at
        >= func.now() - func.make_interval(0, 0, 0, 0, 0, 0, b["within_seconds"]),
    )
    return did if b["did"] else not_(did)


def matches(audience: dict[str, Any], message_id: int | None = None) -> ColumnElement[bool]:
    """The WHERE clause over ``contacts`` selecting the audience. For an id list, the ids are
    read from the campaign's own row when ``message_id`` is given (no huge parameter list)."""
    return and_(
        _matches_base(audience, message_id),
        *(_behaviour(b) for b in audience.get("behaviour", ())),
    )


def _matches_base(audience: dict[str, Any], message_id: int | None) -> ColumnElement[bool]:
    kind = audience["kind"]
    if kind == "subscribed":
        return contacts.c.subscribed.is_(True)
    if kind == "filter":
        return and_(true(), *(_condition(c) for c in audience["conditions"]))
    if message_id is None:
        return contacts.c.external_id.in_(audience["ids"])
    listed = (
        select(func.jsonb_array_elements_text(messages.c.audience["ids"]))
        .where(messages.c.id == message_id)
        .scalar_subquery()
    )
    return contacts.c.external_id.in_(listed)


def count(conn: Connection, audience: dict[str, Any]) -> int:
    """How many contacts the audience matches now."""
    return int(
        conn.execute(
            select(func.count()).select_from(contacts).where(matches(audience))
        ).scalar_one()
    )


def unknown_ids(conn: Connection, ids: Sequence[str]) -> list[str]:
    """Which of ``ids`` are not stored contacts (sorted)."""
    known = conn.execute(
        select(contacts.c.external_id).where(
            contacts.c.external_id == func.any(literal(list(ids), type_=ARRAY(Text)))
        )
    ).scalars()
    return sorted(set(ids) - set(known))


def _freeze(message_id: int, audience: dict[str, Any]) -> Any:
    chosen = select(
        literal(message_id),
        contacts.c.id,
        literal(ItemStatus.PLANNED.value),
    ).where(matches(audience, message_id))
    inserted = (
        insert(message_items)
        .from_select(["message_id", "contact_id", "status"], chosen)
        .returning(literal(1))
        .cte("inserted")
    )
    # A draft has no recipient rows: nothing else inserts a campaign's, and the start that
    # inserts them takes it out of draft in the same transaction. So no ON CONFLICT clause: its
    # speculative insertion (an index probe and one more WAL record per row) was more than
    # half the insert's time for a million recipients, and a conflict, were there one, fails
    # the start instead of passing unnoticed. Counted where they are inserted: the rows
    # inserted are the audience (a count afterwards would read them all again).
    return select(func.count()).select_from(inserted)


def freeze(conn: Connection, message_id: int, audience: dict[str, Any]) -> int:
    """Insert every recipient as ``planned`` in one statement; returns how many."""
    return int(conn.execute(_freeze(message_id, audience)).scalar_one())


async def freeze_async(conn: AsyncConnection, message_id: int, audience: dict[str, Any]) -> int:
    """:func:`freeze` for the planner (a scheduled start)."""
    return int((await conn.execute(_freeze(message_id, audience))).scalar_one())
