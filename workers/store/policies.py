"""Repository for anti-spam policies (one row per priority class)."""

from __future__ import annotations

from sqlalchemy import Connection, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.contract import Priority
from workers.policy import DEFAULTS, Policy
from workers.store.schema import policies


async def load_all(conn: AsyncConnection) -> dict[str, Policy]:
    """The policy of every priority class: stored, or the default."""
    stored = {row.name: Policy.model_validate(row.settings)
              for row in await conn.execute(select(policies))}  # fmt: skip
    return {p.value: stored.get(p.value, DEFAULTS[p]) for p in Priority}


def get(conn: Connection, name: Priority) -> tuple[Policy, bool]:
    """The policy for ``name`` and whether it is stored (False: the built-in default)."""
    row = conn.execute(select(policies.c.settings).where(policies.c.name == name.value)).first()
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
