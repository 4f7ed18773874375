"""Contact references from requests and events change a stored contact only where they say
something new: fields left out keep their value, attributes merge, and a reference that
repeats what is stored does not rewrite the row."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, text

from shared.contract import ContactRef, ScheduleMessage
from workers.store import contacts, messages
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


def test_a_batch_of_new_requests_stores_each_contact_with_its_latest_fields(
    engine: Engine, database_url: str
) -> None:
    def request(email: str) -> ScheduleMessage:
        return ScheduleMessage(
            contact=ContactRef(id="u-1", email=email, attributes={"n": email[0]}),
            template="t",
            channel="log",
            deliver_at=datetime.now(UTC),
        )

    async def run() -> None:
        eng = async_engine(database_url, pool_size=1)
        try:
            async with transaction(eng) as conn:
                await messages.insert_single_messages(
                    conn,
                    [("k-1", request("a@example.com")), ("k-2", request("b@example.com"))],
                    datetime.now(UTC),
                )
            async with transaction(eng) as conn:  # k-1 again, stale: it changes nothing
                await messages.insert_single_messages(
                    conn,
                    [("k-1", request("a@example.com")), ("k-3", request("c@example.com"))],
                    datetime.now(UTC),
                )
        finally:
            await eng.dispose()

    asyncio.run(run())
    row = _row(engine)
    assert (row["email"], row["attributes"]) == ("c@example.com", {"n": "c"})
