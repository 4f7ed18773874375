"""Engines, migrations and the one place psycopg errors become :mod:`shared.errors`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import psycopg
import sqlalchemy.exc
from psycopg.abc import Buffer
from psycopg.rows import namedtuple_row
from psycopg.types.array import ListDumper
from sqlalchemy import Engine, TextClause, create_engine, event, text

from shared.errors import StoreError, StoreUnavailable

if TYPE_CHECKING:  # alembic (and mako, pygments) only where migrations are read: not per command
    from alembic.config import Config

    # nor SQLAlchemy's asyncio extension (it imports the ORM) where no worker runs: a CLI
    # command such as `nudge campaign pause` starts faster without it
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

MIGRATIONS = Path(__file__).with_name("migrations")


def async_engine(url: str, *, pool_size: int = 5) -> AsyncEngine:
    """The engine workers use. Connections are not pinged before use (a round trip per
    transaction, on the dispatch's critical path): after a Postgres restart the first
    statement fails, SQLAlchemy discards the pool's connections, and the batch is retried
    as for any :class:`~shared.errors.StoreUnavailable`. With several hosts in ``url`` and
    ``target_session_attrs=read-write``, each new connection goes to the host that accepts
    writes: after a failover, the promoted standby (docs/operations.md, "Postgres high
    availability")."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800
    )
    event.listen(engine.sync_engine, "connect", _register_adapters)
    return engine


class _ListDumper(ListDumper):
    """psycopg's list dumper, with a shortcut for lists of plain ints (the keys of every
    batch statement): joined at once, where psycopg dumps each element and matches it
    against a regular expression, about a tenth of a dispatch worker's CPU in a campaign.
    Lists of anything else, or with a None, are dumped as psycopg dumps them."""

    def dump(self, obj: list[Any]) -> Buffer | None:
        if obj and set(map(type, obj)) == {int}:
            return b"{%s}" % ",".join(map(str, obj)).encode()
        return super().dump(obj)


def _register_adapters(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.driver_connection.adapters.register_dumper(list, _ListDumper)


def sync_engine(url: str) -> Engine:
    """The engine the CLI uses."""
    return create_engine(url, pool_pre_ping=True)


def translate(exc: BaseException) -> StoreError:
    """A :class:`StoreError` for a driver error; :class:`StoreUnavailable` when retrying may
    help (connection lost, server restarting, serialization failure, deadlock)."""
    orig = exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) else exc
    transient = (
        isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated
    ) or isinstance(
        orig,
        psycopg.OperationalError
        | psycopg.errors.SerializationFailure
        | psycopg.errors.DeadlockDetected
        | psycopg.errors.AdminShutdown
        | psycopg.errors.CannotConnectNow,
    )
    if isinstance(exc, sqlalchemy.exc.TimeoutError | ConnectionError | OSError):
        transient = True
    cls = StoreUnavailable if transient else StoreError
    return cls(f"postgres: {str(orig).strip().splitlines()[0] if str(orig) else exc!r}")


_DRIVER_ERRORS = (sqlalchemy.exc.SQLAlchemyError, psycopg.Error, ConnectionError, OSError)


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One transaction; driver errors leave as :class:`StoreError`."""
    try:
        async with engine.begin() as conn:
            yield conn
    except _DRIVER_ERRORS as exc:
        raise translate(exc) from exc


@asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection whose every statement commits on its own: for work that is one
    statement, without the round trips of BEGIN and COMMIT."""
    try:
        async with engine.connect() as conn:
            yield await conn.execution_options(isolation_level="AUTOCOMMIT")
    except _DRIVER_ERRORS as exc:
        raise translate(exc) from exc


#: A statement of a :func:`pipeline` and its parameters.
Statement = tuple[TextClause, Mapping[str, Any]]

_compiled: dict[int, tuple[TextClause, str]] = {}


def _sql(conn: AsyncConnection, clause: TextClause) -> str:
    """``clause`` in psycopg's parameter style (``%(name)s``), compiled once per clause."""
    hit = _compiled.get(id(clause))
    if hit is None or hit[0] is not clause:
        hit = _compiled[id(clause)] = (clause, str(clause.compile(dialect=conn.dialect)))
    return hit[1]


async def pipeline(conn: AsyncConnection, statements: Sequence[Statement]) -> list[list[Any]]:
    """Run ``statements`` in order, in the connection's transaction, in one round trip
    (psycopg's pipeline mode), and return each one's rows (named tuples; none for a
    statement that returns none). The dispatch's batch work is a handful of statements that
    do not depend on each other's results; sent one by one, each costs a round trip, and on
    a busy machine every round trip waits for the CPU twice."""
    raw = await conn.get_raw_connection()
    pg = cast(psycopg.AsyncConnection[Any], raw.driver_connection)
    cursors = []
    async with pg.pipeline():
        for clause, params in statements:
            cursor = pg.cursor(row_factory=namedtuple_row)
            await cursor.execute(_sql(conn, clause), dict(params))
            cursors.append(cursor)
    return [await c.fetchall() if c.description is not None else [] for c in cursors]


_BEGIN: Statement = (text("BEGIN"), {})
_COMMIT: Statement = (text("COMMIT"), {})
_NOT_DURABLE: Statement = (text("SET LOCAL synchronous_commit TO off"), {})


class Pipelined:
    """A transaction whose statements travel in pipelines: ``BEGIN`` goes with the first
    pipeline and ``COMMIT`` with the last, so a transaction of two pipelines costs two round
    trips. (Left to psycopg, ``BEGIN`` is a round trip of its own and so is ``COMMIT``.)"""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        self._open = False
        self._done = False

    async def run(
        self, statements: Sequence[Statement], *, commit: bool = False, durable: bool = True
    ) -> list[list[Any]]:
        """:func:`pipeline` inside the transaction; ``commit`` ends it with the same round
        trip. Returns the rows of ``statements`` only.

        ``durable=False`` commits without waiting for the WAL to reach the disk
        (``synchronous_commit = off`` for this transaction): it is visible at once and durable
        as soon as any later synchronous commit on the server is, but a Postgres crash in
        between loses it. Only for a transaction whose effect a synchronous commit of the
        same worker will confirm or repair (the dispatch's claim, see ``messages.repair``)."""
        if self._done:
            raise RuntimeError("the transaction is over")
        head = [] if self._open else [_BEGIN]
        tail = ([] if durable else [_NOT_DURABLE]) + [_COMMIT] if commit else []
        self._open = True
        rows = await pipeline(self._conn, [*head, *statements, *tail])
        self._done = commit
        return rows[len(head) : len(rows) - len(tail)]

    async def close(self) -> None:
        """Roll back what was not committed (an error, a cancellation, no ``commit=True``)."""
        if self._open and not self._done:
            self._done = True
            raw = await self._conn.get_raw_connection()
            await cast(psycopg.AsyncConnection[Any], raw.driver_connection).rollback()


@asynccontextmanager
async def pipelined(engine: AsyncEngine) -> AsyncIterator[Pipelined]:
    """A transaction for latency-bound work that is a few pipelines of statements (the
    dispatch's batch): see :class:`Pipelined`. Driver errors leave as :class:`StoreError`;
    an uncommitted transaction is rolled back on the way out."""
    async with autocommit(engine) as conn:
        tx = Pipelined(conn)
        try:
            yield tx
        finally:
            try:
                await tx.close()
            except _DRIVER_ERRORS as exc:
                raise translate(exc) from exc


@contextmanager
def sync_errors() -> Iterator[None]:
    """Translate driver errors raised by the CLI's synchronous calls."""
    try:
        yield
    except _DRIVER_ERRORS as exc:
        raise translate(exc) from exc


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def check_schema(url: str) -> None:
    """Refuse to work on a database the migrations have not brought to this code's head:
    a missing table would otherwise fail every delivery until RabbitMQ parks them all."""
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config(url))
    head = scripts.get_current_head()
    engine = sync_engine(url)
    try:
        with sync_errors(), engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    known = {rev.revision for rev in scripts.walk_revisions()}
    if current is not None and current not in known:
        # a newer release migrated the database (a rolling deploy): migrations only add, so
        # this older code keeps working until it is replaced
        return
    if current != head:
        raise StoreError(
            f"database schema is at {current or 'nothing'}, this code needs {head}: "
            "run `nudge db upgrade`"
        )


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision``; safe to run from several processes at once. At
    head, also create the partitions of this month and the next ones
    (:func:`workers.store.partitions.maintain`), so that workers start with them."""
    from datetime import UTC, datetime

    from alembic import command

    from workers.store import partitions

    with sync_errors():
        command.upgrade(alembic_config(url), revision)
        if revision == "head":
            engine = create_engine(url)
            try:
                with engine.begin() as conn:
                    partitions.lock(conn)
                    partitions.maintain(conn, datetime.now(UTC))
            finally:
                engine.dispose()
