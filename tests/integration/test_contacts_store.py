"""Contact references from requests and events change a stored contact only where they say
something new: fields left out keep their value, attributes merge, and a reference that
repeats what is stored does not rewrite the row."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Engine, text

from shared.contract import ContactRef
from workers.store import contacts
from workers.store.db import async_engine, transaction


def _apply(database_url: str, *refs: ContactRef) -> None:
    async def run() -> None:
        engine = async_engine(database_url, pool_size=1)
        try:
            async with transaction(engine) as conn:
                await contacts.ensure(conn, refs)
                await contacts.update(conn, refs)
        finally:
            await engine.dispose()

    asyncio.run(run())


def _row(engine: Engine) -> dict[str, Any]:
    query = text(
        "SELECT email, phone, attributes, subscribed, updated_at, xmin "
        "FROM contacts WHERE external_id = 'u-1'"
    )
    with engine.connect() as conn:
        return dict(conn.execute(query).mappings().one())


def test_a_reference_changes_what_it_names_and_repeating_it_writes_nothing(
    engine: Engine, database_url: str
) -> None:
    _apply(database_url, ContactRef(id="u-1", email="a@example.com", attributes={"tier": "free"}))
    created = _row(engine)
    assert (created["email"], created["attributes"]) == ("a@example.com", {"tier": "free"})

    _apply(database_url, ContactRef(id="u-1", email="a@example.com", attributes={"tier": "free"}))
    _apply(database_url, ContactRef(id="u-1"))
    assert _row(engine) == created  # same row version: nothing rewritten

    _apply(
        database_url,
        ContactRef(id="u-1", phone="+33100000000", attributes={"lang": "fr"}, subscribed=False),
    )
    changed = _row(engine)
    assert changed["email"] == "a@example.com"  # left out: kept
    assert changed["phone"] == "+33100000000"
    assert changed["attributes"] == {"tier": "free", "lang": "fr"}  # merged
    assert changed["subscribed"] is False
    assert changed["updated_at"] > created["updated_at"]
