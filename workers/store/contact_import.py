"""Bulk contact import from CSV: rows are validated while they stream into a temporary table
with ``COPY``, then applied with two set statements (update the known, insert the new), so a
million contacts take seconds, not a million round trips.

Columns: ``external_id`` (required), ``email``, ``phone``, ``timezone``, ``subscribed``
(true/false/1/0/yes/no), ``attributes`` (a JSON object); any other column becomes a string
attribute of that name. Empty cells leave the stored value as it is.
"""

from __future__ import annotations

import csv
import json
import re
import zoneinfo
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from shared.errors import InvalidMessage

KNOWN = ("external_id", "email", "phone", "timezone", "subscribed", "attributes")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_BOOLS = {"true": "t", "1": "t", "yes": "t", "false": "f", "0": "f", "no": "f"}
#: Errors reported before giving up, so a broken file is described, not dumped.
MAX_ERRORS = 10


@dataclass(frozen=True)
class Imported:
    rows: int
    inserted: int
    updated: int


class _Rows:
    """Validating iterator over CSV rows, producing COPY tuples; collects errors."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._reader = csv.reader(iter(lines))
        header = next(self._reader, None)
        if header is None:
            raise InvalidMessage("csv: the file is empty (expected a header row)")
        self.header = [h.strip() for h in header]
        if "external_id" not in self.header:
            raise InvalidMessage(
                f"csv: no external_id column (header: {', '.join(self.header)}); "
                f"known columns: {', '.join(KNOWN)}, others become attributes"
            )
        self.errors: list[str] = []
        self.count = 0
        self._zones = zoneinfo.available_timezones()

    def _error(self, line: int, message: str) -> None:
        self.errors.append(f"line {line}: {message}")
        if len(self.errors) >= MAX_ERRORS:
            raise InvalidMessage("csv: " + "; ".join(self.errors))

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        index = {name: i for i, name in enumerate(self.header)}
        extra = [(n, i) for n, i in index.items() if n not in KNOWN and n]
        ie, iem, ip, it, isub, iat = (index.get(k) for k in KNOWN)
        width = len(self.header)
        for line, row in enumerate(self._reader, start=2):
            if not row:
                continue
            if len(row) != width:
                self._error(line, f"{len(row)} fields, the header has {width}")
                continue
            external_id = row[ie].strip() if ie is not None else ""
            if not external_id or len(external_id) > 200:
                self._error(line, "external_id: required, at most 200 characters")
                continue
            email = row[iem].strip() or None if iem is not None else None
            if email is not None and not _EMAIL.match(email):
                self._error(line, f"email: {email!r} must look like name@example.com")
                continue
            zone = row[it].strip() or None if it is not None else None
            if zone is not None and zone not in self._zones:
                self._error(line, f"timezone: {zone!r} is not an IANA zone like Europe/Paris")
                continue
            subscribed = None
            if isub is not None and row[isub].strip():
                subscribed = _BOOLS.get(row[isub].strip().lower())
                if subscribed is None:
                    self._error(line, f"subscribed: {row[isub]!r} must be true or false")
                    continue
            attributes: dict[str, Any] = {}
            if iat is not None and row[iat].strip():
                try:
                    attributes = json.loads(row[iat])
                except json.JSONDecodeError:
                    attributes = None  # type: ignore[assignment]
                if not isinstance(attributes, dict):
                    self._error(line, "attributes: must be a JSON object")
                    continue
            for name, i in extra:
                if row[i] != "":
                    attributes[name] = row[i]
            phone = row[ip].strip() or None if ip is not None else None
            self.count += 1
            yield (
                line,
                external_id,
                email,
                phone,
                zone,
                json.dumps(attributes, separators=(",", ":")),
                subscribed,
            )


_APPLY = """
CREATE INDEX ON contact_import (external_id, line);
ANALYZE contact_import;
CREATE TEMP TABLE contact_import_last ON COMMIT DROP AS
SELECT DISTINCT ON (external_id) * FROM contact_import ORDER BY external_id, line DESC;
"""
_UPDATE = text("""
UPDATE contacts c
   SET email = coalesce(t.email, c.email), phone = coalesce(t.phone, c.phone),
       timezone = coalesce(t.timezone, c.timezone), attributes = c.attributes || t.attributes,
       subscribed = coalesce(t.subscribed, c.subscribed), updated_at = now()
  FROM contact_import_last t WHERE c.external_id = t.external_id
""")
_INSERT = text("""
INSERT INTO contacts (external_id, email, phone, timezone, attributes, subscribed)
SELECT external_id, email, phone, timezone, attributes, coalesce(subscribed, true)
  FROM contact_import_last t
 WHERE NOT EXISTS (SELECT 1 FROM contacts c WHERE c.external_id = t.external_id)
 ORDER BY line
ON CONFLICT (external_id) DO NOTHING
""")


def import_csv(conn: Connection, lines: Iterable[str]) -> Imported:
    """Validate and upsert every row of a CSV file in the caller's transaction; raises
    :class:`InvalidMessage` naming the lines (up to :data:`MAX_ERRORS`) when any is invalid,
    and then nothing is stored."""
    rows = _Rows(lines)
    raw = conn.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE contact_import (line int, external_id text, email text, "
            "phone text, timezone text, attributes jsonb, subscribed boolean) ON COMMIT DROP"
        )
        with cur.copy(
            "COPY contact_import (line, external_id, email, phone, timezone, attributes, "
            "subscribed) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
    if rows.errors:
        raise InvalidMessage("csv: " + "; ".join(rows.errors))
    conn.exec_driver_sql(_APPLY)
    updated = conn.execute(_UPDATE).rowcount
    inserted = conn.execute(_INSERT).rowcount
    return Imported(rows.count, int(inserted), int(updated))
