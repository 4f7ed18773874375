"""Repository for automation rules (``rules``), their run-once claims (``rule_runs``) and the
contact facts their delay policies read. The events role calls the async functions once per
batch; the CLI calls the sync ones."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from psycopg.types.json import Jsonb
from sqlalchemy import Connection, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from workers.rules.definitions import Rule, from_definition
from workers.store.schema import rule_runs, rules

Change = Literal["new", "updated", "unchanged"]


@dataclass(frozen=True)
class StoredRule:
    """A rule as stored, with its switch and version."""

    rule: Rule
    enabled: bool
    version: int
    created_at: datetime
    updated_at: datetime


def _stored(row: Any) -> StoredRule:
    return StoredRule(
        from_definition(row.definition), row.enabled, row.version, row.created_at, row.updated_at
    )


_PUT = text("""
INSERT INTO rules AS r (name, events, definition, enabled)
VALUES (:name, CAST(:events AS text[]), :definition, coalesce(:enabled, true))
ON CONFLICT (name) DO UPDATE
   SET events = excluded.events, definition = excluded.definition,
       enabled = coalesce(:enabled, r.enabled),
       version = r.version + (r.definition IS DISTINCT FROM excluded.definition)::int,
       updated_at = now()
RETURNING (xmax = 0) AS inserted, version
""")


def put(conn: Connection, given: Sequence[Rule]) -> dict[str, Change]:
    """Store ``given`` by name (a loaded file is the truth for the rules it names; others are
    left as they are). A rule's ``enabled`` changes only when the file sets it."""
    before = {
        r.name: r.definition
        for r in conn.execute(
            select(rules.c.name, rules.c.definition)
            .where(rules.c.name.in_([g.name for g in given]))
            .with_for_update()
        )
    }
    out: dict[str, Change] = {}
    for rule in sorted(given, key=lambda r: r.name):  # one lock order for concurrent loads
        definition = rule.definition()
        conn.execute(
            _PUT,
            {
                "name": rule.name,
                "events": list(rule.event),
                "definition": Jsonb(definition),
                "enabled": rule.enabled,
            },
        )
        if rule.name not in before:
            out[rule.name] = "new"
        else:
            out[rule.name] = "unchanged" if before[rule.name] == definition else "updated"
    return out


def all_rules(conn: Connection) -> list[StoredRule]:
    return [_stored(r) for r in conn.execute(select(rules).order_by(rules.c.name))]


def get(conn: Connection, name: str) -> StoredRule | None:
    row = conn.execute(select(rules).where(rules.c.name == name)).first()
    return _stored(row) if row is not None else None


def set_enabled(conn: Connection, name: str, enabled: bool) -> bool:
    """Switch a rule on or off; False when there is no such rule."""
    result = conn.execute(
        update(rules).where(rules.c.name == name).values(enabled=enabled, updated_at=func.now())
    )
    return result.rowcount == 1


def runs(conn: Connection, name: str) -> int:
    """How many contacts a run-once rule has fired for."""
    return int(conn.execute(select(func.count()).where(rule_runs.c.rule == name)).scalar_one())


async def matching(conn: AsyncConnection, event_names: Iterable[str]) -> list[Rule]:
    """The enabled rules triggered by any of ``event_names``."""
    result = await conn.execute(
        select(rules.c.definition).where(
            rules.c.enabled, rules.c.events.overlap(sorted(set(event_names)))
        )
    )
    return [from_definition(r.definition) for r in result]


@dataclass(frozen=True)
class Contact:
    id: int
    external_id: str
    timezone: str | None
    attributes: dict[str, Any]
    subscribed: bool


_CONTACTS = text("""
SELECT id, external_id, timezone, attributes, subscribed FROM contacts
 WHERE external_id = ANY(CAST(:ids AS text[]))
""")


async def contacts(conn: AsyncConnection, external_ids: Iterable[str]) -> dict[str, Contact]:
    result = await conn.execute(_CONTACTS, {"ids": sorted(set(external_ids))})
    return {r.external_id: Contact(**r._mapping) for r in result}


_LAST_ACTIVE = text("""
SELECT q.i, (SELECT max(e.occurred_at) FROM contact_events e
              WHERE e.contact_id = q.contact_id
                AND e.name IN (SELECT jsonb_array_elements_text(q.names))
                AND e.occurred_at >= q.before - make_interval(secs => q.within)
                AND e.occurred_at <= q.before AND e.event_id <> q.event_id) AS at
  FROM unnest(CAST(:idx AS int[]), CAST(:cids AS bigint[]), CAST(:event_ids AS text[]),
              CAST(:befores AS timestamptz[]), CAST(:withins AS float8[]),
              CAST(:names AS jsonb[]))
       AS q(i, contact_id, event_id, before, within, names)
""")


@dataclass(frozen=True)
class ActivityQuery:
    """Did the contact do one of ``names`` within ``within_seconds`` up to ``before``, not
    counting the trigger ``event_id`` itself?"""

    contact_id: int
    event_id: str
    before: datetime
    within_seconds: float
    names: tuple[str, ...]


async def last_active(
    conn: AsyncConnection, queries: Sequence[ActivityQuery]
) -> list[datetime | None]:
    """For each query, the latest matching event's time, in one statement."""
    if not queries:
        return []
    result = await conn.execute(
        _LAST_ACTIVE,
        {
            "idx": list(range(len(queries))),
            "cids": [q.contact_id for q in queries],
            "event_ids": [q.event_id for q in queries],
            "befores": [q.before for q in queries],
            "withins": [q.within_seconds for q in queries],
            "names": [Jsonb(list(q.names)) for q in queries],
        },
    )
    found = {r.i: r.at for r in result}
    return [found.get(i) for i in range(len(queries))]


_CLAIM_RUNS = text("""
INSERT INTO rule_runs (rule, contact_id, event_id)
SELECT * FROM unnest(CAST(:rules AS text[]), CAST(:cids AS bigint[]),
                     CAST(:event_ids AS text[]))
ON CONFLICT (rule, contact_id) DO NOTHING
""")

_RUNS_OF = text("""
SELECT r.rule, r.contact_id, r.event_id FROM rule_runs r
  JOIN unnest(CAST(:rules AS text[]), CAST(:cids AS bigint[])) AS t(rule, contact_id)
    ON r.rule = t.rule AND r.contact_id = t.contact_id
""")

RunKey = tuple[str, int, str]  # (rule, contact_id, event_id)


async def claim_runs(conn: AsyncConnection, wanted: Sequence[RunKey]) -> set[RunKey]:
    """Claim run-once rules per contact; ``wanted`` is in the order events should win
    (earliest first). Returns the (rule, contact, event) that hold the claim: new ones, and
    old ones of the same event (a redelivery fires again, idempotently). A concurrent
    transaction claiming the same pair waits for ours and then gets nothing."""
    if not wanted:
        return set()
    # one row per pair (the earliest event), inserted in a stable lock order
    first: dict[tuple[str, int], str] = {}
    for rule, cid, event_id in wanted:
        first.setdefault((rule, cid), event_id)
    pairs = sorted(first.items())
    await conn.execute(
        _CLAIM_RUNS,
        {
            "rules": [p[0][0] for p in pairs],
            "cids": [p[0][1] for p in pairs],
            "event_ids": [p[1] for p in pairs],
        },
    )
    result = await conn.execute(
        _RUNS_OF, {"rules": [p[0][0] for p in pairs], "cids": [p[0][1] for p in pairs]}
    )
    return {(r.rule, r.contact_id, r.event_id) for r in result}
