"""Engines, migrations and the one place psycopg errors become :mod:`shared.errors`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import psycopg
import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from shared.errors import StoreError, StoreUnavailable

MIGRATIONS = Path(__file__).with_name("migrations")


def async_engine(url: str, *, pool_size: int = 5) -> AsyncEngine:
    """The engine workers use; connections are checked before use so a restarted Postgres
    costs one retry, not a crashed batch."""
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_recycle=1800
    )


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


@contextmanager
def sync_errors() -> Iterator[None]:
    """Translate driver errors raised by the CLI's synchronous calls."""
    try:
        yield
    except _DRIVER_ERRORS as exc:
        raise translate(exc) from exc


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def check_schema(url: str) -> None:
    """Refuse to work on a database the migrations have not brought to this code's head:
    a missing table would otherwise fail every delivery until RabbitMQ parks them all."""
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
    """Apply migrations up to ``revision``; safe to run from several processes at once."""
    with sync_errors():
        command.upgrade(alembic_config(url), revision)
