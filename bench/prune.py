"""``python -m bench prune``: history that ends by dropping a month, against deleting it.

In a database of its own (created and dropped on the local server), partitioned as if Nudge
had run for half a year: one month of ``message_items`` filled with ROWS finished recipients
(campaigns of 1,000 contacts each) is pruned by :func:`workers.store.partitions.prune`, what
``nudge db prune`` and the scheduler run; an older month with DELETE_ROWS rows is emptied by
a ``DELETE`` first, for comparison (per row, extrapolated to ROWS).
"""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import click
import psycopg
from sqlalchemy import Connection, Engine, create_engine, text

from bench import report, store
from bench.report import Figure
from workers.config import Settings
from workers.store import partitions
from workers.store.db import upgrade

DATABASE = "nudge_bench_prune"
CONTACTS = 1000
#: Seconds a drop of the month may take, whatever its size (the issue: "seconds").
TARGET_SECONDS = 10.0


@dataclass(frozen=True)
class Params:
    rows: int
    delete_rows: int


def _months_back(now: datetime, n: int) -> int:
    return partitions.month_of(now) - n


def _layout(conn: Connection, now: datetime) -> None:
    """Month partitions from six months back, the id sequence in the current month."""
    current = partitions.month_of(now)
    for table in partitions.MESSAGE_TABLES:
        conn.execute(text(f"ALTER TABLE {table} DETACH PARTITION {table}_initial"))
        conn.execute(text(f"DROP TABLE {table}_initial"))
        for month in range(current - 6, current + 1):
            conn.execute(
                text(
                    f"CREATE TABLE {table}_{partitions.suffix(month)} PARTITION OF {table} "
                    f"FOR VALUES FROM ({partitions.first_id(month)}) "
                    f"TO ({partitions.first_id(month + 1)})"
                )
            )
    conn.execute(
        text("SELECT setval(pg_get_serial_sequence('messages', 'id'), :v, false)"),
        {"v": partitions.first_id(current)},
    )
    conn.execute(
        text("INSERT INTO contacts (external_id) SELECT 'c-' || g FROM generate_series(1, :n) g"),
        {"n": CONTACTS},
    )


def _fill(conn: Connection, month: int, rows: int) -> tuple[int, int]:
    """ROWS sent recipients of completed campaigns created in ``month``; their id range.
    Without the foreign keys' per-row checks (setup, not measured; needs a superuser)."""
    conn.execute(text("SET LOCAL session_replication_role = replica"))
    at = partitions.month_start(month)
    first = partitions.first_id(month)
    campaigns = max(1, rows // CONTACTS)
    conn.execute(
        text("""
        INSERT INTO messages (id, kind, idempotency_key, template, channel, priority,
                              scheduled_at, deliver_at, status, name, finished_at, created_at)
        SELECT :first + g, 'campaign', 'campaign:bench-' || (:first + g), 'tip', 'log',
               'campaign', :at, :at, 3, 'bench-' || (:first + g), :at, :at
          FROM generate_series(0, :n - 1) g
        """),
        {"first": first, "n": campaigns, "at": at},
    )
    conn.execute(
        text("""
        INSERT INTO message_items (message_id, contact_id, status, attempts, sent_at, updated_at)
        SELECT :first + g, c, 'sent', 1, :at, :at
          FROM generate_series(0, :n - 1) g, generate_series(1, :per) c
        """),
        {"first": first, "n": campaigns, "per": min(rows, CONTACTS), "at": at},
    )
    return first, first + campaigns


def _size(conn: Connection, name: str) -> float:
    return float(conn.execute(text(f"SELECT pg_total_relation_size('{name}')")).scalar_one())


def _database(settings: Settings) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(settings.database_url)
    admin = urllib.parse.urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
    return admin, urllib.parse.urlunsplit(parts._replace(path=f"/{DATABASE}"))


def run(settings: Settings, p: Params) -> bool:
    """Run the scenario, print the table, write the JSON."""
    admin, url = _database(settings)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DATABASE}"')
    engine = create_engine(url)
    try:
        return _run(settings, engine, url, p)
    finally:
        engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')


def _run(settings: Settings, engine: Engine, url: str, p: Params) -> bool:
    now = datetime.now(UTC)
    upgrade(url)
    old, older = _months_back(now, 5), _months_back(now, 6)
    name = f"message_items_{partitions.suffix(old)}"
    with engine.begin() as conn:
        _layout(conn, now)
    click.echo(f"prune: filling {name} with {p.rows:,} rows")
    began = time.perf_counter()
    with engine.begin() as conn:
        _fill(conn, old, p.rows)
    fill_seconds = time.perf_counter() - began
    with engine.begin() as conn:
        low, high = _fill(conn, older, p.delete_rows)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE message_items"))
        size = _size(conn, name)

    click.echo(f"prune: DELETE of {p.delete_rows:,} rows")
    began = time.perf_counter()
    with engine.begin() as conn:
        deleted = conn.execute(
            text("DELETE FROM message_items WHERE message_id >= :low AND message_id < :high"),
            {"low": low, "high": high},
        ).rowcount
    delete_seconds = time.perf_counter() - began

    click.echo(f"prune: dropping {name}")
    began = time.perf_counter()
    with engine.begin() as conn:
        partitions.lock(conn)
        decisions, _ = partitions.prune(conn, now, partitions.Retention.of(settings))
    prune_seconds = time.perf_counter() - began
    for d in decisions:
        click.echo(f"  {d.line()}")
    with engine.connect() as conn:
        left = conn.execute(text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name}).scalar_one()
        host = report.machine(settings.rabbitmq_mgmt_url, store.server_version(engine))
    dropped = [d.partition for d in decisions if d.drop]
    ok = not left and deleted == p.delete_rows
    per_row = delete_seconds / max(deleted, 1)
    figures = [
        Figure(f"prune: drop a month of {p.rows:,} rows", prune_seconds, "s", TARGET_SECONDS, "<="),
        Figure(f"DELETE of {deleted:,} rows", delete_seconds, "s"),
        Figure(f"DELETE, extrapolated to {p.rows:,}", per_row * p.rows, "s"),
        Figure("the month's size", size / 2**20, "MB"),
        Figure("filling it (INSERT ... generate_series)", fill_seconds, "s"),
    ]
    click.echo(report.table(figures))
    extra = {"dropped": dropped, "deleted_rows": deleted, "month_bytes": size}
    path = report.write("prune", asdict(p), {}, host, figures, extra, ok=ok)
    click.echo(f"wrote bench/results/prune/{path.name}")
    return ok
