"""Repository for message templates: versioned by name, the newest version is the one used."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, func, select, text
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncConnection

from workers.store.db import Statement
from workers.store.schema import templates


@dataclass(frozen=True)
class StoredTemplate:
    """One version of a template, as stored."""

    name: str
    version: int
    subject: str | None
    text_body: str
    html_body: str | None
    created_at: datetime
    #: The HTML of an email gets an open pixel / click redirects (docs/delivery.md).
    track_opens: bool = True
    track_clicks: bool = True
    #: Messages of this template that name no category take this one (the dedup window).
    category: str | None = None


def _latest(names: Iterable[str]) -> Select[Any]:
    return (
        select(templates)
        .where(templates.c.name.in_(sorted(set(names))))
        .ext(distinct_on(templates.c.name))
        .order_by(templates.c.name, templates.c.version.desc())
    )


def add(
    conn: Connection,
    name: str,
    text_body: str,
    subject: str | None,
    html_body: str | None,
    *,
    track_opens: bool = True,
    track_clicks: bool = True,
    category: str | None = None,
) -> int:
    """Store a new version of ``name`` (1 for a new name) and return its number. Callers
    validate the content first; concurrent adds of one name fail on the primary key."""
    version = conn.execute(
        select(func.coalesce(func.max(templates.c.version), 0) + 1).where(templates.c.name == name)
    ).scalar_one()
    conn.execute(
        templates.insert().values(
            name=name,
            version=version,
            subject=subject,
            text_body=text_body,
            html_body=html_body,
            track_opens=track_opens,
            track_clicks=track_clicks,
            category=category,
        )
    )
    return int(version)


def latest(conn: Connection, names: Iterable[str]) -> dict[str, StoredTemplate]:
    """The newest version of each of ``names`` that exists."""
    return {r.name: StoredTemplate(**r._mapping) for r in conn.execute(_latest(names))}


_LATEST = text("""
SELECT DISTINCT ON (name) name, version, subject, text_body, html_body, created_at,
       track_opens, track_clicks, category
  FROM templates WHERE name = ANY(CAST(:names AS text[]))
 ORDER BY name, version DESC
""")


def latest_statement(names: Iterable[str]) -> Statement:
    """:func:`latest` for workers, as a statement; read with :func:`latest_from`."""
    return _LATEST, {"names": sorted(set(names))}


_LATEST_OF_MESSAGES = text("""
SELECT DISTINCT ON (name) name, version, subject, text_body, html_body, created_at,
       track_opens, track_clicks, category
  FROM templates
 WHERE name IN (SELECT template FROM messages WHERE id = ANY(CAST(:mids AS bigint[])))
 ORDER BY name, version DESC
""")


def latest_of_messages_statement(message_ids: Iterable[int]) -> Statement:
    """The newest version of the templates these messages name, as a statement that needs
    no earlier result (it goes with the claim); read with :func:`latest_from`."""
    return _LATEST_OF_MESSAGES, {"mids": sorted(set(message_ids))}


def latest_from(rows: Iterable[Any]) -> dict[str, StoredTemplate]:
    return {r.name: StoredTemplate(*r) for r in rows}


async def latest_async(conn: AsyncConnection, names: Iterable[str]) -> dict[str, StoredTemplate]:
    """:func:`latest` for workers."""
    return latest_from(await conn.execute(*latest_statement(names)))


def get(conn: Connection, name: str, version: int | None = None) -> StoredTemplate | None:
    """Version ``version`` of ``name`` (the newest when ``None``), or ``None``."""
    query = select(templates).where(templates.c.name == name)
    if version is None:
        query = query.order_by(templates.c.version.desc()).limit(1)
    else:
        query = query.where(templates.c.version == version)
    row = conn.execute(query).first()
    return StoredTemplate(**row._mapping) if row is not None else None


def list_latest(conn: Connection) -> list[StoredTemplate]:
    """The newest version of every template, by name."""
    query = (
        select(templates)
        .distinct(templates.c.name)
        .order_by(templates.c.name, templates.c.version.desc())
    )
    return [StoredTemplate(**r._mapping) for r in conn.execute(query)]


async def missing_async(conn: AsyncConnection, names: Iterable[str]) -> set[str]:
    """:func:`missing` for workers: which of ``names`` have no template."""
    wanted = set(names)
    return wanted - set(await latest_async(conn, wanted))


def missing(conn: Connection, names: Iterable[str]) -> set[str]:
    """Which of ``names`` have no template: for validating campaigns and rules up front."""
    wanted = set(names)
    return wanted - set(latest(conn, wanted))
