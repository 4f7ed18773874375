"""Repository for anti-spam policies (one row per priority class)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import structlog
from pydantic import ValidationError
from sqlalchemy import Connection, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.contract import Priority
from workers.policies import DEFAULTS, Policy
from workers.store.db import Statement
from workers.store.schema import policies

log = structlog.get_logger("nudge.policies")


#: Every stored policy; read with :func:`from_rows`.
LOAD_ALL: Statement = (text("SELECT name, settings FROM policies"), {})


async def load_all(conn: AsyncConnection) -> dict[str, Policy]:
    """The policy of every priority class: stored, or the default."""
    return from_rows(await conn.execute(*LOAD_ALL))


def from_rows(rows: Iterable[Any]) -> dict[str, Policy]:
    """The policy of every priority class from the stored rows: stored, or the default."""
    stored: dict[str, Policy] = {}
    for row in rows:
        try:
            stored[row.name] = Policy.model_validate(row.settings)
        except ValidationError as exc:
            # Parking every due message would be worse than the default policy.
            log.error(
                "stored policy invalid, using the default",
                policy=row.name,
                error=str(exc).splitlines()[0],
            )
    return {p.value: stored.get(p.value, DEFAULTS[p]) for p in Priority}


def get(conn: Connection, name: Priority, *, for_update: bool = False) -> tuple[Policy, bool]:
    """The policy for ``name`` and whether it is stored (False: the built-in default);
    ``for_update`` locks the row until the transaction ends."""
    query = select(policies.c.settings).where(policies.c.name == name.value)
    row = conn.execute(query.with_for_update() if for_update else query).first()
    if row is None:
        return DEFAULTS[name], False
    return Policy.model_validate(row.settings), True


def put(conn: Connection, name: Priority, policy: Policy) -> None:
    """Store ``policy`` for ``name``; dispatch workers apply it from their next batch."""
    conn.execute(
        insert(policies)
        .values(name=name.value, settings=policy.model_dump(mode="json"))
        .on_conflict_do_update(
            index_elements=[policies.c.name],
            set_={"settings": text("excluded.settings"), "updated_at": text("now()")},
        )
    )


def reset(conn: Connection, name: Priority) -> None:
    """Forget the stored policy for ``name``: the built-in default applies again."""
    conn.execute(policies.delete().where(policies.c.name == name.value))
