"""Audiences: who a campaign goes to, validated when the campaign is created and frozen into
``message_items`` when it starts.

An audience is stored as JSON on the campaign's ``messages`` row:

- ``{"kind": "subscribed"}``: every subscribed contact;
- ``{"kind": "filter", "conditions": [...]}``: contacts whose attributes match every
  condition (unsubscribed ones are frozen too, and recorded ``suppressed`` by the checks,
  so nobody disappears silently);
- ``{"kind": "ids", "ids": [...]}``: these external ids (also what a CSV audience becomes).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    Text,
    and_,
    func,
    literal,
    or_,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.errors import InvalidMessage
from workers.recipients import ItemStatus
from workers.store.schema import contacts, message_items, messages

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


def matches(audience: dict[str, Any], message_id: int | None = None) -> ColumnElement[bool]:
    """The WHERE clause over ``contacts`` selecting the audience. For an id list, the ids are
    read from the campaign's own row when ``message_id`` is given (no huge parameter list)."""
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
        .on_conflict_do_nothing()
        .returning(literal(1))
        .cte("inserted")
    )
    # counted where they are inserted: a draft has no recipient rows yet, so the rows
    # inserted are the audience (a count afterwards would read them all again)
    return select(func.count()).select_from(inserted)


def freeze(conn: Connection, message_id: int, audience: dict[str, Any]) -> int:
    """Insert every recipient as ``planned`` in one statement; returns how many."""
    return int(conn.execute(_freeze(message_id, audience)).scalar_one())


async def freeze_async(conn: AsyncConnection, message_id: int, audience: dict[str, Any]) -> int:
    """:func:`freeze` for the planner (a scheduled start)."""
    return int((await conn.execute(_freeze(message_id, audience))).scalar_one())
